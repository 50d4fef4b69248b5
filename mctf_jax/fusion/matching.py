"""Bidirectional bipartite soft matching: which tokens merge into which.

``bipartite_matching`` (static merge counts, exact shapes) and
``bipartite_matching_padded`` (runtime merge counts on padded arrays, the train step's
teacher) share one core, ``_match``, which decides for every unprotected token whether it
moves and where it goes; they differ only in how they list the result (static lists of
exactly O anchors and r moved tokens, or fixed-size lists with unused slots).

The result, ``Matching``, says where every input token goes (``dest_BxT``), which input
token each output token is built on and which tokens move into another. The output order
is the reference's: ``[protected tokens, unmerged A in original order, remaining B by
descending score]`` (one-directional: remaining B in original order). This order feeds the
next layer's even/odd split, so it matters.

Shapes are in the names: B batch, T tokens in, O tokens out, A/B the two halves, R moved
tokens. Pure functions of arrays; nothing here knows a model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mctf_jax.fusion.scopes import scoped
from mctf_jax.fusion.scores import protected_split


class Matching(NamedTuple):
  """One fusion step, T input tokens -> O = T - r output tokens (all int32).

  dest_BxT: the output token each input token is fused into.
  anchor_BxO: for each output token, the input token it is built on (it keeps that token's
    place): the protected tokens, the unmerged A tokens and the B tokens that stay.
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


# ----------------------------------------------------------------------------- primitives


def descending_rank(values_BxK: jax.Array) -> jax.Array:
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
  argmax as a (value, index) pair reduction, several times slower than a plain one.
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


def places_among_kept(keep_BxA: jax.Array) -> jax.Array:
  """Place of each kept entry among the kept ones, in original order (int32)."""
  num_a = keep_BxA.shape[-1]
  before_AxA = jnp.arange(num_a)[None, :] < jnp.arange(num_a)[:, None]   # [i, j] = j < i
  return jnp.sum(keep_BxA[:, None, :] & before_AxA, axis=-1, dtype=jnp.int32)


def interleave(a_BxA: jax.Array, b_BxB: jax.Array) -> jax.Array:
  """Back to token order: A entry i is token 2i, B entry j is token 2j + 1."""
  batch, num_b = b_BxB.shape
  pairs = jnp.stack([a_BxA[:, :num_b], b_BxB], axis=-1).reshape(batch, 2 * num_b)
  return jnp.concatenate([pairs, a_BxA[:, num_b:]], axis=-1)


def position_of(values_BxN: jax.Array, wanted: range) -> jax.Array:
  """For each wanted value, the index n of the (unique) entry values[b, n] equal to it."""
  hit_BxKxN = values_BxN[:, None, :] == jnp.asarray(list(wanted), values_BxN.dtype)[None, :, None]
  return first_index(hit_BxKxN, axis=-1)


def prepend(prefix_K, local_BxL: jax.Array) -> jax.Array:
  """The protected tokens' values (the same for every example) before the others'."""
  if not len(prefix_K):
    return local_BxL
  prefix = jnp.broadcast_to(jnp.asarray(prefix_K, local_BxL.dtype),
                            (local_BxL.shape[0], len(prefix_K)))
  return jnp.concatenate([prefix, local_BxL], axis=-1)


def _token_dest(dest_a_BxA, dest_b_BxB, num_protected: int) -> jax.Array:
  """dest over all tokens, from the unprotected A and B tokens' (local output indices): the
  protected tokens keep their places (token t -> output t), the others come after them."""
  protected_a, protected_b = protected_split(num_protected)
  if num_protected:
    dest_a_BxA, dest_b_BxB = dest_a_BxA + num_protected, dest_b_BxB + num_protected
  return interleave(prepend(range(0, 2 * protected_a, 2), dest_a_BxA),
                    prepend(range(1, 2 * protected_b, 2), dest_b_BxB))


# ----------------------------------------------------------------------------- the core


class _Sides(NamedTuple):
  """What the core decides for the unprotected A and B tokens (local indices)."""
  rank_a: jax.Array     # (B, A) place in the descending order of best scores
  moved_a: jax.Array    # (B, A) merged into a B token
  keep_a: jax.Array     # (B, A) stays (and is real)
  dest_a: jax.Array     # (B, A) output token, among the unprotected outputs
  moved_b: jax.Array    # (B, B) merged into a kept A token
  rank_b: jax.Array | None
  dest_b: jax.Array     # (B, B)


