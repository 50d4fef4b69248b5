"""Multi-criteria token fusion as pure functions on arrays (no Flax in here).

One fusion step turns T_in tokens into T_out = T_in - r tokens:

1. ``matching_scores``: a bipartite score matrix between the even tokens (set A, which
   holds the class token) and the odd tokens (set B), the product of three criteria:
   similarity, informativeness (attention received) and size.
2. ``bipartite_matching``: bidirectional (or one-directional) bipartite soft matching on
   those scores. Its result is one integer per input token, ``dest_BxT``: the output token
   it is fused into. This single map describes the whole step; the output order is the
   reference's ``[unmerged A in original order, remaining B by descending score]``.
3. ``fuse_tokens``: pooling of the tokens (and their sizes) along ``dest_BxT``.
4. ``merged_attention_output``: one-step-ahead attention, the attention of the fused
   tokens computed from the attention map of the unfused ones.

Shapes are in the names: B batch, T tokens in, O tokens out, A/B the two halves, C channels,
H heads, d head width, N initial tokens. All sizes come from the static schedule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------- scores


def attention_received(probs_BxHxTxT: jax.Array) -> jax.Array:
  """Mean attention each token receives, over heads and queries: (B, T)."""
  return jnp.mean(probs_BxHxTxT.astype(jnp.float32), axis=(1, 2))


def _power(x, exponent: float):
  return x if exponent == 1 else x ** exponent


def matching_scores(metric_BxTxC: jax.Array,
                    *,
                    attn_received_BxT: jax.Array | None = None,
                    size_BxT: jax.Array | None = None,
                    tau_sim: float = 1.0,
                    tau_info: float = 20.0,
                    tau_size: float = 40.0,
                    num_protected: int = 1) -> jax.Array:
  """Scores W[i, j] between A = tokens 0, 2, 4, ... and B = tokens 1, 3, 5, ...

  W = W_sim * W_info * W_size with
    W_sim  = ((cos(a_i, b_j) + 1) / 2) ** (1 / tau_sim),
    W_info = (u_i * u_j) ** (1 / tau_info), u = 1 / attention received, u /= max(u),
    W_size = (s_i * s_j) ** (1 / tau_size), s = 1 / size, s /= max(s).
  A criterion with tau = 0, or without its input (None), is left out. Rows of the protected
  tokens (the class token) are -inf. Scores carry no gradient and are computed in at least
  float32 whatever the compute dtype, so that bf16 does not turn near-ties into ties.
  """
  dtype = jnp.promote_types(metric_BxTxC.dtype, jnp.float32)
  metric = jax.lax.stop_gradient(metric_BxTxC).astype(dtype)
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  a_BxAxC, b_BxBxC = metric[:, ::2], metric[:, 1::2]
  num_a, num_b = a_BxAxC.shape[1], b_BxBxC.shape[1]

  if tau_sim:
    cos_BxAxB = jnp.einsum("bic,bjc->bij", a_BxAxC, b_BxBxC,
                           precision=jax.lax.Precision.HIGHEST)
    scores_BxAxB = _power((cos_BxAxB + 1) / 2, 1 / tau_sim)
  else:
    scores_BxAxB = jnp.ones((metric.shape[0], num_a, num_b), dtype)

  def pair_criterion(values_BxT, tau):
    inv = 1 / jax.lax.stop_gradient(values_BxT).astype(dtype)
    inv = inv / jnp.max(inv, axis=-1, keepdims=True)
    return _power(inv[:, ::2, None] * inv[:, None, 1::2], 1 / tau)

  if tau_info > 0 and attn_received_BxT is not None:
    scores_BxAxB = scores_BxAxB * pair_criterion(attn_received_BxT, tau_info)
  if tau_size and size_BxT is not None:
    scores_BxAxB = scores_BxAxB * pair_criterion(size_BxT, tau_size)
  if num_protected:
    scores_BxAxB = scores_BxAxB.at[:, :num_protected, :].set(-jnp.inf)
  return scores_BxAxB


# ----------------------------------------------------------------------------- matching


def _descending_order(values_BxK: jax.Array) -> jax.Array:
  """Indices that sort each row by descending value (ties: lower index first)."""
  return jnp.argsort(-values_BxK, axis=-1, stable=True)


def _inverse_permutation(perm_BxK: jax.Array) -> jax.Array:
  batch, k = perm_BxK.shape
  rows = jnp.arange(batch)[:, None]
  return jnp.zeros_like(perm_BxK).at[rows, perm_BxK].set(
      jnp.broadcast_to(jnp.arange(k, dtype=perm_BxK.dtype), perm_BxK.shape))


def bipartite_matching(scores_BxAxB: jax.Array, *, r_ab: int, r_ba: int,
                       bidirectional: bool = True) -> jax.Array:
  """Which output token every input token goes to: ``dest_BxT`` (int32).

  A -> B: each A token's best B; the r_ab A tokens with the highest best score merge
  into it. B -> A (bidirectional), on the same scores restricted to the unmerged A
  tokens: each B token's best unmerged A; the r_ba B tokens with the highest best score
  merge into it (taking along whatever A tokens they received).

  Output order: the unmerged A tokens in their original order (so the class token stays
  first), then the B tokens that stay, by descending best score (bidirectional) or in
  their original order (one-directional). This order feeds the next layer's even/odd split.
  """
  batch, num_a, num_b = scores_BxAxB.shape
  rows = jnp.arange(batch)[:, None]

  best_b_BxA = jnp.argmax(scores_BxAxB, axis=-1)
  best_score_BxA = jnp.max(scores_BxAxB, axis=-1)
  merged_a = _descending_order(best_score_BxA)[:, :r_ab]
  keep_a_BxA = jnp.ones((batch, num_a), bool).at[rows, merged_a].set(False)
  # Position of each kept A token among the kept ones (original order).
  pos_a_BxA = jnp.cumsum(keep_a_BxA, axis=-1, dtype=jnp.int32) - 1
  num_kept_a = num_a - r_ab

  if bidirectional:
    scores_ba_BxAxB = jnp.where(keep_a_BxA[:, :, None], scores_BxAxB, -jnp.inf)
    best_a_BxB = jnp.argmax(scores_ba_BxAxB, axis=1)
    best_score_BxB = jnp.max(scores_ba_BxAxB, axis=1)
    rank_b_BxB = _inverse_permutation(_descending_order(best_score_BxB).astype(jnp.int32))
    dest_b_BxB = jnp.where(rank_b_BxB < r_ba,
                           jnp.take_along_axis(pos_a_BxA, best_a_BxB, axis=-1),
                           num_kept_a + rank_b_BxB - r_ba)
  else:
    dest_b_BxB = jnp.broadcast_to(num_kept_a + jnp.arange(num_b, dtype=jnp.int32),
                                  (batch, num_b))

  dest_a_BxA = jnp.where(keep_a_BxA, pos_a_BxA,
                         jnp.take_along_axis(dest_b_BxB, best_b_BxA, axis=-1))
  dest_BxT = jnp.zeros((batch, num_a + num_b), jnp.int32)
  dest_BxT = dest_BxT.at[:, ::2].set(dest_a_BxA).at[:, 1::2].set(dest_b_BxB)
  return jax.lax.stop_gradient(dest_BxT)


# ----------------------------------------------------------------------------- merging


def _segment_reduce(x_BxTxF, dest_BxT, num_out: int, how: str, impl: str):
  """Reduce the rows of x that share a destination: (B, T, ...) -> (B, num_out, ...)."""
  if impl == "matmul" and how == "sum":
    onehot_BxOxT = (dest_BxT[:, None, :] == jnp.arange(num_out)[None, :, None])
    flat = x_BxTxF.reshape(x_BxTxF.shape[:2] + (-1,))
    out = jnp.einsum("bot,btf->bof", onehot_BxOxT.astype(x_BxTxF.dtype), flat,
                     precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.promote_types(x_BxTxF.dtype, jnp.float32))
    return out.astype(x_BxTxF.dtype).reshape((x_BxTxF.shape[0], num_out) + x_BxTxF.shape[2:])
  reduce = {"sum": jax.ops.segment_sum, "max": jax.ops.segment_max}[how]
  return jax.vmap(functools.partial(reduce, num_segments=num_out))(x_BxTxF, dest_BxT)


def merge_sum(x_BxTxF, dest_BxT, num_out: int, impl: str = "scatter"):
  """Sum of the tokens fused into each output token."""
  return _segment_reduce(x_BxTxF, dest_BxT, num_out, "sum", impl)


def merge_max(x_BxTxF, dest_BxT, num_out: int):
  """Element-wise max of the tokens fused into each output token."""
  return _segment_reduce(x_BxTxF, dest_BxT, num_out, "max", "scatter")


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


def fuse_tokens(x_BxTxC: jax.Array, size_BxT: jax.Array, dest_BxT: jax.Array, num_out: int,
                *, pooling: str = "size", attn_received_BxT: jax.Array | None = None,
                impl: str = "scatter"):
  """Fuses tokens along dest_BxT.

  Returns (x_BxOxC, size_BxO, weights_BxT, norm_BxO): the fused tokens, their sizes (sum
  of the sizes fused), and the weights and normalisers of the average (None for max
  pooling), which ``merged_attention_output`` reuses for the query rows of the attention.
  """
  size_BxT = jax.lax.stop_gradient(size_BxT)
  size_BxO = merge_sum(size_BxT[..., None], dest_BxT, num_out, impl)[..., 0]
  weights_BxT = pooling_weights(pooling, size_BxT, attn_received_BxT)
  if weights_BxT is None:
    return merge_max(x_BxTxC, dest_BxT, num_out), size_BxO, None, None
  weights_BxT = jax.lax.stop_gradient(weights_BxT)
  norm_BxO = size_BxO if pooling == "size" else merge_sum(weights_BxT[..., None], dest_BxT,
                                                           num_out, impl)[..., 0]
  # Accumulate in float32 at least, whatever the compute dtype.
  acc = jnp.promote_types(x_BxTxC.dtype, jnp.float32)
  weighted = x_BxTxC.astype(acc) * weights_BxT[..., None].astype(acc)
  x_BxOxC = merge_sum(weighted, dest_BxT, num_out, impl) / norm_BxO[..., None].astype(acc)
  return x_BxOxC.astype(x_BxTxC.dtype), size_BxO, weights_BxT, norm_BxO


def merged_attention_output(probs_BxHxTxT: jax.Array, v_BxOxHxd: jax.Array,
                            dest_BxT: jax.Array, weights_BxT: jax.Array | None,
                            norm_BxO: jax.Array | None, *, impl: str = "scatter") -> jax.Array:
  """One-step-ahead attention: the fused tokens attend with the merged attention map.

  The reference merges the map itself: it sums the key columns of each group, then pools
  the query rows of each group as the tokens were pooled, and multiplies the (O, O) result
  by the values of the fused tokens. For the averaging poolings that product equals
    pool_rows(probs @ v[dest]),
  since summing key columns against v equals gathering v back to the unfused keys. This
  form never builds the merged map (no (T, T) scatter) and costs one ordinary attention
  product. Max pooling is not linear in the rows, so it merges the map explicitly.

  Returns the attention output of the fused tokens, (B, O, H, d).
  """
  num_out = v_BxOxHxd.shape[1]
  dtype = v_BxOxHxd.dtype
  if weights_BxT is None:  # max pooling: merge the map, then attend
    probs_BxHxTxT = probs_BxHxTxT.astype(dtype)
    cols_BxHxTxO = jnp.moveaxis(
        merge_sum(jnp.moveaxis(probs_BxHxTxT, 3, 1), dest_BxT, num_out, impl), 1, 3)
    merged_BxHxOxO = jnp.moveaxis(
        merge_max(jnp.moveaxis(cols_BxHxTxO, 2, 1), dest_BxT, num_out), 1, 2)
    return jnp.einsum("bhqk,bkhd->bqhd", merged_BxHxOxO, v_BxOxHxd)
  acc = jnp.promote_types(dtype, jnp.float32)
  v_back_BxTxHxd = jnp.take_along_axis(v_BxOxHxd, dest_BxT[:, :, None, None], axis=1)
  out_BxTxHxd = jnp.einsum("bhqk,bkhd->bqhd", probs_BxHxTxT.astype(dtype), v_back_BxTxHxd,
                           preferred_element_type=acc)
  weighted = out_BxTxHxd * weights_BxT[:, :, None, None].astype(acc)
  out = merge_sum(weighted, dest_BxT, num_out, impl) / norm_BxO[:, :, None, None].astype(acc)
  return out.astype(dtype)


# ----------------------------------------------------------------------------- sources


def update_token_map(token_map_BxN: jax.Array, dest_BxT: jax.Array) -> jax.Array:
  """Follows each initial token to the token that now holds it."""
  return jnp.take_along_axis(dest_BxT, token_map_BxN, axis=-1)


def source_map(token_map_BxN: jax.Array, num_tokens: int, dtype=jnp.float32) -> jax.Array:
  """(B, T, N) 0/1 map: source[b, t, n] = 1 when token t holds initial token n."""
  return (token_map_BxN[:, None, :] == jnp.arange(num_tokens)[None, :, None]).astype(dtype)
