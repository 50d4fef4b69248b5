"""PiToMe's matching (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token
Merging", NeurIPS 2024): energy-ordered bipartite matching that protects isolated tokens.

On the metric (the attention's keys averaged over heads, as ToMe's) of the T unprotected
tokens, cosine similarities S (T x T) and each token's energy

    E_i = mean_j ELU(S_ij - margin)

order the tokens, most redundant first (pi: energy descending). A block then either

* matches all of them (``protect=False``, PiToMe's first half of the blocks): A = pi_0,
  pi_2, ..., B = pi_1, pi_3, ...; each A token's best B; the r A tokens with the highest
  best similarity merge into it. Output order: [protected tokens, unmerged A by best
  similarity descending, B in pi order];
* or protects the low-energy tokens (``protect=True``, the second half): only the 2r
  highest-energy tokens are candidates, A = pi_0, pi_2, ..., pi_{2r-2}, B = pi_1, ...,
  pi_{2r-1}, and every A token merges into its best B. Output order: [protected tokens,
  pi_{2r}, ..., pi_{T-1}, the B tokens in pi order].

The result is a ``Matching`` like the bipartite matching's, so the merges, sizes, source
maps and both merge implementations apply unchanged. Orders are counted by pairwise
comparison (``descending_rank``), as the bipartite matching counts them: no sort. Pure
functions of arrays; nothing here knows a model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mctf_jax.fusion.matching import (Matching, descending_rank, list_padded, max_argmax,
                                      position_of, prepend)
from mctf_jax.fusion.scopes import fusion_scope, scoped


def similarity_and_energy(metric_BxTxd: jax.Array, margin, valid_BxT=None):
  """(S_BxTxT, E_BxT): the cosine similarities of the tokens' metric (norms clamped at
  1e-12, the diagonal included) and their energies mean_j ELU(S_ij - margin), float32 at
  least, the products at the highest precision (PiToMe's decisions are ~1e-5 apart).

  valid_BxT: None, or which tokens are real (padded arrays): the means run over the real
  tokens, and the padding's energy is -inf (last in every order)."""
  dtype = jnp.promote_types(metric_BxTxd.dtype, jnp.float32)
  k = metric_BxTxd.astype(dtype)
  k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
  sim_BxTxT = jnp.einsum("bid,bjd->bij", k, k, precision=jax.lax.Precision.HIGHEST)
  elu_BxTxT = jax.nn.elu(sim_BxTxT - margin)
  if valid_BxT is None:
    return sim_BxTxT, jnp.mean(elu_BxTxT, axis=-1)
  real = jnp.sum(valid_BxT, axis=-1, keepdims=True).astype(dtype)
  energy_BxT = jnp.sum(jnp.where(valid_BxT[:, None, :], elu_BxTxT, 0), axis=-1) / real
  return sim_BxTxT, jnp.where(valid_BxT, energy_BxT, -jnp.inf)


def _pairs(sim_BxTxT, rows_BxA, cols_BxB):
  """S[rows, cols]: the similarities of the A tokens (rows) to the B tokens (cols)."""
  sim = jnp.take_along_axis(sim_BxTxT, rows_BxA[:, :, None], axis=1)
  return jnp.take_along_axis(sim, cols_BxB[:, None, :], axis=2)


@scoped("matching")
def pitome_matching(metric_BxTxd: jax.Array, *, r: int, margin: float, protect: bool,
                    num_protected: int = 1) -> Matching:
  """PiToMe's matching of T tokens (the first `num_protected` never merge) removing r of
  them, with the block's energy `margin` and kind (`protect`: see the module docstring).
  Returns a Matching of T - r output tokens in PiToMe's output order."""
  metric_BxTxd = jax.lax.stop_gradient(metric_BxTxd)
  p = num_protected
  with fusion_scope("scores"):
    sim_BxUxU, energy_BxU = similarity_and_energy(metric_BxTxd[:, p:], margin)
  num = energy_BxU.shape[1]
  if not 0 < r <= (num // 2 if protect else (num + 1) // 2):
    raise ValueError(f"PiToMe cannot merge r={r} of {num} tokens "
                     f"({'protecting' if protect else 'matching all'})")
  # pi: the tokens by energy, descending (ties: lower index first).
  energy_rank_BxU = descending_rank(energy_BxU)
  pi_BxU = position_of(energy_rank_BxU, range(num))
  if protect:
    a_BxR, b_BxR = pi_BxU[:, 0:2 * r:2], pi_BxU[:, 1:2 * r:2]
    _, best_b_BxR = max_argmax(_pairs(sim_BxUxU, a_BxR, b_BxR), axis=-1)
    kept = num - 2 * r        # the protected low-energy tokens come first
    anchor_BxO = jnp.concatenate([pi_BxU[:, 2 * r:], b_BxR], axis=-1)
    moved_BxR, moved_dest_BxR = a_BxR, kept + best_b_BxR
    # By energy rank k: k >= 2r stays at k - 2r; odd k < 2r is B entry k // 2; even k < 2r
    # goes where its A entry merges.
    half = energy_rank_BxU // 2
    dest_BxU = jnp.where(energy_rank_BxU >= 2 * r, energy_rank_BxU - 2 * r,
                         jnp.where(energy_rank_BxU % 2 == 1, kept + half,
                                   kept + jnp.take_along_axis(best_b_BxR,
                                                              jnp.minimum(half, r - 1),
                                                              axis=-1)))
  else:
    a_BxA, b_BxB = pi_BxU[:, 0::2], pi_BxU[:, 1::2]
    num_a = a_BxA.shape[1]
    best_BxA, best_b_BxA = max_argmax(_pairs(sim_BxUxU, a_BxA, b_BxB), axis=-1)
    rank_a = descending_rank(best_BxA)
    kept = num_a - r          # the unmerged A tokens come first, by best similarity
    anchor_BxO = jnp.concatenate([
        jnp.take_along_axis(a_BxA, position_of(rank_a, range(r, num_a)), axis=-1), b_BxB],
        axis=-1)
    merged_BxR = position_of(rank_a, range(r))
    moved_BxR = jnp.take_along_axis(a_BxA, merged_BxR, axis=-1)
    moved_dest_BxR = kept + jnp.take_along_axis(best_b_BxA, merged_BxR, axis=-1)
    dest_a_BxA = jnp.where(rank_a >= r, rank_a - r, kept + best_b_BxA)
    half = energy_rank_BxU // 2
    dest_BxU = jnp.where(energy_rank_BxU % 2 == 0,
                         jnp.take_along_axis(dest_a_BxA, half, axis=-1), kept + half)
  # Local indices -> token indices; the protected tokens keep their places in front.
  dest_BxT = prepend(range(p), dest_BxU.astype(jnp.int32) + p)
  anchor_BxO = prepend(range(p), anchor_BxO + p)
  return Matching(dest_BxT, anchor_BxO.astype(jnp.int32), (moved_BxR + p).astype(jnp.int32),
                  (moved_dest_BxR + p).astype(jnp.int32))


@scoped("matching")
def pitome_matching_padded(metric_BxTxd: jax.Array, valid_BxT: jax.Array, r, *, margin,
                           protect: bool, num_in: int, num_out: int, max_moved: int,
                           num_protected: int = 1):
  """``pitome_matching`` on padded tokens with a runtime r (an int32 scalar, or (B,): each
  example its own), for the train step's padded teacher.

  metric_BxTxd, valid_BxT: the tokens at any width >= num_in, the real ones first. The
  real tokens get the exact matching's destinations (the padding's energy is -inf, so it
  comes last in every order); r = 0 leaves every token where it is, as an unfused block
  does. Returns (Matching, valid_BxO) as ``matching.bipartite_matching_padded`` does.
  """
  metric_BxTxd = jax.lax.stop_gradient(metric_BxTxd)
  p = num_protected
  valid_BxU = valid_BxT[:, p:]
  with fusion_scope("scores"):
    sim_BxUxU, energy_BxU = similarity_and_energy(metric_BxTxd[:, p:], margin, valid_BxU)
  num = energy_BxU.shape[1]
  r = jnp.asarray(r, jnp.int32).reshape(-1, 1)
  real = jnp.sum(valid_BxU, axis=-1, dtype=jnp.int32)[:, None]
  energy_rank_BxU = descending_rank(energy_BxU)
  pi_BxU = position_of(energy_rank_BxU, range(num))
  half, odd = energy_rank_BxU // 2, energy_rank_BxU % 2 == 1
  a_BxA, b_BxB = pi_BxU[:, 0::2], pi_BxU[:, 1::2]
  index_a = jnp.arange(a_BxA.shape[1], dtype=jnp.int32)[None, :]
  index_b = jnp.arange(b_BxB.shape[1], dtype=jnp.int32)[None, :]
  sims_BxAxB = _pairs(sim_BxUxU, a_BxA, b_BxB)
  if protect:
    # Candidates: the 2r highest-energy tokens; every A among them merges.
    sims_BxAxB = jnp.where((index_b < r)[:, None, :], sims_BxAxB, -jnp.inf)
    _, best_b_BxA = max_argmax(sims_BxAxB, axis=-1)
    kept = real - 2 * r
    dest_BxU = jnp.where(energy_rank_BxU >= 2 * r, energy_rank_BxU - 2 * r,
                         kept + jnp.where(odd, half,
                                          jnp.take_along_axis(best_b_BxA, half, axis=-1)))
    moved_BxU = ~odd & (energy_rank_BxU < 2 * r)
    slot_BxU = jnp.where(moved_BxU, half, -1)
  else:
    sims_BxAxB = jnp.where((2 * index_b + 1 < real)[:, None, :], sims_BxAxB, -jnp.inf)
    best_BxA, best_b_BxA = max_argmax(sims_BxAxB, axis=-1)
    rank_a = descending_rank(jnp.where(2 * index_a < real, best_BxA, -jnp.inf))
    kept = (real + 1) // 2 - r
    dest_a_BxA = jnp.where(rank_a >= r, rank_a - r, kept + best_b_BxA)
    dest_BxU = jnp.where(odd, kept + half, jnp.take_along_axis(dest_a_BxA, half, axis=-1))
    moved_BxU = ~odd & jnp.take_along_axis(rank_a < r, half, axis=-1)
    slot_BxU = jnp.where(moved_BxU, jnp.take_along_axis(rank_a, half, axis=-1), -1)
  dest_BxU = jnp.where(r == 0, jnp.arange(num, dtype=jnp.int32)[None, :], dest_BxU)
  dest_BxT = jnp.where(valid_BxT, prepend(range(p), dest_BxU.astype(jnp.int32) + p), 0)
  kept_BxT = valid_BxT & ~prepend([False] * p, moved_BxU)
  slot_BxT = prepend([-1] * p, slot_BxU.astype(jnp.int32))
  return list_padded(dest_BxT[:, :num_in], kept_BxT[:, :num_in], slot_BxT[:, :num_in],
                     num_out=num_out, max_moved=max_moved)