def _match(scores_BxAxB, r_ab, r_ba, bidirectional: bool, valid_a=None, valid_b=None) -> _Sides:
  """The matching of the unprotected tokens on their scores.

  r_ab, r_ba: Python ints, or int32 arrays of shape (B, 1) (runtime counts per example).
  valid_a, valid_b: None, or which entries are real tokens (padded arrays: the padding has
  -inf scores, ranks after every real token and is never moved or kept; its dest_* entries
  mean nothing).
  A -> B: each A token's best B; the r_ab A tokens with the highest best score merge into
  it. B -> A (bidirectional), on the same scores restricted to the unmerged A tokens: each
  B token's best unmerged A; the r_ba B tokens with the highest best score merge into it
  (taking along whatever A tokens they received).
  """
  num_a, num_b = scores_BxAxB.shape[1:]
  best_score_BxA, best_b_BxA = max_argmax(scores_BxAxB, axis=-1)
  rank_a = descending_rank(best_score_BxA)
  moved_a = rank_a < r_ab
  if valid_a is None:
    keep_a = ~moved_a
    num_kept_a = num_a - r_ab
  else:
    moved_a = valid_a & moved_a
    keep_a = valid_a & ~moved_a
    num_kept_a = jnp.sum(keep_a, axis=-1, dtype=jnp.int32)[:, None]
  # Place of each kept A token among the kept ones, in original order.
  pos_a = places_among_kept(keep_a)

  if bidirectional:
    scores_ba_BxAxB = jnp.where(keep_a[:, :, None], scores_BxAxB, -jnp.inf)
    best_score_BxB, best_a_BxB = max_argmax(scores_ba_BxAxB, axis=1)
    rank_b = descending_rank(best_score_BxB)
    moved_b = rank_b < r_ba
    if valid_b is not None:
      moved_b = valid_b & moved_b
    dest_b = jnp.where(moved_b, jnp.take_along_axis(pos_a, best_a_BxB, axis=-1),
                       num_kept_a + rank_b - r_ba)
  else:
    rank_b = None
    moved_b = jnp.zeros(scores_BxAxB.shape[::2], bool)
    dest_b = jnp.broadcast_to(num_kept_a + jnp.arange(num_b, dtype=jnp.int32),
                              scores_BxAxB.shape[::2])
  dest_a = jnp.where(keep_a, pos_a, jnp.take_along_axis(dest_b, best_b_BxA, axis=-1))
  return _Sides(rank_a, moved_a, keep_a, dest_a, moved_b, rank_b, dest_b)


# ----------------------------------------------------------------------------- exact shapes


@scoped("matching")
def bipartite_matching(scores_BxAxB: jax.Array, *, r_ab: int, r_ba: int,
                       bidirectional: bool = True, num_protected: int = 1) -> Matching:
  """Bidirectional (or one-directional) bipartite soft matching with static merge counts.

  scores_BxAxB: ``matching_scores`` of all T tokens (the protected rows and columns are
  left out of the matching). Returns a Matching of T - r_ab - r_ba output tokens.
  """
  scores_BxAxB = jax.lax.stop_gradient(scores_BxAxB)
  batch = scores_BxAxB.shape[0]
  protected_a, protected_b = protected_split(num_protected)
  sides = _match(scores_BxAxB[:, protected_a:, protected_b:], r_ab, r_ba, bidirectional)
  num_a, num_b = sides.keep_a.shape[1], sides.dest_b.shape[1]

  if bidirectional:
    kept_b_BxK = position_of(sides.rank_b, range(r_ba, num_b))
    moved_b_BxR = position_of(sides.rank_b, range(r_ba))
  else:
    kept_b_BxK = jnp.broadcast_to(jnp.arange(num_b, dtype=jnp.int32), (batch, num_b))
    moved_b_BxR = jnp.zeros((batch, 0), jnp.int32)
  kept_a_BxK = position_of(jnp.where(sides.keep_a, sides.dest_a, -1), range(num_a - r_ab))

  # Local indices -> token indices (A entry i is token 2 (protected_a + i), B entry j is
  # token 2 (protected_b + j) + 1); the protected tokens keep their places in front.
  dest_BxT = _token_dest(sides.dest_a, sides.dest_b, num_protected)
  anchor_BxO = prepend(range(num_protected), jnp.concatenate(
      [2 * (kept_a_BxK + protected_a), 2 * (kept_b_BxK + protected_b) + 1], axis=-1))
  moved_BxR = jnp.concatenate([2 * (position_of(sides.rank_a, range(r_ab)) + protected_a),
                               2 * (moved_b_BxR + protected_b) + 1], axis=-1)
  moved_dest_BxR = jnp.take_along_axis(dest_BxT, moved_BxR, axis=-1)
  return Matching(dest_BxT, anchor_BxO, moved_BxR, moved_dest_BxR)


