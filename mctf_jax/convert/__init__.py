"""PyTorch (timm / DeiT / MCTF naming) state dicts to Flax variables, and back.

    params = mctf_jax.convert.torch_to_flax(state_dict, config)
    state_dict = mctf_jax.convert.flax_to_torch(params, config)

A state dict may be plain or wrapped like the official checkpoints ({'model': ...}, timm's
{'state_dict': ..., 'state_dict_ema': ...}), hold torch tensors or numpy arrays, and come
from a ``.pth`` (or timm's ``.pth.tar``), ``.npz`` or ``.safetensors`` file
(``load_state_dict``). ``.pth`` files, in the zip format and the legacy pre-1.6 one, are read
without PyTorch (``mctf_jax.torch_pickle``). The backbone of ``config.model.arch`` names its
parameters (``Backbone.torch_shapes``, ``flax_path``): for DeiT, timm's names map one to one,
``blocks.3.attn.qkv.weight`` (out, in) is ``params['blocks_3']['attn']['qkv']['kernel']``
(in, out); conv kernels go from (O, I, kh, kw) to (kh, kw, I, O); LayerNorm ``weight`` is
``scale``; BatchNorm's running statistics go to the 'batch_stats' collection.

If the image size differs, the position embedding is resized like DeiT's fine-tuning code
(bicubic, align_corners=False, the tokens off the patch grid kept). If the class count
differs, the head is dropped with a warning and freshly initialised. Every other mismatch
(missing, unexpected or wrongly shaped weights) raises ``CheckpointMismatchError`` listing
all of them.

big_vision and vision_transformer ``.npz`` checkpoints (JAX ViTs, SigLIP image encoders)
load into the 'vit' backbone through ``mctf_jax.convert.big_vision``; ``file_to_variables``
reads either kind of file, telling the two kinds of .npz apart by their keys; their
position embeddings are resized as big_vision resizes them (linearly).

Command line (``python -m mctf_jax.convert``, see ``mctf_jax/convert/__main__.py``) writes
an Orbax checkpoint that train.py and eval.py load::

    python -m mctf_jax.convert --config=configs/deit_s.py --torch=deit_small.pth --out=DIR
    python -m mctf_jax.convert --config=configs/vit_b16_augreg.py --big_vision=ViT-B_16.npz \
        --out=DIR
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from mctf_jax import models, torch_pickle
from mctf_jax.config import model_config
from mctf_jax.convert import big_vision
from mctf_jax.convert.posemb import fold_class_position, resize_pos_embed
from mctf_jax.errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict", "module")
EMA_WRAPPER_KEYS = ("model_ema", "state_dict_ema", "ema")


# ----------------------------------------------------------------------------- loading


def _to_numpy(value) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach"):  # torch.Tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def unwrap_state_dict(checkpoint: Mapping[str, Any], ema: bool = False) -> dict[str, Any]:
  """The weights inside a checkpoint dict ({'model': ...} like DeiT/MCTF, or plain)."""
  keys = EMA_WRAPPER_KEYS if ema else WRAPPER_KEYS
  for key in keys:
    if key in checkpoint and isinstance(checkpoint[key], Mapping):
      return dict(checkpoint[key])
  if ema:
    raise CheckpointError(f"no EMA weights in the checkpoint: expected one of "
                          f"{EMA_WRAPPER_KEYS}, found keys {sorted(checkpoint)[:20]}")
  return dict(checkpoint)


# The files load_state_dict reads (torch's own, and numpy/safetensors in the same naming).
# '.pth.tar': timm's training script's checkpoints (the released T2T-ViT and LV-ViT ones),
# torch.save files despite the name.
TORCH_FILE_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
STATE_DICT_EXTENSIONS = TORCH_FILE_EXTENSIONS + (".npz", ".safetensors")


def file_extension(path: str) -> str:
  """The extension of a checkpoint file, lower case: one of STATE_DICT_EXTENSIONS (the
  double '.pth.tar' included), else the last one (os.path.splitext's)."""
  lower = os.fspath(path).lower()
  for ext in sorted(STATE_DICT_EXTENSIONS, key=len, reverse=True):
    if lower.endswith(ext):
      return ext
  return os.path.splitext(lower)[1]


def _read_checkpoint_file(path: str, ext: str):
  if ext == ".npz":
    with np.load(path, allow_pickle=False) as data:
      raw = {k: data[k] for k in data.files}
    # Accept the golden-file layout ('param/<name>') and a 'model/' prefix too.
    for prefix in ("param/", "model/"):
      if raw and all(k.startswith(prefix) for k in raw):
        raw = {k[len(prefix):]: v for k, v in raw.items()}
    return raw
  if ext == ".safetensors":
    from safetensors import SafetensorError   # here: only .safetensors files need it
    from safetensors.numpy import load_file
    try:
      return load_file(path)
    except SafetensorError as e:
      raise CheckpointError(f"cannot read {path!r}: {e}") from e
  return torch_pickle.load(path)  # no torch needed, and no code from the file is run


def load_state_dict(path: str, ema: bool = False) -> dict[str, np.ndarray]:
  """Reads a PyTorch-style state dict from .pth/.pt/.bin/.ckpt/.pth.tar (torch), .npz or
  .safetensors.

  Raises CheckpointNotFoundError (a FileNotFoundError) for a missing file and
  CheckpointError for one it cannot read.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointNotFoundError(f"no checkpoint file at {path!r}")
  ext = file_extension(path)
  if ext not in STATE_DICT_EXTENSIONS:
    raise CheckpointError(f"unknown checkpoint format {ext!r} for {path!r}: expected one of "
                          f"{', '.join(STATE_DICT_EXTENSIONS)}")
  try:
    raw = _read_checkpoint_file(path, ext)
  except CheckpointError:
    raise
  except (ValueError, KeyError, EOFError, OSError, RuntimeError, pickle.UnpicklingError,
          zipfile.BadZipFile) as e:
    raise CheckpointError(f"cannot read {path!r}: {type(e).__name__}: {e}") from e
  if not isinstance(raw, Mapping):
    raise CheckpointError(f"{path!r} holds {torch_pickle.describe(raw)}, not a state dict "
                          f"(parameter names to tensors): save model.state_dict()")
  state = unwrap_state_dict(raw, ema=ema)
  if state and not any(isinstance(v, np.ndarray) or hasattr(v, "detach")
                       for v in state.values()):
    keys = ", ".join(sorted(map(str, state))[:8]) + (", ..." if len(state) > 8 else "")
    raise CheckpointError(f"{path} holds no weights: no tensor under its keys ({keys}); "
                          f"expected a state dict, plain or under one of {WRAPPER_KEYS}")
  return {k: _to_numpy(v) for k, v in state.items()}


# ----------------------------------------------------------------------------- conversion


def _backbone(cfg):
  return models.get(cfg.arch)


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
  """PyTorch names and shapes of every parameter (and state buffer) of the config's model."""
  cfg = model_config(config)
  return _backbone(cfg).torch_shapes(cfg)


def torch_to_variables(state_dict: Mapping[str, Any], config: Any, *, dtype=None, seed: int = 0,
                       adapt: bool = True, allow_unexpected: bool = False,
                       source: str = "checkpoint") -> dict:
  """Flax variables ({'params': ..., and state collections such as 'batch_stats'}, nested
  dicts of numpy arrays) from a PyTorch state dict.

  config: the full config (with .model) or a backbone config. dtype: of the params (default
  model.param_dtype). With adapt (the default), differences in image size (position
  embedding, resized) and class count (head, re-initialised) are adapted with a warning;
  any other mismatch, and those too without adapt, raises CheckpointMismatchError listing
  them all.
  """
  cfg = model_config(config)
  backbone = _backbone(cfg)
  dtype = np.dtype(dtype or cfg.param_dtype)
  state = unwrap_state_dict(state_dict) if any(
      k in state_dict and isinstance(state_dict[k], Mapping) for k in WRAPPER_KEYS) else state_dict
  state = {k: _to_numpy(v) for k, v in state.items()}
  # BatchNorm's counter of batches has no use here.
  state = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
  state = backbone.rename_state_dict(cfg, state)
  want = backbone.torch_shapes(cfg)
  backbone.check_state_dict(cfg, {k: tuple(np.shape(v)) for k, v in state.items()}, source)
  rng = np.random.default_rng(seed)

  # Old timm checkpoints store patch-embedding convolutions as linear layers.
  for name, shape in want.items():
    value = state.get(name)
    if value is not None and len(shape) == 4 and value.ndim == 2 and \
        value.size == math.prod(shape):
      state[name] = value.reshape(shape)

  pos_name = backbone.POS_EMBED
  pos = state.get(pos_name) if pos_name else None
  if pos is not None and backbone.pos_embed_prefix(cfg) == 0 and "cls_token" in want:
    # A position embedding with an entry for the class token, for a model that has none
    # there (timm's no_embed_class; DINOv2's own files): folded into the class token.
    folded, cls = fold_class_position(pos, state.get("cls_token"))
    if folded is not pos:
      logger.info("folding the class token's position embedding into the class token")
      state[pos_name], pos = folded, folded
      if cls is not None:
        state["cls_token"] = cls
  if adapt and pos is not None and pos.ndim == 3 and pos.shape[1] != want[pos_name][1] \
      and pos.shape[2] == want[pos_name][2]:
    logger.warning("resizing %s from %d to %d tokens (bicubic)", pos_name, pos.shape[1],
                   want[pos_name][1])
    state[pos_name] = resize_pos_embed(pos, want[pos_name][1], backbone.pos_embed_prefix(cfg))

  heads = backbone.HEAD if isinstance(backbone.HEAD, tuple) else (backbone.HEAD,)
  for head in [h for h in heads if h]:
    head_w = state.get(f"{head}.weight")
    if adapt and head_w is not None and tuple(head_w.shape) != want[f"{head}.weight"] \
        and head_w.ndim == 2 and head_w.shape[1] == want[f"{head}.weight"][1]:
      shape = want[f"{head}.weight"]
      if head in backbone.EVAL_ONLY:
        # Training will not train it: zeros, so that it adds nothing to the logits.
        logger.warning("dropping the checkpoint's %s (%d classes): the config has %d "
                       "classes; it is set to zero (training does not train it)", head,
                       head_w.shape[0], cfg.num_classes)
        state[f"{head}.weight"] = np.zeros(shape)
      else:
        logger.warning("dropping the checkpoint's %s (%d classes): the config has %d "
                       "classes; the %s is initialised afresh", head, head_w.shape[0],
                       cfg.num_classes, head)
        state[f"{head}.weight"] = (rng.standard_normal(shape) * 0.02).clip(-0.04, 0.04)
      state[f"{head}.bias"] = np.zeros(want[f"{head}.bias"])

  missing = [name for name in want if name not in state]
  unexpected = [name for name in state if name not in want]
  wrong = [(name, state[name].shape, shape) for name, shape in want.items()
           if name in state and tuple(state[name].shape) != shape]
  if unexpected and allow_unexpected and not (missing or wrong):
    logger.warning("ignoring %d unexpected weights: %s", len(unexpected), ", ".join(unexpected))
    unexpected = []
  if missing or unexpected or wrong:
    raise CheckpointMismatchError(missing, unexpected, wrong, source)

  flat = {}
  for name in want:
    collection, path = backbone.flax_path(name)
    flat[(collection,) + path] = np.asarray(backbone.to_flax_layout(name, state[name]), dtype)
  return traverse_util.unflatten_dict(flat)


def file_to_variables(path: str, config: Any, *, ema: bool = False, adapt: bool = True,
                      allow_unexpected: bool = False, kind: str = "auto") -> dict:
  """Flax variables for `config` from a checkpoint file of any kind this package reads: a
  PyTorch-named state dict (.pth/.pt/.bin/.ckpt, .npz, .safetensors) or a big_vision /
  vision_transformer .npz ('FILE.npz', or 'FILE.npz:SUBTREE' for a sub-tree such as a
  SigLIP image encoder; ``mctf_jax.convert.big_vision``).

  kind: 'auto' tells the two kinds of .npz apart by their keys; 'torch' or 'big_vision'
  insists on one. adapt and allow_unexpected as in ``torch_to_variables``. A file with no
  parameter of the model's is a one-line CheckpointError.
  """
  if kind not in ("auto", "torch", "big_vision"):
    raise ValueError(f"kind must be 'auto', 'torch' or 'big_vision', got {kind!r}")
  path = os.fspath(path)
  if kind == "big_vision" or (kind == "auto" and big_vision.is_big_vision_file(path)):
    if ema:
      raise CheckpointError(f"{path} is a big_vision checkpoint, which holds no EMA weights "
                            f"to select (drop --ema)")
    state = big_vision.load_state_dict(path, config, adapt=adapt,
                                       allow_unexpected=allow_unexpected)
    return torch_to_variables(state, config, adapt=adapt, source=path)
  state = load_state_dict(path, ema=ema)
  cfg = model_config(config)
  want = expected_shapes(cfg)
  if state and not any(name in want for name in state):
    names = ", ".join(sorted(state)[:8]) + (", ..." if len(state) > 8 else "")
    raise CheckpointError(
        f"{path} is not a checkpoint of a {cfg.arch!r} model: none of its {len(state)} "
        f"arrays ({names}) is one of the model's parameters, in PyTorch names "
        f"({next(iter(want))}, ...) or, for .npz, big_vision's (embedding/kernel, "
        f"Transformer/encoderblock_0/...)")
  return torch_to_variables(state, config, adapt=adapt, allow_unexpected=allow_unexpected,
                            source=path)


def torch_to_flax(state_dict: Mapping[str, Any], config: Any, **kwargs) -> dict:
  """The params of ``torch_to_variables`` (a model with state: use that function)."""
  return torch_to_variables(state_dict, config, **kwargs)["params"]


def flax_to_torch(params: Mapping, config: Any = None, *,
                  model_state: Mapping | None = None) -> dict[str, np.ndarray]:
  """A PyTorch-layout state dict (numpy arrays) from Flax params (and the model's state
  collections); inverse of ``torch_to_variables``. config: names the backbone (default DeiT)."""
  backbone = _backbone(model_config(config)) if config is not None else models.DeiT
  out = {}
  trees = {"params": params, **(model_state or {})}
  for path, value in traverse_util.flatten_dict(trees).items():
    name = backbone.torch_name(path[0], path[1:])
    out[name] = np.ascontiguousarray(backbone.to_torch_layout(name, np.asarray(value)))
  return out
