"""Token fusion at padded, shared shapes: how the train step runs its paths.

XLA compiles one kernel per distinct shape. A fused model sees a different token count at
every layer, and the train step's teacher draws r' each step, so the exact-shape step holds
one program per r' (DeiT-S: 8), each with its own kernels for every layer: compiling it
takes ~20x the plain step. Here the teacher runs on token arrays of the full input width
(by default; or of widths from a grid, the input's token count minus multiples of
``fusion.train_token_step``), the surplus rows being padding, and the student on arrays of
its own token counts:

* a padding token has size 0, so proportional attention (+ log size on the keys, or a
  mask without it) gives it exactly zero attention; it takes no part in matching (its
  scores are -inf) and is never merged into a real token;
* how many tokens a block merges (r_ab, r_ba) is a runtime value, so one program serves
  every r' whose widths are alike: the teacher's switch has a branch per distinct layout
  of widths, not per r' (at full width: one for r' = 0, which does not fuse, and one for
  all the others);
* the matching runs at one width for all blocks (the input's token count). (Its kernels
  are still each block's own where the array is narrower: XLA fuses the padding into them.)
* consecutive blocks that are alike (same width in and out, all fusing or none:
  ``alike_runs``; at full width, all the teacher's fused blocks) run as one ``lax.scan``
  over their stacked parameters (``fusion.train_scan_blocks``), so XLA compiles and
  schedules one block for them all.

The real tokens come out as in the exact-shape model (``tests/test_padded.py`` checks
logits against the golden reference outputs, the train step against the model's own
teacher path). The cost: the teacher's blocks also run on the padding rows (DeiT-S at full
width: the teacher costs what an unfused forward does; the step's FLOPs are 1.47x the plain
step's against 1.38x at exact counts; measured times in the README's Speed section), and
the matching runs at full width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mctf_jax import fusion as F
from mctf_jax.schedule import Schedule


@dataclasses.dataclass(frozen=True)
class PaddedLayout:
  """The static part of a padded path: array widths and which blocks fuse.

  widths: the width of the token array entering each block, then leaving the last one.
  fuses: whether each block fuses (how many tokens it merges is a runtime value).
  """
  widths: tuple[int, ...]
  fuses: tuple[bool, ...]

  @property
  def depth(self) -> int:
    return len(self.fuses)


def token_grid(num_tokens: int, step: int | None, exact=()) -> tuple[int, ...]:
  """Allowed array widths, largest first: num_tokens - k * step (k >= 0), only num_tokens
  for step None, and the counts in `exact`."""
  if step is not None and (not isinstance(step, int) or step < 1):
    raise ValueError(f"the token grid step must be a positive integer or None, got {step!r}")
  values = set(range(num_tokens, 0, -(step or num_tokens))) | {int(t) for t in exact}
  if max(values) > num_tokens:
    raise ValueError(f"token counts {sorted(t for t in values if t > num_tokens)} exceed "
                     f"the {num_tokens} input tokens")
  return tuple(sorted(values, reverse=True))


def pad_width(tokens: int, grid) -> int:
  """The smallest grid width that holds `tokens` tokens."""
  fits = [w for w in grid if w >= tokens]
  if not fits:
    raise ValueError(f"no width in the grid {tuple(grid)} holds {tokens} tokens")
  return min(fits)


def layout_of(schedule: Schedule, grid) -> PaddedLayout:
  return PaddedLayout(tuple(pad_width(t, grid) for t in schedule.tokens_per_layer),
                      tuple(p.fuses for p in schedule.layers))


def alike_runs(layout: PaddedLayout, start: int = 0) -> list[tuple[int, int]]:
  """Blocks start .. depth-1 cut into runs [a, b) of alike blocks: the same array width
  in and out and the same `fuses`, so that one compiled block can run them all."""
  runs, previous = [], None
  for layer in range(start, layout.depth):
    kind = (layout.widths[layer], layout.widths[layer + 1], layout.fuses[layer])
    if kind == previous and kind[0] == kind[1]:
      runs[-1] = (runs[-1][0], layer + 1)
    else:
      runs.append((layer, layer + 1))
    previous = kind
  return runs


def splits_of(schedule: Schedule) -> np.ndarray:
  """(depth, 2) int32: the tokens each block merges A -> B and B -> A."""
  return np.asarray([(p.r_ab, p.r_ba) for p in schedule.layers], np.int32).reshape(-1, 2)


def covering_layout(layouts) -> PaddedLayout:
  """One layout that every one of `layouts` fits in: at each block the widest width, and
  fusing where any of them fuses (a block that fuses with zero merge counts changes no
  token). Paths whose examples draw different r' run at it together."""
  layouts = tuple(layouts)
  return PaddedLayout(tuple(max(w) for w in zip(*(l.widths for l in layouts))),
                      tuple(any(f) for f in zip(*(l.fuses for l in layouts))))


def max_moved(schedules) -> int:
  """The most tokens any block of `schedules` merges (the static size of the merge lists)."""
  return max([p.r for s in schedules for p in s.layers] + [1])


def pad_tokens(x_BxTxF: jax.Array, width: int, value=0) -> jax.Array:
  """Appends padding rows along the token axis up to `width`."""
  extra = width - x_BxTxF.shape[1]
  if extra < 0:
    raise ValueError(f"cannot pad {x_BxTxF.shape[1]} tokens to width {width}")
  if extra == 0:
    return x_BxTxF
  pads = [(0, 0), (0, extra)] + [(0, 0)] * (x_BxTxF.ndim - 2)
  return jnp.pad(x_BxTxF, pads, constant_values=value)