# ----------------------------------------------------------------------------- padded shapes


@scoped("matching")
def bipartite_matching_padded(scores_BxAxB: jax.Array, valid_BxT: jax.Array, r_ab: jax.Array,
                              r_ba: jax.Array, *, num_in: int, num_out: int, max_moved: int,
                              bidirectional: bool = True, num_protected: int = 1):
  """``bipartite_matching`` on padded scores with runtime r_ab, r_ba (int32 scalars, or (B,)
  arrays: each example merges its own counts).

  scores_BxAxB: ``matching_scores(..., valid_BxT=valid)`` at any width >= num_in (the
  padding beyond the real tokens has -inf rows and columns, and ranks after every real
  token, so the real tokens get the ranks, places and destinations of the exact matching).
  Returns (Matching, valid_BxO): a Matching over num_in input and num_out output slots with
  max_moved entries in its merge lists (the unused ones point past the output, and merges
  drop them), and which output slots hold real tokens. Padding inputs map to slot 0 in
  ``dest_BxT`` (their attention weight is zero) and are never gathered.
  """
  scores_BxAxB = jax.lax.stop_gradient(scores_BxAxB)
  protected_a, protected_b = protected_split(num_protected)
  valid_a, valid_b = valid_BxT[:, ::2][:, protected_a:], valid_BxT[:, 1::2][:, protected_b:]
  # Scalars, or one count per example, shape (B,).
  r_ab = jnp.asarray(r_ab, jnp.int32).reshape(-1, 1)
  r_ba = jnp.asarray(r_ba, jnp.int32).reshape(-1, 1)
  sides = _match(scores_BxAxB[:, protected_a:, protected_b:], r_ab, r_ba, bidirectional,
                 valid_a, valid_b)

  if bidirectional:
    slot_b = jnp.where(sides.moved_b, r_ab + sides.rank_b, -1)
  else:
    slot_b = jnp.full(valid_b.shape, -1, jnp.int32)
  # Over all tokens: the protected ones are kept in place and never move.
  dest_BxT = jnp.where(valid_BxT, _token_dest(sides.dest_a, sides.dest_b, num_protected),
                       0)[:, :num_in]
  kept_BxT = interleave(prepend([True] * protected_a, sides.keep_a),
                        prepend([True] * protected_b, valid_b & ~sides.moved_b))[:, :num_in]
  slot_BxT = interleave(prepend([-1] * protected_a, jnp.where(sides.moved_a, sides.rank_a, -1)),
                        prepend([-1] * protected_b, slot_b))[:, :num_in]
  return list_padded(dest_BxT, kept_BxT, slot_BxT, num_out=num_out, max_moved=max_moved)


def list_padded(dest_BxT, kept_BxT, slot_BxT, *, num_out: int, max_moved: int):
  """(Matching, valid_BxO) at fixed sizes from a padded matching's decisions over its
  input tokens: where each goes (dest), which stay as an output's anchor (kept), and the
  place of each moved one in the merge lists (slot; -1 for the others)."""
  # Each real output slot is built on the one kept token sent there; the slots that get
  # none are padding. (Derived from the arrays, not from r: only the matching's own small
  # kernels read the runtime r, so the kernels of every block are alike.)
  sent_BxOxT = (jnp.where(kept_BxT, dest_BxT, -1)[:, None, :] ==
                jnp.arange(num_out, dtype=jnp.int32)[None, :, None])
  anchor_BxO = first_index(sent_BxOxT, axis=-1)
  valid_BxO = jnp.any(sent_BxOxT, axis=-1)
  moving_BxRxT = slot_BxT[:, None, :] == jnp.arange(max_moved, dtype=jnp.int32)[None, :, None]
  moved_BxR = first_index(moving_BxRxT, axis=-1)
  moved_dest_BxR = jnp.where(jnp.any(moving_BxRxT, axis=-1),
                             jnp.take_along_axis(dest_BxT, moved_BxR, axis=-1), num_out)
  return Matching(dest_BxT, anchor_BxO, moved_BxR, moved_dest_BxR), valid_BxO
