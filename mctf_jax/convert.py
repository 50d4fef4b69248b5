"""PyTorch (timm / DeiT / MCTF naming) state dicts to Flax parameters, and back.

    params = mctf_jax.convert.torch_to_flax(state_dict, config)
    state_dict = mctf_jax.convert.flax_to_torch(params)

A state dict may be plain or wrapped like the official checkpoints ({'model': ...}), hold
torch tensors or numpy arrays, and come from a ``.pth``, ``.npz`` or ``.safetensors`` file
(``load_state_dict``). ``.pth`` files, in the zip format and the legacy pre-1.6 one, are read
without PyTorch (``mctf_jax.torch_pickle``). Names map one to one: ``blocks.3.attn.qkv.weight``
(out, in) is ``params['blocks_3']['attn']['qkv']['kernel']`` (in, out); conv kernels go from
(O, I, kh, kw) to (kh, kw, I, O); LayerNorm ``weight`` is ``scale``.

If the image size differs, the position embedding is resized like DeiT's fine-tuning code
(bicubic, align_corners=False, class token kept). If the class count differs, the head is
dropped with a warning and freshly initialised. Every other mismatch (missing, unexpected or
wrongly shaped weights) raises ``CheckpointMismatchError`` listing all of them.

Command line (writes an Orbax checkpoint that train.py and eval.py load)::

    python -m mctf_jax.convert --config=configs/deit_s.py --torch=deit_small.pth --out=DIR
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

from mctf_jax.config import ConfigError, ModelConfig, model_config

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict", "module")
EMA_WRAPPER_KEYS = ("model_ema", "state_dict_ema", "ema")


class CheckpointError(ValueError):
  """A checkpoint that cannot be read, or whose weights do not fit the model."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint whose weights do not fit the model; lists every problem at once."""

  def __init__(self, missing=(), unexpected=(), wrong_shape=(), source: str = "checkpoint"):
    self.missing, self.unexpected, self.wrong_shape = list(missing), list(unexpected), list(
        wrong_shape)
    lines = [f"{source} does not fit the model config:"]
    if self.missing:
      lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
    if self.unexpected:
      lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
    for name, got, want in self.wrong_shape:
      lines.append(f"  wrong shape: {name} is {tuple(got)}, the config needs {tuple(want)}")
    super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------- naming


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Torch names and shapes of every parameter of the model, in timm layout."""
  d, hidden, p = cfg.embed_dim, cfg.mlp_dim, cfg.patch_size
  shapes = {
      "cls_token": (1, 1, d),
      "pos_embed": (1, cfg.num_tokens, d),
      "patch_embed.proj.weight": (d, cfg.in_chans, p, p),
      "patch_embed.proj.bias": (d,),
  }
  for i in range(cfg.depth):
    b = f"blocks.{i}."
    shapes.update({
        b + "norm1.weight": (d,), b + "norm1.bias": (d,),
        b + "attn.qkv.weight": (3 * d, d),
        b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
        b + "norm2.weight": (d,), b + "norm2.bias": (d,),
        b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
        b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,),
    })
    if cfg.qkv_bias:
      shapes[b + "attn.qkv.bias"] = (3 * d,)
  shapes.update({"norm.weight": (d,), "norm.bias": (d,),
                 "head.weight": (cfg.num_classes, d), "head.bias": (cfg.num_classes,)})
  return shapes


def _flax_path(torch_name: str) -> tuple[str, ...]:
  parts = torch_name.split(".")
  path = []
  i = 0
  while i < len(parts):
    if parts[i] == "blocks":
      path.append(f"blocks_{parts[i + 1]}")
      i += 2
      continue
    path.append(parts[i])
    i += 1
  if path[-1] == "weight":
    path[-1] = "scale" if path[-2].startswith("norm") else "kernel"
  return tuple(path)


def _torch_name(flax_path: tuple[str, ...]) -> str:
  parts = []
  for part in flax_path:
    if part.startswith("blocks_"):
      parts += ["blocks", part[len("blocks_"):]]
    elif part in ("kernel", "scale"):
      parts.append("weight")
    else:
      parts.append(part)
  return ".".join(parts)


def _to_flax_layout(name: str, value: np.ndarray) -> np.ndarray:
  if name.endswith(".weight") and value.ndim == 4:   # conv (O, I, kh, kw) -> (kh, kw, I, O)
    return value.transpose(2, 3, 1, 0)
  if name.endswith(".weight") and value.ndim == 2:   # linear (out, in) -> (in, out)
    return value.T
  return value


def _to_torch_layout(name: str, value: np.ndarray) -> np.ndarray:
  if name.endswith(".weight") and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if name.endswith(".weight") and value.ndim == 2:
    return value.T
  return value


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
TORCH_FILE_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")
STATE_DICT_EXTENSIONS = TORCH_FILE_EXTENSIONS + (".npz", ".safetensors")


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
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
      return load_file(path)
    except SafetensorError as e:
      raise CheckpointError(f"cannot read {path!r}: {e}") from e
  from mctf_jax import torch_pickle
  try:
    return torch_pickle.load(path)  # no torch needed, and no code from the file is run
  except torch_pickle.FormatError as e:
    raise CheckpointError(str(e)) from e


def load_state_dict(path: str, ema: bool = False) -> dict[str, np.ndarray]:
  """Reads a PyTorch-style state dict from .pth/.pt/.bin (torch), .npz or .safetensors.

  Raises FileNotFoundError for a missing file and CheckpointError for one it cannot read.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path!r}")
  ext = os.path.splitext(path)[1].lower()
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
    from mctf_jax import torch_pickle
    raise CheckpointError(f"{path!r} holds {torch_pickle.describe(raw)}, not a state dict "
                          f"(parameter names to tensors): save model.state_dict()")
  state = unwrap_state_dict(raw, ema=ema)
  return {k: _to_numpy(v) for k, v in state.items()}


