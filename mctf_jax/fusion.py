"""Multi-criteria token fusion as pure functions on arrays (no Flax in here).

One fusion step turns T_in tokens into T_out = T_in - r tokens:

1. ``matching_scores``: a bipartite score matrix between the even tokens (set A, which
   holds the class token) and the odd tokens (set B), the product of three criteria:
   similarity, informativeness (attention received) and size.
2. ``bipartite_matching``: bidirectional (or one-directional) bipartite soft matching on
   those scores. Its result, ``Fusion``, says where every input token goes (``dest_BxT``)
   and, for merging, which input token each output token is built on and which r tokens
   move into another; the output order is the reference's
   ``[unmerged A in original order, remaining B by descending score]``.
3. ``fuse_tokens``: pooling of the tokens (and their sizes) along that map.
4. ``merged_attention_output``: one-step-ahead attention, the attention of the fused
   tokens computed from the attention map of the unfused ones.

Shapes are in the names: B batch, T tokens in, O tokens out, A/B the two halves, C channels,
H heads, d head width, N initial tokens. All sizes come from the static schedule.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Named scopes mark the fusion's own work in compiled programs and profiles
# (mctf_jax.profiling attributes kernel time by them).
SCOPE_PREFIX = "mctf_"


def _scoped(name: str):
  def wrap(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
      with jax.named_scope(SCOPE_PREFIX + name):
        return fn(*args, **kwargs)
    return inner
  return wrap


# ----------------------------------------------------------------------------- scores


@_scoped("scores")
def attention_received(probs_BxHxTxT: jax.Array) -> jax.Array:
  """Mean attention each token receives, over heads and queries: (B, T)."""
  return jnp.mean(probs_BxHxTxT.astype(jnp.float32), axis=(1, 2))


def _power(x, exponent: float):
  return x if exponent == 1 else x ** exponent


@_scoped("scores")
def matching_scores(metric_BxTxC: jax.Array,
                    *,
                    attn_received_BxT: jax.Array | None = None,
                    size_BxT: jax.Array | None = None,
                    tau_sim: float = 1.0,
                    tau_info: float = 20.0,
                    tau_size: float = 40.0,
                    num_protected: int = 1,
                    valid_BxT: jax.Array | None = None) -> jax.Array:
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
  # (A zero token would give 0/0; the guard never changes a non-zero norm.)
  norm = jnp.linalg.norm(metric, axis=-1, keepdims=True)
  metric = metric / jnp.maximum(norm, jnp.finfo(dtype).tiny)
  a_BxAxC, b_BxBxC = metric[:, ::2], metric[:, 1::2]
  num_a, num_b = a_BxAxC.shape[1], b_BxBxC.shape[1]

  if tau_sim:
    cos_BxAxB = jnp.einsum("bic,bjc->bij", a_BxAxC, b_BxBxC,
                           precision=jax.lax.Precision.HIGHEST)
    scores_BxAxB = _power((cos_BxAxB + 1) / 2, 1 / tau_sim)
  else:
    scores_BxAxB = jnp.ones((metric.shape[0], num_a, num_b), dtype)

  # (u_i u_j)^(1/tau) = u_i^(1/tau) u_j^(1/tau): both pair criteria are products of per-token
  # factors, so the powers are taken on vectors and applied as one outer product.
  factor_BxT = None

  def token_factor(values_BxT, tau):
    values = jax.lax.stop_gradient(values_BxT).astype(dtype)
    if valid_BxT is None:
      inv = 1 / values
    else:  # padding counts as 1 / inf = 0, below every real token
      inv = jnp.where(valid_BxT, 1 / jnp.where(valid_BxT, values, 1), 0)
    return _power(inv / jnp.max(inv, axis=-1, keepdims=True), 1 / tau)

  if tau_info > 0 and attn_received_BxT is not None:
    factor_BxT = token_factor(attn_received_BxT, tau_info)
  if tau_size and size_BxT is not None:
    size_factor = token_factor(size_BxT, tau_size)
    factor_BxT = size_factor if factor_BxT is None else factor_BxT * size_factor
  if factor_BxT is not None:
    scores_BxAxB = scores_BxAxB * (factor_BxT[:, ::2, None] * factor_BxT[:, None, 1::2])
  if valid_BxT is not None:
    scores_BxAxB = jnp.where(valid_BxT[:, ::2, None] & valid_BxT[:, None, 1::2], scores_BxAxB,
                             -jnp.inf)
  if num_protected:
    scores_BxAxB = scores_BxAxB.at[:, :num_protected, :].set(-jnp.inf)
  return scores_BxAxB


# ----------------------------------------------------------------------------- matching


class Fusion(NamedTuple):
  """One fusion step, T input tokens -> O = T - r output tokens (all int32).

  dest_BxT: the output token each input token is fused into.
  anchor_BxO: for each output token, the input token it is built on (it keeps that token's
    place): the unmerged A tokens and the B tokens that stay.
  moved_BxR: the r input tokens merged into another token (A->B first, then B->A).
  moved_dest_BxR: their output tokens.
  A merge is then ``x[anchor] + sum of x[moved] into moved_dest``: a gather of O rows and a
  reduction of only r rows.
  """
  dest_BxT: jax.Array
  anchor_BxO: jax.Array
  moved_BxR: jax.Array
  moved_dest_BxR: jax.Array

  @property
  def num_out(self) -> int:
    return self.anchor_BxO.shape[1]


def _descending_rank(values_BxK: jax.Array) -> jax.Array:
  """Each entry's place in a stable descending sort (0 = largest; ties: lower index first).

  Counted by pairwise comparison, O(K^2) integer work that is negligible next to the
  attention and needs no sort, scatter or inverse permutation.
  """
  k = values_BxK.shape[-1]
  before_KxK = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]   # [i, j] = j < i
  v_i, v_j = values_BxK[:, :, None], values_BxK[:, None, :]
  ahead = (v_j > v_i) | ((v_j == v_i) & before_KxK)
  return jnp.sum(ahead, axis=-1, dtype=jnp.int32)


def first_index(hit: jax.Array, axis: int = -1) -> jax.Array:
  """The first index along `axis` where `hit` is True (0 where it is nowhere), int32.

  jnp.argmax(hit) in effect, computed as a min-reduction of indices: XLA:CPU emits
  argmax as a (value, index) pair reduction that is ~3x slower than a plain one.
  """
  n = hit.shape[axis]
  shape = [1] * hit.ndim
  shape[axis] = n
  index = jnp.arange(n, dtype=jnp.int32).reshape(shape)
  first = jnp.min(jnp.where(hit, index, n), axis=axis)
  return jnp.where(first == n, 0, first)


def max_argmax(values: jax.Array, axis: int = -1):
  """(max, first index of the max) along `axis`, as jnp.max and jnp.argmax give them (for
  values without NaN), as two plain reductions (see ``first_index``)."""
  top = jnp.max(values, axis=axis)
  return top, first_index(values == jnp.expand_dims(top, axis), axis)


def _places_among_kept(keep_BxA: jax.Array) -> jax.Array:
  """Place of each kept entry among the kept ones, in original order (int32)."""
  num_a = keep_BxA.shape[-1]
  before_AxA = jnp.arange(num_a)[None, :] < jnp.arange(num_a)[:, None]   # [i, j] = j < i
  return jnp.sum(keep_BxA[:, None, :] & before_AxA, axis=-1, dtype=jnp.int32)


def _interleave(a_BxA: jax.Array, b_BxB: jax.Array) -> jax.Array:
  """Back to token order: A entry i is token 2i, B entry j is token 2j + 1."""
  batch, num_b = b_BxB.shape
  pairs = jnp.stack([a_BxA[:, :num_b], b_BxB], axis=-1).reshape(batch, 2 * num_b)
  return jnp.concatenate([pairs, a_BxA[:, num_b:]], axis=-1)


def _position_of(values_BxN: jax.Array, wanted: range) -> jax.Array:
  """For each wanted value, the index n of the (unique) entry values[b, n] equal to it."""
  hit_BxKxN = values_BxN[:, None, :] == jnp.asarray(list(wanted), values_BxN.dtype)[None, :, None]
  return first_index(hit_BxKxN, axis=-1)


@_scoped("matching")
def bipartite_matching(scores_BxAxB: jax.Array, *, r_ab: int, r_ba: int,
                       bidirectional: bool = True) -> Fusion:
  """Bidirectional (or one-directional) bipartite soft matching on the scores.

  A -> B: each A token's best B; the r_ab A tokens with the highest best score merge
  into it. B -> A (bidirectional), on the same scores restricted to the unmerged A
  tokens: each B token's best unmerged A; the r_ba B tokens with the highest best score
  merge into it (taking along whatever A tokens they received).

  Output order: the unmerged A tokens in their original order (so the class token stays
  first), then the B tokens that stay, by descending best score (bidirectional) or in
  their original order (one-directional). This order feeds the next layer's even/odd split.
  """
  scores_BxAxB = jax.lax.stop_gradient(scores_BxAxB)
  batch, num_a, num_b = scores_BxAxB.shape
  num_kept_a = num_a - r_ab

  best_score_BxA, best_b_BxA = max_argmax(scores_BxAxB, axis=-1)
  rank_a_BxA = _descending_rank(best_score_BxA)
  keep_a_BxA = rank_a_BxA >= r_ab
  # Place of each kept A token among the kept ones, in original order.
  pos_a_BxA = _places_among_kept(keep_a_BxA)

  if bidirectional:
    scores_ba_BxAxB = jnp.where(keep_a_BxA[:, :, None], scores_BxAxB, -jnp.inf)
    best_score_BxB, best_a_BxB = max_argmax(scores_ba_BxAxB, axis=1)
    rank_b_BxB = _descending_rank(best_score_BxB)
    dest_b_BxB = jnp.where(rank_b_BxB < r_ba,
                           jnp.take_along_axis(pos_a_BxA, best_a_BxB, axis=-1),
                           num_kept_a + rank_b_BxB - r_ba)
    kept_b_BxK = _position_of(rank_b_BxB, range(r_ba, num_b))
    moved_b_BxR = _position_of(rank_b_BxB, range(r_ba))
  else:
    dest_b_BxB = jnp.broadcast_to(num_kept_a + jnp.arange(num_b, dtype=jnp.int32),
                                  (batch, num_b))
    kept_b_BxK = jnp.broadcast_to(jnp.arange(num_b, dtype=jnp.int32), (batch, num_b))
    moved_b_BxR = jnp.zeros((batch, 0), jnp.int32)
  dest_a_BxA = jnp.where(keep_a_BxA, pos_a_BxA,
                         jnp.take_along_axis(dest_b_BxB, best_b_BxA, axis=-1))

  dest_BxT = _interleave(dest_a_BxA, dest_b_BxB)
  kept_a_BxK = _position_of(jnp.where(keep_a_BxA, pos_a_BxA, -1), range(num_kept_a))
  anchor_BxO = jnp.concatenate([2 * kept_a_BxK, 2 * kept_b_BxK + 1], axis=-1)
  moved_BxR = jnp.concatenate([2 * _position_of(rank_a_BxA, range(r_ab)),
                               2 * moved_b_BxR + 1], axis=-1)
  moved_dest_BxR = jnp.take_along_axis(dest_BxT, moved_BxR, axis=-1)
  return Fusion(dest_BxT, anchor_BxO, moved_BxR, moved_dest_BxR)


# ----------------------------------------------------------------------------- merging


def _take_tokens(x_BxTxF, idx_BxK):
  """x[b, idx[b, k]] for token-major arrays of any trailing shape."""
  idx = idx_BxK.reshape(idx_BxK.shape + (1,) * (x_BxTxF.ndim - 2))
  return jnp.take_along_axis(x_BxTxF, idx, axis=1)


def merge_sum(x_BxTxF, fz: Fusion, impl: str = "scatter"):
  """Sum of the tokens fused into each output token: (B, T, ...) -> (B, O, ...).

  impl 'scatter' adds the r moved rows with a scatter-add; 'matmul' with a one-hot (O, r)
  matrix product (MXU-friendly on TPU). Both gather the O anchor rows.
  """
  out = _take_tokens(x_BxTxF, fz.anchor_BxO)
  if fz.moved_BxR.shape[1] == 0:
    return out
  moved = _take_tokens(x_BxTxF, fz.moved_BxR)
  if impl == "matmul":
    onehot_BxOxR = (fz.moved_dest_BxR[:, None, :] ==
                    jnp.arange(fz.num_out)[None, :, None]).astype(x_BxTxF.dtype)
    flat = moved.reshape(moved.shape[:2] + (-1,))
    added = jnp.einsum("bor,brf->bof", onehot_BxOxR, flat,
                       precision=jax.lax.Precision.HIGHEST)
    return out + added.reshape(out.shape)
  rows = jnp.arange(out.shape[0])[:, None]
  return out.at[rows, fz.moved_dest_BxR].add(moved)


def merge_max(x_BxTxF, fz: Fusion):
  """Element-wise max of the tokens fused into each output token."""
  out = _take_tokens(x_BxTxF, fz.anchor_BxO)
  rows = jnp.arange(out.shape[0])[:, None]
  return out.at[rows, fz.moved_dest_BxR].max(_take_tokens(x_BxTxF, fz.moved_BxR))


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


@_scoped("merge")
def fuse_tokens(x_BxTxC: jax.Array, size_BxT: jax.Array, fz: Fusion, *, pooling: str = "size",
                attn_received_BxT: jax.Array | None = None, impl: str = "scatter"):
  """Fuses tokens as `fz` says.

  Returns (x_BxOxC, size_BxO, weights_BxT, norm_BxO): the fused tokens, their sizes (sum
  of the sizes fused), and the weights and normalisers of the average (None for max
  pooling), which ``merged_attention_output`` reuses for the query rows of the attention.
  """
  size_BxT = jax.lax.stop_gradient(size_BxT)
  size_BxO = merge_sum(size_BxT, fz, impl)
  weights_BxT = pooling_weights(pooling, size_BxT, attn_received_BxT)
  if weights_BxT is None:
    return merge_max(x_BxTxC, fz), size_BxO, None, None
  weights_BxT = jax.lax.stop_gradient(weights_BxT)
  norm_BxO = size_BxO if pooling == "size" else merge_sum(weights_BxT, fz, impl)
  # Accumulate in float32 at least, whatever the compute dtype.
  acc = jnp.promote_types(x_BxTxC.dtype, jnp.float32)
  weighted = x_BxTxC.astype(acc) * weights_BxT[..., None].astype(acc)
  x_BxOxC = merge_sum(weighted, fz, impl) / norm_BxO[..., None].astype(acc)
  return x_BxOxC.astype(x_BxTxC.dtype), size_BxO, weights_BxT, norm_BxO


def attend(probs_BxHxTxT: jax.Array, v_BxHxTxd: jax.Array) -> jax.Array:
  """probs @ v per head, returned token-major (B, T, H, d) for the output projection."""
  with jax.named_scope("attend"):
    out = jnp.einsum("bhqk,bhkd->bhqd", probs_BxHxTxT.astype(v_BxHxTxd.dtype), v_BxHxTxd,
                     preferred_element_type=jnp.promote_types(v_BxHxTxd.dtype, jnp.float32))
    return out.transpose(0, 2, 1, 3)


def merged_attention_output(probs_BxHxTxT: jax.Array, v_BxHxOxd: jax.Array, fz: Fusion,
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
    with jax.named_scope(SCOPE_PREFIX + "attn_merge"):
      return _merged_map_output(probs_BxHxTxT.astype(dtype), v_BxHxOxd, fz, impl)
  acc = jnp.promote_types(dtype, jnp.float32)
  with jax.named_scope(SCOPE_PREFIX + "attn_merge"):
    v_back_BxHxTxd = jnp.take_along_axis(v_BxHxOxd, fz.dest_BxT[:, None, :, None], axis=2)
  out_BxTxHxd = attend(probs_BxHxTxT, v_back_BxHxTxd)
  with jax.named_scope(SCOPE_PREFIX + "attn_merge"):
    weighted = out_BxTxHxd * weights_BxT[:, :, None, None].astype(acc)
    out = merge_sum(weighted, fz, impl) / norm_BxO[:, :, None, None].astype(acc)
  return out.astype(dtype)


def _merged_map_output(probs_BxHxTxT, v_BxHxOxd, fz: Fusion, impl: str):
  """Max pooling: sum the key columns per group, take the max over the query rows per
  group, then attend with the (O, O) map."""
  cols_BxHxTxO = jnp.moveaxis(merge_sum(jnp.moveaxis(probs_BxHxTxT, 3, 1), fz, impl), 1, 3)
  merged_BxHxOxO = jnp.moveaxis(merge_max(jnp.moveaxis(cols_BxHxTxO, 2, 1), fz), 1, 2)
  return attend(merged_BxHxOxO, v_BxHxOxd)


# ----------------------------------------------------------------------------- sources


@_scoped("merge")
def update_token_map(token_map_BxN: jax.Array, dest_BxT: jax.Array) -> jax.Array:
  """Follows each initial token to the token that now holds it."""
  return jnp.take_along_axis(dest_BxT, token_map_BxN, axis=-1)


def source_map(token_map_BxN: jax.Array, num_tokens: int, dtype=jnp.float32) -> jax.Array:
  """(B, T, N) 0/1 map: source[b, t, n] = 1 when token t holds initial token n."""
  return (token_map_BxN[:, None, :] == jnp.arange(num_tokens)[None, :, None]).astype(dtype)
