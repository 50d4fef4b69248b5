"""Token fusion at padded, shared shapes: the static layouts of the train step's paths.

XLA compiles one kernel per distinct shape. A fused model sees a different token count at
every layer, and the train step's teacher draws r' each step, so an exact-shape step holds
one program per r', each with its own kernels for every layer. The padded paths run the
teacher on token arrays of the full input width (by default; or of widths from a grid, the
input's token count minus multiples of ``fusion.train_token_step``), the surplus rows being
padding, and the student on arrays of its own token counts:

* a padding token has size 0, so proportional attention (+ log size on the keys, or a
  mask without it) gives it exactly zero attention; it takes no part in matching (its
  scores are -inf) and is never merged into a real token
  (``matching.bipartite_matching_padded``);
* how many tokens a block merges (r_ab, r_ba) is a runtime value, so one program serves
  every r' whose widths are alike: the teacher's switch has a branch per distinct layout
  of widths, not per r' (at full width: one for r' = 0, which does not fuse, and one for
  all the others);
* the matching runs at one width for all blocks (the input's token count);
* consecutive blocks that are alike (same width in and out, all fusing or none:
  ``alike_runs``; at full width, all the teacher's fused blocks) run as one ``lax.scan``
  over their stacked parameters (``fusion.train_scan_blocks``, ``stack.run_padded``).

The real tokens come out as in the exact-shape model (``tests/test_padded.py`` checks
logits against the golden reference outputs, the train step against the model's own
teacher path). The cost: the teacher's blocks also run on the padding rows, and the
matching runs at full width.

This module holds the static side: the widths of each path (``PaddedLayout``), the grid,
the merge-count tables and the runs of alike blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mctf_jax.fusion.schedule import Schedule


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