@F._scoped("scores")
def attention_received(probs_BxHxTxT: jax.Array, valid_BxT: jax.Array) -> jax.Array:
  """Mean attention each token receives over heads and the real queries: (B, T)."""
  heads = probs_BxHxTxT.shape[1]
  queries = valid_BxT.astype(jnp.float32)
  total = jnp.einsum("bhqk,bq->bk", probs_BxHxTxT.astype(jnp.float32), queries)
  return total / (heads * jnp.sum(queries, axis=-1, keepdims=True))


@F._scoped("matching")
def bipartite_matching(scores_BxAxB: jax.Array, valid_BxT: jax.Array, r_ab: jax.Array,
                       r_ba: jax.Array, *, num_in: int, num_out: int, max_moved: int,
                       bidirectional: bool = True):
  """``fusion.bipartite_matching`` on padded scores with runtime r_ab, r_ba (int32 scalars,
  or (B,) arrays: each example merges its own counts).

  scores_BxAxB: ``matching_scores(..., valid_BxT=valid)`` at any width >= num_in (the
  padding beyond the real tokens has -inf rows and columns, and ranks after every real
  token, so the real tokens get the ranks, places and destinations of the exact matching).
  Returns (Fusion, valid_BxO): a Fusion over num_in input and num_out output slots with
  max_moved entries in its merge lists (the unused ones point past the output, and merges
  drop them), and which output slots hold real tokens. Padding inputs map to slot 0 in
  ``dest_BxT`` (their attention weight is zero) and are never gathered.
  """
  scores_BxAxB = jax.lax.stop_gradient(scores_BxAxB)
  num_b = scores_BxAxB.shape[2]
  valid_a, valid_b = valid_BxT[:, ::2], valid_BxT[:, 1::2]
  # Scalars, or one count per example, shape (B,).
  r_ab = jnp.asarray(r_ab, jnp.int32).reshape(-1, 1)
  r_ba = jnp.asarray(r_ba, jnp.int32).reshape(-1, 1)

  best_score_BxA, best_b_BxA = F.max_argmax(scores_BxAxB, axis=-1)
  rank_a_BxA = F._descending_rank(best_score_BxA)
  moved_a = valid_a & (rank_a_BxA < r_ab)
  keep_a = valid_a & ~moved_a
  pos_a_BxA = F._places_among_kept(keep_a)
  num_kept_a = jnp.sum(keep_a, axis=-1, dtype=jnp.int32)[:, None]

  if bidirectional:
    scores_ba_BxAxB = jnp.where(keep_a[:, :, None], scores_BxAxB, -jnp.inf)
    best_score_BxB, best_a_BxB = F.max_argmax(scores_ba_BxAxB, axis=1)
    rank_b_BxB = F._descending_rank(best_score_BxB)
    moved_b = valid_b & (rank_b_BxB < r_ba)
    dest_b_BxB = jnp.where(moved_b, jnp.take_along_axis(pos_a_BxA, best_a_BxB, axis=-1),
                           num_kept_a + rank_b_BxB - r_ba)
    slot_b = jnp.where(moved_b, r_ab + rank_b_BxB, -1)
  else:
    moved_b = jnp.zeros_like(valid_b)
    dest_b_BxB = jnp.broadcast_to(num_kept_a + jnp.arange(num_b, dtype=jnp.int32),
                                  valid_b.shape)
    slot_b = jnp.full(valid_b.shape, -1, jnp.int32)
  dest_b_BxB = jnp.where(valid_b, dest_b_BxB, 0)
  dest_a_BxA = jnp.where(keep_a, pos_a_BxA,
                         jnp.take_along_axis(dest_b_BxB, best_b_BxA, axis=-1))
  dest_a_BxA = jnp.where(valid_a, dest_a_BxA, 0)

  dest_BxT = F._interleave(dest_a_BxA, dest_b_BxB)[:, :num_in]
  kept_BxT = F._interleave(keep_a, valid_b & ~moved_b)[:, :num_in]
  slot_BxT = F._interleave(jnp.where(moved_a, rank_a_BxA, -1), slot_b)[:, :num_in]
  # Each real output slot is built on the one kept token sent there; the slots that get
  # none are padding. (Derived from the arrays, not from r: only the matching's own small
  # kernels read the runtime r, so the kernels of every block are alike.)
  sent_BxOxT = (jnp.where(kept_BxT, dest_BxT, -1)[:, None, :] ==
                jnp.arange(num_out, dtype=jnp.int32)[None, :, None])
  anchor_BxO = F.first_index(sent_BxOxT, axis=-1)
  valid_BxO = jnp.any(sent_BxOxT, axis=-1)
  moving_BxRxT = slot_BxT[:, None, :] == jnp.arange(max_moved, dtype=jnp.int32)[None, :, None]
  moved_BxR = F.first_index(moving_BxRxT, axis=-1)
  moved_dest_BxR = jnp.where(jnp.any(moving_BxRxT, axis=-1),
                             jnp.take_along_axis(dest_BxT, moved_BxR, axis=-1), num_out)
  return F.Fusion(dest_BxT, anchor_BxO, moved_BxR, moved_dest_BxR), valid_BxO
