"""Resizing a position embedding to another patch grid: bicubic as timm and DeiT's
fine-tuning code, or linear as big_vision and vision_transformer."""

from __future__ import annotations

import math

import numpy as np

from mctf_jax.errors import CheckpointError


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


def _linear_axis(x: np.ndarray, axis: int, out: int) -> np.ndarray:
  """Linear interpolation along `axis` with corners on corners: output j samples input
  coordinate j (n - 1) / (out - 1) (``scipy.ndimage.zoom`` of order 1)."""
  n = x.shape[axis]
  src = np.arange(out) * ((n - 1) / (out - 1)) if n > 1 and out > 1 else np.zeros(out)
  low = np.minimum(np.floor(src).astype(np.int64), n - 1)
  high = np.minimum(low + 1, n - 1)
  frac = (src - low).reshape((out,) + (1,) * (x.ndim - 1))
  x = np.moveaxis(x, axis, 0)
  return np.moveaxis(x[low] * (1 - frac) + x[high] * frac, 0, axis)


POS_EMBED_RESIZES = {"bicubic": _resize_axis, "linear": _linear_axis}


def resize_pos_embed(pos_embed: np.ndarray, num_tokens: int, num_prefix: int = 1,
                     method: str = "bicubic") -> np.ndarray:
  """Resize of a (1, prefix + g*g, C) position embedding to num_tokens tokens, in float64,
  returned in its dtype; the prefix (class token) entries are kept.

  'bicubic' matches torch.nn.functional.interpolate(mode='bicubic', align_corners=False),
  as DeiT's fine-tuning code does; 'linear' big_vision's ``resample_posemb``
  (``scipy.ndimage.zoom(order=1)``, corners on corners).
  """
  resize_axis = POS_EMBED_RESIZES[method]
  prefix, grid = pos_embed[:, :num_prefix], pos_embed[0, num_prefix:]
  old = math.isqrt(grid.shape[0])
  new = math.isqrt(max(num_tokens - num_prefix, 0))
  if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or old * old != grid.shape[0] \
      or new * new != num_tokens - num_prefix:
    raise CheckpointError(f"cannot resize a position embedding of shape {pos_embed.shape} "
                          f"to {num_tokens} tokens: expected (1, {num_prefix} + g*g, C) and "
                          f"square grids")
  grid = grid.reshape(old, old, -1).astype(np.float64)
  grid = resize_axis(resize_axis(grid, 0, new), 1, new)
  grid = grid.reshape(1, new * new, -1).astype(pos_embed.dtype)
  return np.concatenate([prefix, grid], axis=1)


def fold_class_position(pos_embed: np.ndarray, cls_token: np.ndarray | None):
  """(pos_embed, cls_token) with the class token's entry of a position embedding of
  g*g + 1 entries (a layout where the class token got one) added to the class token (or
  dropped without one), the patches' g*g entries left; any other embedding is returned as
  it is. Both are added to the tokens before the blocks, so the model computes the same."""
  if pos_embed.ndim != 3:
    return pos_embed, cls_token
  n = pos_embed.shape[1]
  if math.isqrt(n) ** 2 == n or math.isqrt(n - 1) ** 2 != n - 1:
    return pos_embed, cls_token
  if cls_token is not None:
    cls_token = (cls_token.astype(np.float64) + pos_embed[:, :1]).astype(cls_token.dtype)
  return pos_embed[:, 1:], cls_token
