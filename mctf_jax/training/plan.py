"""The train step's teacher plan: the r' a step draws and how the teacher runs them.

``teacher_plan(model, batch_size)`` computes it once, as a frozen value that prints
itself; the train step builds its ``lax.switch`` from it, the trainer logs it and the
train-step benchmark reads its branches.

The teacher draws r' uniformly from ``teacher_values`` for each group of
``fusion.teacher_group_size`` examples (or once for the batch). At exact shapes
(``fusion.train_token_step=0``) every distinct schedule of r' is a switch branch of its
own. At padded shapes (``mctf_jax.fusion.padded``) the branches are the distinct layouts
of widths, the merge counts being runtime values: at full width one branch for r' = 0 and
one for every r' > 0. With several groups a step, the groups run together in the layout
that fits the smallest r' drawn and every larger one (``padded.covering_layout``), which
on a token grid may be a branch that no single r' has.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from mctf_jax.errors import ConfigError
from mctf_jax.fusion import padded
from mctf_jax.fusion.config import FusionConfig
from mctf_jax.fusion.padded import PaddedLayout
from mctf_jax.fusion.schedule import Schedule


def teacher_values(fusion: FusionConfig) -> tuple:
  """The r' a step may draw, uniformly: 0 .. teacher_r_max - 1 for a count, or the
  ratios k / 100 for k < 100 * teacher_r_max (the official code's draw for a ratio); for
  PiToMe, whose r is a keep ratio, 0 (no fusion) and the keep ratios 0.99, 0.98, ... down
  to teacher_r_max."""
  top = fusion.teacher_r_max
  if top == 0:
    return ()
  if fusion.method == "pitome":
    # Keep ratios from 1 (no fusion, r' = 0) down to teacher_r_max, in steps of 0.01.
    return (0,) + tuple(k / 100 for k in range(99, math.ceil(round(top * 100, 6)) - 1, -1))
  if isinstance(top, int):
    return tuple(range(top))
  return tuple(k / 100 for k in range(int(round(top * 100))))


@dataclasses.dataclass(frozen=True)
class TeacherPlan:
  """How a train step runs its student and teacher paths (see the module docstring).

  values: the r' a step may draw (empty: no teacher).
  value_schedules: the schedule of each value.
  groups: how many r' a step draws (one per group of consecutive examples).
  group_size: the examples sharing one r'.
  padded: whether the paths run at padded shapes (else at exact token counts).
  token_step: fusion.train_token_step (None: padded to the full width).
  paths: the switch's branches: a Schedule each (exact shapes) or a PaddedLayout each.
  branch_of_value: a step of one group that draws values[i] runs paths[branch_of_value[i]].
  branch_of_lowest: several groups: the branch when values[i] is the smallest r' drawn
    (when all drew values[0] = 0, branch_of_value[0]).
  student: the student's schedule; student_layout: its own widths (padded only).
  shared: the leading blocks that no path fuses, run once for both paths.
  max_moved: padded: the most tokens any block merges (the static size of merge lists).
  """
  values: tuple
  value_schedules: tuple[Schedule, ...]
  groups: int
  group_size: int
  padded: bool
  token_step: int | None
  paths: tuple
  branch_of_value: tuple[int, ...]
  branch_of_lowest: tuple[int, ...]
  student: Schedule
  student_layout: PaddedLayout | None
  shared: int
  max_moved: int

  @property
  def num_branches(self) -> int:
    return len(self.paths)

  @property
  def teacher_tokens_out(self) -> list[int]:
    return sorted({s.tokens_out for s in self.value_schedules})

  def student_splits(self) -> np.ndarray:
    """(depth, 2) int32: the student's merge counts (padded paths)."""
    return padded.splits_of(self.student)

  def teacher_splits(self) -> np.ndarray:
    """(values, depth, 2) int32: each r''s merge counts (padded paths)."""
    return np.stack([padded.splits_of(s) for s in self.value_schedules])

  def value_at(self, seed: int, step: int):
    """The r' that the train step numbered `step` (0-based) draws: one value, or a tuple
    of one per group; None without a teacher."""
    if not self.values:
      return None
    draw = np.asarray(draw_values(step_keys(jax.random.PRNGKey(seed), step)[0],
                                  len(self.values), self.groups))
    return (self.values[int(draw)] if self.groups == 1
            else tuple(self.values[int(i)] for i in draw))

  def __str__(self) -> str:
    if not self.values:
      return "no teacher (fusion.teacher_r_max = 0)"
    groups = (f" for each group of {self.group_size} images ({self.groups} a step)"
              if self.groups > 1 else "")
    shapes = ("" if not self.padded else " (token arrays padded to the full width)"
              if self.token_step is None else
              f" (token arrays padded to a grid of step {self.token_step})")
    return (f"teacher r' drawn from {list(self.values)}{groups}: {self.num_branches} switch "
            f"branch(es){shapes}, ending at {self.teacher_tokens_out} tokens")


def step_keys(base_key, step):
  """The step's keys: (draw, embedding, student, teacher)."""
  return jax.random.split(jax.random.fold_in(base_key, step), 4)


def draw_values(key, num_values: int, groups: int = 1):
  """Indices into the teacher values: a scalar for one group (the draw of a step before
  there were groups), else one per group."""
  return jax.random.randint(key, () if groups == 1 else (groups,), 0, num_values)


def _padded(model, schedules) -> bool:
  fusion = model.fusion
  return (fusion.train_token_step != 0 and fusion.pooling != "max"
          and any(s.fuses for s in schedules))


def _groups(model, batch_size: int, values, padded_paths: bool) -> int:
  size = model.fusion.teacher_group_size
  if not values or not size or batch_size <= size:
    return 1
  if batch_size % size:
    raise ConfigError(f"batch_size={batch_size} is not a multiple of "
                      f"fusion.teacher_group_size={size} (the examples that share one "
                      f"teacher r'); choose a multiple, or teacher_group_size=0 for one r' "
                      f"per batch")
  if not padded_paths:
    raise ConfigError(f"fusion.teacher_group_size={size} splits the batch of {batch_size} "
                      f"into groups with an r' each, which needs the padded teacher "
                      f"(fusion.train_token_step None or > 0, pooling other than 'max'); "
                      f"or set teacher_group_size=0")
  return batch_size // size


def teacher_plan(model, batch_size: int, values: tuple | None = None) -> TeacherPlan:
  """The plan of `model`'s train step on global batches of `batch_size` examples.

  values: the r' to plan for (default: ``teacher_values(model.fusion)``, drawn for each
  group of fusion.teacher_group_size examples); given, the batch is one group.
  ConfigError for a batch that is not a multiple of fusion.teacher_group_size, or groups
  without the padded teacher.
  """
  student = model.schedule()
  given = values is not None
  values = tuple(values) if given else teacher_values(model.fusion)
  schedules = tuple(model.schedule(v) for v in values)
  pad = _padded(model, (student,) + schedules)
  groups = 1 if given else _groups(model, batch_size, values, pad)
  if pad:
    grid = padded.token_grid(model.config.num_tokens, model.fusion.train_token_step)
    keys = [padded.layout_of(s, grid) for s in schedules]
  else:
    keys = [s.layers for s in schedules]
  # Values whose token counts (exact) or layouts (padded) agree share a branch.
  paths, branch_of_value = [], []
  for value, key in zip(values, keys):
    if key not in paths:
      paths.append(key)
    branch_of_value.append(paths.index(key))
  branch_of_lowest = ()
  if groups > 1:
    covering = [padded.covering_layout(keys[i:]) for i in range(len(keys))]
    paths += [c for c in dict.fromkeys(covering) if c not in paths]
    branch_of_lowest = tuple(paths.index(c) for c in covering)
  if not pad:
    # At exact shapes a branch is a schedule: the first value's of its kind.
    paths = [schedules[branch_of_value.index(b)] for b in range(len(paths))]
  shared = min(s.unfused_prefix() for s in (student,) + schedules)
  return TeacherPlan(
      values=values, value_schedules=schedules, groups=groups,
      group_size=batch_size // groups, padded=pad,
      token_step=model.fusion.train_token_step, paths=tuple(paths),
      branch_of_value=tuple(branch_of_value), branch_of_lowest=branch_of_lowest,
      student=student,
      student_layout=padded.layout_of(student, student.tokens_per_layer) if pad else None,
      shared=shared, max_moved=padded.max_moved((student,) + schedules) if pad else 0)
