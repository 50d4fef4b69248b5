"""big_vision and vision_transformer ``.npz`` checkpoints for the 'vit' backbone.

    state = big_vision.load_state_dict("ViT-B_16.npz", config)
    state = big_vision.load_state_dict("webli_en_b16_224_63724782.npz:img", config)
    variables = mctf_jax.convert.torch_to_variables(state, config)

(``mctf_jax.convert.file_to_variables`` and ``mctf_jax.checkpoint.load_variables`` do both
steps for any checkpoint file.)

The files are flat numpy archives whose keys are the Flax parameter paths joined by '/'.
What is read:

* big_vision's naming (``Transformer/encoderblock_3/MultiHeadDotProductAttention_0/query/
  kernel`` (D, H, d), ``LayerNorm_1``, ``MlpBlock_0``, ``pos_embedding``, ``cls``,
  ``MAPHead_0/...``, ``pre_logits``, ``head``) and the older vision_transformer one
  ('augreg': ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3`` in the
  blocks, the position embedding at ``Transformer/posembed_input/pos_embedding``, or at
  ``Transformer/pos_embedding``);
* unscanned blocks (``encoderblock_{i}``) and scanned ones (one ``Transformer/encoderblock``
  whose arrays are stacked over the blocks on axis 0);
* parameters at the top level, under ``params/`` or under ``opt/target/``; with
  ``FILE.npz:SUBTREE`` the ViT under that sub-tree (SigLIP's image encoder: ``:img``,
  found under ``params/img/``). Without one, the single ViT the file holds, wherever it is;
* a position embedding with one entry more than the patch grid (old checkpoints added it to
  the class token before the blocks): that entry is folded into the class token, as
  big_vision's loader does, which computes the same.

The checks happen in the file's own names: a width or depth that does not fit the config is
one line naming both; every missing, unexpected or misshapen array is listed at once
(``CheckpointMismatchError``). When adapting, a file for another image size or class count
is adapted here, with a warning, as big_vision's and vision_transformer's loaders adapt it:
the position embedding resized linearly with corners on corners (``resample_posemb``,
``scipy.ndimage.zoom(order=1)``; timm's and DeiT's resize is bicubic), and a head for
another class count, or for a file without one (a feature extractor), at zero
(``head_zeroinit``). The arrays are then renamed to the backbone's timm-style names, in
PyTorch's layout (query, key and value kernels joined into ``qkv``), for
``mctf_jax.convert.torch_to_variables``.
"""

from __future__ import annotations

import logging
import os
import zipfile
from typing import Any, Mapping

import numpy as np

from mctf_jax import models
from mctf_jax.config import model_config
from mctf_jax.convert.posemb import fold_class_position, resize_pos_embed
from mctf_jax.errors import (CheckpointError, CheckpointMismatchError, CheckpointNotFoundError,
                             ConfigError)

logger = logging.getLogger(__name__)

ROOTS = ("", "params/", "opt/target/")
EMBEDDING = "embedding/kernel"
POS_EMBED_NAMES = ("pos_embedding", "Transformer/posembed_input/pos_embedding",
                   "Transformer/pos_embedding")
# The parts of a block in each naming: attention, first and second LayerNorm, MLP.
BLOCK_PARTS = {
    "big_vision": ("MultiHeadDotProductAttention_0", "LayerNorm_0", "LayerNorm_1",
                   "MlpBlock_0"),
    "augreg": ("MultiHeadDotProductAttention_1", "LayerNorm_0", "LayerNorm_2", "MlpBlock_3"),
}
BLOCKS = "Transformer/encoderblock"


def split_path(path: str) -> tuple[str, str | None]:
  """'FILE.npz:SUBTREE' -> ('FILE.npz', 'SUBTREE'); any other path -> (path, None)."""
  path = os.fspath(path)
  head, sep, tail = path.rpartition(":")
  if sep and head.lower().endswith(".npz") and tail and not os.path.exists(path):
    return head, tail.strip("/")
  return path, None


def _keys(file: str) -> list[str]:
  with np.load(file, allow_pickle=False) as data:
    return list(data.files)


def is_big_vision(keys) -> bool:
  """Whether archive keys are in big_vision / vision_transformer naming (a patch embedding
  'embedding/kernel' somewhere), rather than PyTorch names."""
  return any(k == EMBEDDING or k.endswith("/" + EMBEDDING) for k in keys)


