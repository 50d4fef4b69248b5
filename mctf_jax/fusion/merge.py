"""Merging along a ``Matching``: tokens, sizes, the one-step-ahead attention, source maps.

Shapes are in the names: B batch, T tokens in, O tokens out, R moved tokens, C channels,
H heads, d head width, N initial tokens. Pure functions of arrays; nothing here knows a
model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from mctf_jax.fusion.matching import Matching
from mctf_jax.fusion.scopes import fusion_scope, part_scope, scoped


def _take_tokens(x_BxTxF, idx_BxK):
  """x[b, idx[b, k]] for token-major arrays of any trailing shape."""
  idx = idx_BxK.reshape(idx_BxK.shape + (1,) * (x_BxTxF.ndim - 2))
  return jnp.take_along_axis(x_BxTxF, idx, axis=1)


def merge_sum(x_BxTxF, match: Matching, impl: str = "scatter"):
  """Sum of the tokens fused into each output token: (B, T, ...) -> (B, O, ...).

  impl 'scatter' gathers the O anchor rows and adds the r moved rows with a scatter-add;
  'matmul' multiplies by the one-hot (T, O) matrix of the destinations (``dest_onehot``):
  no gather or scatter, MXU products on TPU.
  """
  if impl == "matmul":
    return dense_merge(dest_onehot(match), x_BxTxF).astype(x_BxTxF.dtype)
  out = _take_tokens(x_BxTxF, match.anchor_BxO)
  if match.moved_BxR.shape[1] == 0:
    return out
  moved = _take_tokens(x_BxTxF, match.moved_BxR)
  rows = jnp.arange(out.shape[0])[:, None]
  return out.at[rows, match.moved_dest_BxR].add(moved)


def dest_onehot(match: Matching, dtype=jnp.float32) -> jax.Array:
  """(B, T, O) 0/1: [b, t, o] = 1 where input token t is fused into output token o."""
  return (match.dest_BxT[:, :, None] ==
          jnp.arange(match.num_out, dtype=match.dest_BxT.dtype)[None, None, :]).astype(dtype)


def dense_merge(onehot_BxTxO: jax.Array, x_BxTxF: jax.Array, scale_BxT: jax.Array | None = None,
                dtype=None) -> jax.Array:
  """sum_t onehot[b, t, o] scale[b, t] x[b, t, ...] -> (B, O, ...), as one product with the
  0/1 matrix, accumulated in float32 at least.

  The rows are scaled in float32 (at least) and rounded once to `dtype` (default: x's),
  then summed exactly: in one bfloat16 pass on a TPU for 16-bit rows, at
  Precision.HIGHEST for float32 rows (CPUs and GPUs multiply float32 and float64 exactly
  whatever the setting).
  """
  dtype = jnp.dtype(x_BxTxF.dtype if dtype is None else dtype)
  if scale_BxT is not None:
    acc = jnp.promote_types(x_BxTxF.dtype, jnp.float32)
    scale = scale_BxT.reshape(scale_BxT.shape + (1,) * (x_BxTxF.ndim - 2)).astype(acc)
    x_BxTxF = x_BxTxF.astype(acc) * scale
  flat = x_BxTxF.astype(dtype).reshape(x_BxTxF.shape[:2] + (-1,))
  out = _onehot_product("bto,btf->bof", onehot_BxTxO, flat)
  return out.reshape(out.shape[:2] + x_BxTxF.shape[2:])


def keep_token_major(x_BxOxC: jax.Array) -> jax.Array:
  """x, stored token-major ((O, B, C) in memory), as the unfused blocks' tokens are on a TPU.

  A product batched over the images comes out image-major; left so, the TPU compiler keeps
  every later block image-major too, where it can no longer fold the layer norms into the
  matrix products that read them and writes each normalised copy out (three per block).
  Compiled for v5e, the MCTF DeiT-S r=16 forward: 16% fewer bytes accessed and a 10% lower
  time estimate; a train step, whose gradients then carry the same constraint, needs more
  (docs/speed.md), so the exact blocks ask for it at inference only. Values are unchanged.
  """
  return with_layout_constraint(x_BxOxC, Layout(major_to_minor=(1, 0, 2)))


def _onehot_product(spec: str, onehot, x: jax.Array) -> jax.Array:
  """einsum(spec, onehot, x) with a 0/1 matrix, exact: one pass for 16-bit x (float32
  out), Precision.HIGHEST for float32 x (TPUs would otherwise round x to bfloat16)."""
  if jnp.dtype(x.dtype).itemsize <= 2:
    return jnp.einsum(spec, onehot.astype(x.dtype), x, preferred_element_type=jnp.float32)
  return jnp.einsum(spec, onehot.astype(x.dtype), x, precision=jax.lax.Precision.HIGHEST)


def _select_values(onehot_BxTxO: jax.Array, v_BxHxOxd: jax.Array) -> jax.Array:
  """v[b, h, dest[b, t]] as a product with the one-hot (T, O) matrix: (B, H, T, d), exact."""
  return _onehot_product("bto,bhod->bhtd", onehot_BxTxO, v_BxHxOxd).astype(v_BxHxOxd.dtype)


def pooling_scale(onehot_BxTxO: jax.Array, weights_BxT: jax.Array, norm_BxO: jax.Array):
  """(B, T): each input token's weight over its output token's normaliser, the factor it
  enters its weighted average with (each token has one destination, so the average is
  ``dense_merge(onehot, x, scale)``). Zero normalisers (padding outputs) count as one."""
  norm = jnp.where(norm_BxO > 0, norm_BxO, 1).astype(weights_BxT.dtype)
  return weights_BxT / jnp.sum(onehot_BxTxO.astype(norm.dtype) * norm[:, None, :], axis=-1)


def merge_max(x_BxTxF, match: Matching):
  """Element-wise max of the tokens fused into each output token."""
  out = _take_tokens(x_BxTxF, match.anchor_BxO)
  rows = jnp.arange(out.shape[0])[:, None]
  return out.at[rows, match.moved_dest_BxR].max(_take_tokens(x_BxTxF, match.moved_BxR))


def pooling_weights(pooling: str, size_BxT: jax.Array,
                    attn_received_BxT: jax.Array | None) -> jax.Array | None:
  """Weight of each token in the average that fuses it (None for max pooling).

  'size': the token size (a fused token stands for size patches); 'attn': attention
  received times size / max(size); 'mean': one; 'max': no average.
  """
  if pooling == "size":
    return size_BxT
  if pooling == "mean":
    return jnp.ones_like(size_BxT)
  if pooling == "attn":
    if attn_received_BxT is None:
      raise ValueError("pooling='attn' needs the attention map of the block")
    size_max = jnp.max(size_BxT, axis=-1, keepdims=True)
    return jax.lax.stop_gradient(attn_received_BxT.astype(size_BxT.dtype)) * (size_BxT / size_max)
  if pooling == "max":
    return None
  raise ValueError(f"unknown pooling {pooling!r}")


@scoped("merge")
def fuse_tokens(x_BxTxC: jax.Array, size_BxT: jax.Array, match: Matching, *,
                pooling: str = "size", attn_received_BxT: jax.Array | None = None,
                impl: str = "scatter", token_major: bool = False):
  """Fuses tokens as `match` says.

  token_major: with impl 'matmul', keep the fused tokens token-major in memory
  (``keep_token_major``): leaner forward programs on TPUs, costlier train steps.

  Returns (x_BxOxC, size_BxO, weights_BxT, norm_BxO): the fused tokens, their sizes (sum
  of the sizes fused), and the weights and normalisers of the average (None for max
  pooling), which ``merged_attention_output`` reuses for the query rows of the attention.
  """
  size_BxT = jax.lax.stop_gradient(size_BxT)
  weights_BxT = pooling_weights(pooling, size_BxT, attn_received_BxT)
  if weights_BxT is not None:
    weights_BxT = jax.lax.stop_gradient(weights_BxT)
  if impl == "matmul" and weights_BxT is not None:
    # Sizes and normalisers as masked sums over the inputs (exact), the average as one
    # product with the destinations' 0/1 matrix. Padding (size 0) weighs nothing.
    weights_BxT = jnp.where(size_BxT > 0, weights_BxT, 0)
    onehot_BxTxO = dest_onehot(match, size_BxT.dtype)
    size_BxO = jnp.sum(onehot_BxTxO * size_BxT[:, :, None], axis=1)
    norm_BxO = size_BxO if pooling == "size" else jnp.sum(
        onehot_BxTxO * weights_BxT[:, :, None].astype(size_BxT.dtype), axis=1)
    scale_BxT = pooling_scale(onehot_BxTxO, weights_BxT, norm_BxO)
    x_BxOxC = dense_merge(onehot_BxTxO, x_BxTxC, scale_BxT).astype(x_BxTxC.dtype)
    if token_major:
      x_BxOxC = keep_token_major(x_BxOxC)
    return x_BxOxC, size_BxO, weights_BxT, norm_BxO
  size_BxO = merge_sum(size_BxT, match, impl)
  if weights_BxT is None:
    return merge_max(x_BxTxC, match), size_BxO, None, None
  norm_BxO = size_BxO if pooling == "size" else merge_sum(weights_BxT, match, impl)
  # Accumulate in float32 at least, whatever the compute dtype.
  acc = jnp.promote_types(x_BxTxC.dtype, jnp.float32)
  weighted = x_BxTxC.astype(acc) * weights_BxT[..., None].astype(acc)
  x_BxOxC = merge_sum(weighted, match, impl) / norm_BxO[..., None].astype(acc)
  return x_BxOxC.astype(x_BxTxC.dtype), size_BxO, weights_BxT, norm_BxO


def attend(probs_BxHxTxT: jax.Array, v_BxHxTxd: jax.Array) -> jax.Array:
  """probs @ v per head, returned token-major (B, T, H, d) for the output projection."""
  with part_scope("probs_v"):
    out = jnp.einsum("bhqk,bhkd->bhqd", probs_BxHxTxT.astype(v_BxHxTxd.dtype), v_BxHxTxd,
                     preferred_element_type=jnp.promote_types(v_BxHxTxd.dtype, jnp.float32))
    return out.transpose(0, 2, 1, 3)


def merged_attention_output(probs_BxHxTxT: jax.Array, v_BxHxOxd: jax.Array, match: Matching,
                            weights_BxT: jax.Array | None, norm_BxO: jax.Array | None, *,
                            impl: str = "scatter") -> jax.Array:
  """One-step-ahead attention: the fused tokens attend with the merged attention map.

  The reference merges the map itself: it sums the key columns of each group, then pools
  the query rows of each group as the tokens were pooled, and multiplies the (O, O) result
  by the values of the fused tokens. For the averaging poolings that product equals
    pool_rows(probs @ v[dest]),
  since summing key columns against v equals gathering v back to the unfused keys. This
  form never builds the merged map (no (T, T) scatter) and costs one ordinary attention
  product. Max pooling is not linear in the rows, so it merges the map explicitly.

  v_BxHxOxd: the values of the fused tokens, head-major.
  Returns the attention output of the fused tokens, token-major (B, O, H, d).
  """
  dtype = v_BxHxOxd.dtype
  if weights_BxT is None:  # max pooling: merge the map, then attend
    with fusion_scope("attn_merge"):
      return _merged_map_output(probs_BxHxTxT.astype(dtype), v_BxHxOxd, match, impl)
  if impl == "matmul":
    # The gather of v and the pooling of the rows as products with the (T, O) matrices;
    # the rows are pooled in the compute dtype (the result is cast to it anyway).
    with fusion_scope("attn_merge"):
      onehot_BxTxO = dest_onehot(match, weights_BxT.dtype)
      v_back_BxHxTxd = _select_values(onehot_BxTxO, v_BxHxOxd)
    out_BxTxHxd = attend(probs_BxHxTxT, v_back_BxHxTxd)
    with fusion_scope("attn_merge"):
      scale_BxT = pooling_scale(onehot_BxTxO, weights_BxT, norm_BxO)
      return dense_merge(onehot_BxTxO, out_BxTxHxd, scale_BxT, dtype).astype(dtype)
  acc = jnp.promote_types(dtype, jnp.float32)
  with fusion_scope("attn_merge"):
    v_back_BxHxTxd = jnp.take_along_axis(v_BxHxOxd, match.dest_BxT[:, None, :, None], axis=2)
  out_BxTxHxd = attend(probs_BxHxTxT, v_back_BxHxTxd)
  with fusion_scope("attn_merge"):
    weighted = out_BxTxHxd * weights_BxT[:, :, None, None].astype(acc)
    out = merge_sum(weighted, match, impl) / norm_BxO[:, :, None, None].astype(acc)
  return out.astype(dtype)


def _merged_map_output(probs_BxHxTxT, v_BxHxOxd, match: Matching, impl: str):
  """Max pooling: sum the key columns per group, take the max over the query rows per
  group, then attend with the (O, O) map."""
  cols_BxHxTxO = jnp.moveaxis(merge_sum(jnp.moveaxis(probs_BxHxTxT, 3, 1), match, impl), 1, 3)
  merged_BxHxOxO = jnp.moveaxis(merge_max(jnp.moveaxis(cols_BxHxTxO, 2, 1), match), 1, 2)
  return attend(merged_BxHxOxO, v_BxHxOxd)


@scoped("merge")
def update_token_map(token_map_BxN: jax.Array, dest_BxT: jax.Array) -> jax.Array:
  """Follows each initial token to the token that now holds it."""
  return jnp.take_along_axis(dest_BxT, token_map_BxN, axis=-1)


def source_map(token_map_BxN: jax.Array, num_tokens: int, dtype=jnp.float32) -> jax.Array:
  """(B, T, N) 0/1 map: source[b, t, n] = 1 when token t holds initial token n."""
  return (token_map_BxN[:, None, :] == jnp.arange(num_tokens)[None, :, None]).astype(dtype)