# ----------------------------------------------------------------------------- resizing


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights (PyTorch's a=-0.75) for offsets t in [0, 1)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):   # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_axis(x: np.ndarray, axis: int, out: int) -> np.ndarray:
  n = x.shape[axis]
  scale = n / out
  src = (np.arange(out) + 0.5) * scale - 0.5
  base = np.floor(src).astype(np.int64)
  weights = _cubic_weights(src - base)                       # (out, 4)
  idx = np.clip(base[:, None] + np.arange(-1, 3)[None], 0, n - 1)  # (out, 4)
  x = np.moveaxis(x, axis, 0)
  y = np.einsum("ok,ok...->o...", weights, x[idx])
  return np.moveaxis(y, 0, axis)


def resize_pos_embed(pos_embed: np.ndarray, num_tokens: int, num_prefix: int = 1) -> np.ndarray:
  """Bicubic resize of a (1, prefix + g*g, C) position embedding to num_tokens tokens.

  Matches torch.nn.functional.interpolate(mode='bicubic', align_corners=False), as DeiT's
  fine-tuning code does; the class token's embedding is kept.
  """
  prefix, grid = pos_embed[:, :num_prefix], pos_embed[0, num_prefix:]
  old = int(round(math.sqrt(grid.shape[0])))
  new = int(round(math.sqrt(num_tokens - num_prefix)))
  if old * old != grid.shape[0] or new * new != num_tokens - num_prefix:
    raise CheckpointError(f"cannot resize a position embedding of {pos_embed.shape[1]} tokens "
                          f"to {num_tokens}: both grids must be square")
  grid = grid.reshape(old, old, -1).astype(np.float64)
  grid = _resize_axis(_resize_axis(grid, 0, new), 1, new)
  grid = grid.reshape(1, new * new, -1).astype(pos_embed.dtype)
  return np.concatenate([prefix, grid], axis=1)


# ----------------------------------------------------------------------------- conversion


def _set(tree: dict, path: tuple[str, ...], value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _flatten(tree: Mapping, prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def torch_to_flax(state_dict: Mapping[str, Any], config: Any, *, dtype=None, seed: int = 0,
                  adapt: bool = True, allow_unexpected: bool = False,
                  source: str = "checkpoint") -> dict:
  """Flax params (nested dict of numpy arrays) from a PyTorch state dict.

  config: the full config (with .model) or a ModelConfig. dtype: of the params (default
  model.param_dtype). With adapt (the default), differences in image size (position
  embedding, resized) and class count (head, re-initialised) are adapted with a warning;
  any other mismatch, and those too without adapt, raises CheckpointMismatchError listing
  them all.
  """
  cfg = model_config(config)
  dtype = np.dtype(dtype or cfg.param_dtype)
  state = unwrap_state_dict(state_dict) if any(
      k in state_dict and isinstance(state_dict[k], Mapping) for k in WRAPPER_KEYS) else state_dict
  state = {k: _to_numpy(v) for k, v in state.items()}
  want = expected_shapes(cfg)
  rng = np.random.default_rng(seed)

  # Old timm checkpoints store the patch embedding as a linear layer.
  pe = state.get("patch_embed.proj.weight")
  if pe is not None and pe.ndim == 2 and pe.size == math.prod(want["patch_embed.proj.weight"]):
    state["patch_embed.proj.weight"] = pe.reshape(want["patch_embed.proj.weight"])

  pos = state.get("pos_embed")
  if adapt and pos is not None and pos.ndim == 3 and pos.shape[1] != want["pos_embed"][1] \
      and pos.shape[2] == want["pos_embed"][2]:
    logger.warning("resizing pos_embed from %d to %d tokens (bicubic)", pos.shape[1],
                   want["pos_embed"][1])
    state["pos_embed"] = resize_pos_embed(pos, want["pos_embed"][1])

  head_w = state.get("head.weight")
  if adapt and head_w is not None and tuple(head_w.shape) != want["head.weight"] \
      and head_w.ndim == 2 and head_w.shape[1] == cfg.embed_dim:
    logger.warning("dropping the checkpoint's head (%d classes): the config has %d classes; "
                   "the head is initialised afresh", head_w.shape[0], cfg.num_classes)
    state["head.weight"] = (rng.standard_normal(want["head.weight"]) * 0.02).clip(-0.04, 0.04)
    state["head.bias"] = np.zeros(want["head.bias"])

  missing = [name for name in want if name not in state]
  unexpected = [name for name in state if name not in want]
  wrong = [(name, state[name].shape, shape) for name, shape in want.items()
           if name in state and tuple(state[name].shape) != shape]
  if unexpected and allow_unexpected and not (missing or wrong):
    logger.warning("ignoring %d unexpected weights: %s", len(unexpected), ", ".join(unexpected))
    unexpected = []
  if missing or unexpected or wrong:
    raise CheckpointMismatchError(missing, unexpected, wrong, source)

  params: dict = {}
  for name in want:
    _set(params, _flax_path(name), np.asarray(_to_flax_layout(name, state[name]), dtype))
  return params


def flax_to_torch(params: Mapping) -> dict[str, np.ndarray]:
  """A timm-layout state dict (numpy arrays) from Flax params; inverse of torch_to_flax."""
  out = {}
  for path, value in _flatten(params).items():
    name = _torch_name(path)
    out[name] = np.ascontiguousarray(_to_torch_layout(name, np.asarray(value)))
  return out


# ----------------------------------------------------------------------------- CLI


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  from mctf_jax import checkpoint

  flags_ = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Model config file (e.g. configs/deit_s.py).")
  flags.DEFINE_string("torch", None, "PyTorch checkpoint: .pth, .npz or .safetensors, "
                      "timm/DeiT/MCTF naming.")
  flags.DEFINE_string("out", None, "Output directory for the Orbax checkpoint.")
  flags.DEFINE_bool("ema", False, "Take the EMA weights ('model_ema') of the checkpoint.")
  flags.DEFINE_bool("allow_unexpected", False, "Ignore weights the model does not have.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
  flags.mark_flags_as_required(["config", "torch", "out"])

  def run(_):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = flags_.config
    try:
      checkpoint.check_save_target(flags_.out, overwrite=flags_.overwrite)  # before reading
      state = load_state_dict(flags_.torch, ema=flags_.ema)
      params = torch_to_flax(state, config, allow_unexpected=flags_.allow_unexpected,
                             source=flags_.torch)
      n = sum(v.size for v in _flatten(params).values())
      path = checkpoint.save_params(flags_.out, params, config, overwrite=flags_.overwrite)
    except (CheckpointError, ConfigError, OSError) as e:   # OSError: FileNotFoundError, ...
      raise app.UsageError(str(e))
    print(f"converted {flags_.torch} ({n:,} parameters) -> {path}")

  app.run(run, argv=argv)


if __name__ == "__main__":
  main()