def is_big_vision_file(path: str) -> bool:
  """Whether `path` ('FILE.npz' or 'FILE.npz:SUBTREE') names a big_vision checkpoint; only
  the archive's directory is read."""
  file, subtree = split_path(path)
  if subtree is not None:
    return True
  if not file.lower().endswith(".npz") or not os.path.isfile(file):
    return False
  try:
    return is_big_vision(_keys(file))
  except (ValueError, OSError, zipfile.BadZipFile):
    return False


def read(path: str) -> dict[str, np.ndarray]:
  """Every array of the .npz file of `path` (the ':SUBTREE' suffix, if any, ignored)."""
  file, _ = split_path(path)
  if not os.path.isfile(file):
    raise CheckpointNotFoundError(f"no checkpoint file at {file!r}")
  try:
    with np.load(file, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise CheckpointError(f"cannot read {file!r} as a numpy archive: {type(e).__name__}: "
                          f"{e}") from e


def _groups(keys, depth: int = 2, limit: int = 12) -> str:
  """The distinct leading path components of `keys` (for messages)."""
  found = sorted({"/".join(k.split("/")[:depth]) for k in keys})
  more = f", ... ({len(found)} in all)" if len(found) > limit else ""
  return ", ".join(found[:limit]) + more


def select(flat: Mapping[str, np.ndarray], subtree: str | None,
           source: str) -> dict[str, np.ndarray]:
  """The ViT's arrays, keyed relative to its root: the sub-tree named (looked for at the
  top level, under params/ and under opt/target/), else the one ViT the file holds."""
  if subtree is not None:
    tried = [root + subtree + "/" for root in ROOTS]
    found = [p for p in tried if any(k.startswith(p) for k in flat)]
    if not found:
      raise CheckpointError(f"{source}: the checkpoint has no sub-tree {subtree!r} (looked "
                            f"for {', '.join(tried)}); it holds {_groups(flat)}")
    prefix = found[0]
    if prefix + EMBEDDING not in flat:
      inside = [k[len(prefix):] for k in flat if k.startswith(prefix)]
      raise CheckpointError(f"{source}: sub-tree {prefix.rstrip('/')!r} is not a ViT image "
                            f"encoder (no {EMBEDDING}); it holds {_groups(inside)}")
  else:
    prefixes = sorted({k[:-len(EMBEDDING)] for k in flat
                       if k == EMBEDDING or k.endswith("/" + EMBEDDING)})
    if not prefixes:
      raise CheckpointError(
          f"{source} is not a big_vision / vision_transformer ViT checkpoint: it has no "
          f"patch embedding '{EMBEDDING}' at any level; it holds {len(flat)} arrays: "
          f"{_groups(flat)}")
    if len(prefixes) > 1:
      raise CheckpointError(f"{source} holds {len(prefixes)} ViTs (under "
                            f"{', '.join(p or '/' for p in prefixes)}); name one as "
                            f"FILE.npz:SUBTREE")
    prefix = prefixes[0]
    if prefix not in ROOTS:
      logger.info("reading the ViT under %s of %s", prefix, source)
  return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def _layout(tree: Mapping[str, np.ndarray]) -> tuple[str, bool, str | None]:
  """(naming, scanned, the key of the position embedding or None)."""
  naming = "augreg" if any("/MultiHeadDotProductAttention_1/" in k for k in tree) \
      else "big_vision"
  scanned = any(k.startswith(BLOCKS + "/") for k in tree)
  pos = next((name for name in POS_EMBED_NAMES if name in tree), None)
  return naming, scanned, pos


def _width_and_depth(tree, scanned: bool) -> tuple[int, int]:
  width = tree[EMBEDDING].shape[-1]
  if scanned:
    stacked = [v for k, v in tree.items() if k.startswith(BLOCKS + "/") and v.ndim]
    depth = stacked[0].shape[0] if stacked else 0
  else:
    prefix = BLOCKS + "_"
    depth = len({k[len(prefix):].split("/")[0] for k in tree if k.startswith(prefix)})
  return width, depth


def _block_shapes(cfg, parts) -> dict[str, tuple[int, ...]]:
  """One block's arrays (names relative to the block) and their shapes."""
  d, h, m = cfg.embed_dim, cfg.num_heads, cfg.mlp_dim
  attn, ln1, ln2, mlp = parts
  shapes = {f"{ln}/{p}": (d,) for ln in (ln1, ln2) for p in ("scale", "bias")}
  for p in ("query", "key", "value"):
    shapes.update({f"{attn}/{p}/kernel": (d, h, d // h), f"{attn}/{p}/bias": (h, d // h)})
  shapes.update({f"{attn}/out/kernel": (h, d // h, d), f"{attn}/out/bias": (d,),
                 f"{mlp}/Dense_0/kernel": (d, m), f"{mlp}/Dense_0/bias": (m,),
                 f"{mlp}/Dense_1/kernel": (m, d), f"{mlp}/Dense_1/bias": (d,)})
  return shapes


def expected_shapes(cfg, naming: str = "big_vision", scanned: bool = False,
                    pos_name: str = "pos_embedding") -> dict[str, tuple[int, ...]]:
  """The arrays a checkpoint of the config's model holds, in the given naming and layout."""
  d, p = cfg.embed_dim, cfg.patch_size
  shapes = {EMBEDDING: (p, p, cfg.in_chans, d), "embedding/bias": (d,)}
  if cfg.posemb == "learn":
    shapes[pos_name] = (1, cfg.num_patches, d)
  if cfg.pool_type == "tok":
    shapes["cls"] = (1, 1, d)
  block = _block_shapes(cfg, BLOCK_PARTS[naming])
  if scanned:
    shapes.update({f"{BLOCKS}/{k}": (cfg.depth,) + s for k, s in block.items()})
  else:
    for i in range(cfg.depth):
      shapes.update({f"{BLOCKS}_{i}/{k}": s for k, s in block.items()})
  shapes.update({"Transformer/encoder_norm/scale": (d,), "Transformer/encoder_norm/bias": (d,)})
  if cfg.pool_type == "map":
    head = _block_shapes(cfg, BLOCK_PARTS["big_vision"])
    head = {k: s for k, s in head.items() if not k.startswith("LayerNorm_1/")}
    shapes.update({f"MAPHead_0/{k}": s for k, s in head.items()})
    shapes["MAPHead_0/probe"] = (1, 1, d)
  if cfg.rep_size:
    shapes.update({"pre_logits/kernel": (d, cfg.rep_size), "pre_logits/bias": (cfg.rep_size,)})
  shapes.update({"head/kernel": (cfg.pooled_dim, cfg.num_classes),
                 "head/bias": (cfg.num_classes,)})
  return shapes


def _fold_class_token_position(tree: dict, pos_name: str | None, source: str) -> None:
  """A position embedding of g*g + 1 entries (the old layout, where the class token got the
  first): that entry is added to the class token (or dropped without one)."""
  if pos_name is None:
    return
  pos, cls = fold_class_position(tree[pos_name], tree.get("cls"))
  if pos is tree[pos_name]:
    return
  logger.info("%s: folding the class token's position embedding into the class token",
              source)
  tree[pos_name] = pos
  if cls is not None:
    tree["cls"] = cls


def _adaptable(name: str, got, want, pos_name) -> bool:
  """A shape difference that torch_to_variables adapts: the position embedding's token
  count, the head's class count."""
  if name == pos_name:
    return len(got) == 3 and got[0] == 1 and got[2] == want[2]
  if name == "head/kernel":
    return len(got) == 2 and got[0] == want[0]
  return name == "head/bias" and len(got) == 1


def check(tree, cfg, *, source: str, adapt: bool, allow_unexpected: bool = False):
  """CheckpointError (one line) if width or depth do not fit the config;
  CheckpointMismatchError listing every missing, unexpected and misshapen array (in the
  file's names) otherwise, if any. Returns (naming, scanned, pos_name)."""
  naming, scanned, pos_name = _layout(tree)
  width, depth = _width_and_depth(tree, scanned)
  if (width, depth) != (cfg.embed_dim, cfg.depth):
    found = models.vit.variant_of(width, depth)
    found = f" (big_vision variant {found})" if found else ""
    raise CheckpointError(
        f"{source} is a ViT of width {width} and depth {depth}{found}, but the config has "
        f"width {cfg.embed_dim} and depth {cfg.depth}: set model.variant (or model.embed_dim, "
        f"model.depth, model.num_heads, model.mlp_dim) to the checkpoint's")
  want = expected_shapes(cfg, naming, scanned, pos_name or "pos_embedding")
  missing = [k for k in want if k not in tree]
  unexpected = [k for k in tree if k not in want]
  wrong = [(k, tree[k].shape, want[k]) for k in want if k in tree
           and tuple(tree[k].shape) != want[k]
           and not (adapt and _adaptable(k, tuple(tree[k].shape), want[k], pos_name))]
  if unexpected and allow_unexpected and not (missing or wrong):
    logger.warning("ignoring %d unexpected arrays: %s", len(unexpected), ", ".join(unexpected))
    unexpected = []
  if missing or unexpected or wrong:
    raise CheckpointMismatchError(missing, unexpected, wrong, source)
  return naming, scanned, pos_name


def _attention(tree, prefix: str) -> dict[str, np.ndarray]:
  """Flax's per-head query/key/value/out arrays as PyTorch-layout linear layers."""
  def matrix(name):   # (D, H, d) -> (H*d, D), PyTorch's (out, in)
    kernel = tree[f"{prefix}/{name}/kernel"]
    return kernel.reshape(kernel.shape[0], -1).T
  def vector(name):
    return tree[f"{prefix}/{name}/bias"].reshape(-1)
  out = tree[f"{prefix}/out/kernel"]
  return {"q": (matrix("query"), vector("query")), "k": (matrix("key"), vector("key")),
          "v": (matrix("value"), vector("value")),
          "out": (out.reshape(-1, out.shape[-1]).T, tree[f"{prefix}/out/bias"])}


def _norm(tree, prefix: str, name: str) -> dict[str, np.ndarray]:
  return {f"{name}.weight": tree[f"{prefix}/scale"], f"{name}.bias": tree[f"{prefix}/bias"]}


def _dense(tree, prefix: str, name: str) -> dict[str, np.ndarray]:
  return {f"{name}.weight": tree[f"{prefix}/kernel"].T, f"{name}.bias": tree[f"{prefix}/bias"]}


def _renamed(tree, cfg, naming: str, scanned: bool,
             pos_name: str | None) -> dict[str, np.ndarray]:
  """The checked arrays under the 'vit' backbone's PyTorch-layout names."""
  state = {"patch_embed.proj.weight": tree[EMBEDDING].transpose(3, 2, 0, 1),
           "patch_embed.proj.bias": tree["embedding/bias"]}
  if pos_name is not None:
    state["pos_embed"] = tree[pos_name]
  if "cls" in tree:
    state["cls_token"] = tree["cls"]
  attn, ln1, ln2, mlp = BLOCK_PARTS[naming]
  for i in range(cfg.depth):
    if scanned:
      block = {k[len(BLOCKS) + 1:]: v[i] for k, v in tree.items() if k.startswith(BLOCKS + "/")}
    else:
      prefix = f"{BLOCKS}_{i}/"
      block = {k[len(prefix):]: v for k, v in tree.items() if k.startswith(prefix)}
    b = f"blocks.{i}."
    a = _attention(block, attn)
    state[b + "attn.qkv.weight"] = np.concatenate([a[p][0] for p in "qkv"], axis=0)
    state[b + "attn.qkv.bias"] = np.concatenate([a[p][1] for p in "qkv"], axis=0)
    state[b + "attn.proj.weight"], state[b + "attn.proj.bias"] = a["out"]
    state.update(_norm(block, ln1, b + "norm1"))
    state.update(_norm(block, ln2, b + "norm2"))
    state.update(_dense(block, f"{mlp}/Dense_0", b + "mlp.fc1"))
    state.update(_dense(block, f"{mlp}/Dense_1", b + "mlp.fc2"))
  state.update(_norm(tree, "Transformer/encoder_norm", "norm"))
  if cfg.pool_type == "map":
    a = _attention(tree, "MAPHead_0/MultiHeadDotProductAttention_0")
    state.update({"attn_pool.latent": tree["MAPHead_0/probe"],
                  "attn_pool.q.weight": a["q"][0], "attn_pool.q.bias": a["q"][1],
                  "attn_pool.kv.weight": np.concatenate([a["k"][0], a["v"][0]], axis=0),
                  "attn_pool.kv.bias": np.concatenate([a["k"][1], a["v"][1]], axis=0),
                  "attn_pool.proj.weight": a["out"][0], "attn_pool.proj.bias": a["out"][1]})
    state.update(_norm(tree, "MAPHead_0/LayerNorm_0", "attn_pool.norm"))
    state.update(_dense(tree, "MAPHead_0/MlpBlock_0/Dense_0", "attn_pool.mlp.fc1"))
    state.update(_dense(tree, "MAPHead_0/MlpBlock_0/Dense_1", "attn_pool.mlp.fc2"))
  if cfg.rep_size:
    state.update(_dense(tree, "pre_logits", "pre_logits"))
  state.update(_dense(tree, "head", "head"))
  return state


def to_state_dict(flat: Mapping[str, np.ndarray], config: Any, *, subtree: str | None = None,
                  adapt: bool = True, allow_unexpected: bool = False,
                  source: str = "checkpoint") -> dict[str, np.ndarray]:
  """The 'vit' backbone's PyTorch-layout state dict from a big_vision checkpoint's flat
  arrays (see the module docstring), checked against the config. adapt: let the position
  embedding's token count and the head's class count differ (and make a head for a file
  without one), for ``torch_to_variables`` to adapt; allow_unexpected: ignore arrays the
  model does not have."""
  cfg = model_config(config)
  if not issubclass(models.get(cfg.arch), models.ViT):
    raise ConfigError(f"{source} is a big_vision / vision_transformer checkpoint: it loads "
                      f"into model.arch='vit' (configs/vit_*.py, configs/siglip_*.py), not "
                      f"model.arch={cfg.arch!r}")
  tree = select(flat, subtree, source)
  _, _, pos_name = _layout(tree)
  _fold_class_token_position(tree, pos_name, source)
  head_shape = (cfg.pooled_dim, cfg.num_classes)
  if adapt and "head/kernel" not in tree and "head/bias" not in tree:
    # A feature extractor (big_vision's num_classes=None): a new head, as for a class
    # count that differs.
    logger.warning("%s has no head; the head starts at zero, as big_vision's "
                   "(head_zeroinit)", source)
    tree["head/kernel"], tree["head/bias"] = _zero_head(head_shape)
  naming, scanned, pos_name = check(tree, cfg, source=source, adapt=adapt,
                                    allow_unexpected=allow_unexpected)
  if tuple(tree["head/kernel"].shape) != head_shape:
    logger.warning("%s: dropping the checkpoint's head (%d classes): the config has %d "
                   "classes; the head starts at zero, as big_vision's (head_zeroinit)",
                   source, tree["head/kernel"].shape[1], cfg.num_classes)
    tree["head/kernel"], tree["head/bias"] = _zero_head(head_shape)
  if pos_name and tree[pos_name].shape[1] != cfg.num_patches:
    logger.warning("%s: resizing %s from %d to %d tokens (linear, as big_vision)", source,
                   pos_name, tree[pos_name].shape[1], cfg.num_patches)
    tree[pos_name] = resample_posemb(tree[pos_name], cfg.num_patches)
  return _renamed(tree, cfg, naming, scanned, pos_name)


def _zero_head(shape):
  return np.zeros(shape, np.float32), np.zeros(shape[1:], np.float32)


def resample_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """big_vision's resize of a (1, g*g, C) position embedding to (1, num_tokens, C): the
  grid interpolated linearly with corners on corners (``scipy.ndimage.zoom`` of order 1,
  which big_vision and vision_transformer call)."""
  return resize_pos_embed(posemb, num_tokens, num_prefix=0, method="linear")


def load_state_dict(path: str, config: Any, *, adapt: bool = True,
                    allow_unexpected: bool = False) -> dict[str, np.ndarray]:
  """``to_state_dict`` of 'FILE.npz' or 'FILE.npz:SUBTREE'."""
  file, subtree = split_path(path)
  return to_state_dict(read(file), config, subtree=subtree, adapt=adapt,
                       allow_unexpected=allow_unexpected, source=os.fspath(path))
