"""The jitted MCTF train and eval steps (pure functions of the state and a batch).

One train step runs the student path (fixed r) and the teacher path (same weights, r'
drawn inside the step from [0, teacher_r_max)), and updates the parameters and the EMA.
The teacher r' changes token counts, hence shapes: the branches of one ``lax.switch``,
compiled once, hold the teacher's programs, and a draw from the step's key picks the
branch. By default the teacher runs on token arrays padded to the full width
(``mctf_jax.padded``, ``fusion.train_token_step``): one branch then serves every r' > 0
(the merge counts are runtime values), which cuts the compile time 3-4x; with
train_token_step=0 every distinct schedule is a branch of its own at exact shapes.
The key is derived from the seed and the step number, so the whole
step is a deterministic function of (state, batch) and a resumed run repeats an
uninterrupted one exactly.

r' is drawn for each group of ``fusion.teacher_group_size`` consecutive examples of the
global batch (the official code draws one per GPU: 8 per step of its 8 x 128 images), or
once for the whole batch. Groups need the padded teacher: its merge counts are runtime
values, per example, and the groups run together in the branch whose layout fits the
smallest r' drawn (``padded.covering_layout``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mctf_jax import losses, padded
from mctf_jax.config import ConfigError, FusionConfig
from mctf_jax.model import VisionTransformer, consistency
from mctf_jax.schedule import Schedule


@flax.struct.dataclass
class TrainState:
  step: jax.Array     # number of updates done (int32 scalar)
  params: Any
  opt_state: Any
  ema: Any            # EMA of the params, or None


def teacher_values(fusion: FusionConfig) -> tuple:
  """The r' a step may draw, uniformly: 0 .. teacher_r_max - 1 for a count, or the
  ratios k / 100 for k < 100 * teacher_r_max (the official code's draw for a ratio)."""
  top = fusion.teacher_r_max
  if top == 0:
    return ()
  if isinstance(top, int):
    return tuple(range(top))
  return tuple(k / 100 for k in range(int(round(top * 100))))


class TeacherBranches(NamedTuple):
  values: tuple            # the r' that can be drawn
  schedules: tuple         # per switch branch: its schedule (exact shapes), or the schedule
                           # of its first value (padded: values share a layout)
  branch_of_value: tuple   # values[i] runs branch branch_of_value[i]
  layouts: tuple | None = None   # padded: each branch's PaddedLayout


def padded_training(model: VisionTransformer) -> bool:
  """Whether the train step runs its paths at padded shapes (``mctf_jax.padded``)."""
  fusion = model.fusion
  return fusion.train_token_step != 0 and fusion.pooling != "max" and (
      model.schedule().fuses or any(model.schedule(v).fuses for v in teacher_values(fusion)))


def token_grid(model: VisionTransformer) -> tuple:
  """The widths the teacher's token arrays are padded to (the student runs at its own
  counts)."""
  return padded.token_grid(model.model.num_tokens, model.fusion.train_token_step)


def teacher_branches(model: VisionTransformer, grid=None) -> TeacherBranches:
  """The switch branches of the teacher: one per distinct schedule, or with a token grid
  (padded shapes), one per distinct layout on that grid."""
  values = teacher_values(model.fusion)
  keys, schedules, layouts = [], [], []
  branch_of_value = []
  for value in values:
    schedule = model.schedule(value)
    # Ratios that give the same token counts (or padded widths) share a branch.
    key = schedule.layers if grid is None else padded.layout_of(schedule, grid)
    if key not in keys:
      keys.append(key)
      schedules.append(schedule)
      layouts.append(key)
    branch_of_value.append(keys.index(key))
  return TeacherBranches(values, tuple(schedules), tuple(branch_of_value),
                         None if grid is None else tuple(layouts))


def step_teachers(model: VisionTransformer) -> TeacherBranches:
  """The teacher branches as ``make_train_step`` builds them (padded or exact)."""
  return teacher_branches(model, token_grid(model) if padded_training(model) else None)


def teacher_groups(model: VisionTransformer, batch_size: int) -> int:
  """How many r' a train step on a global batch of `batch_size` draws: one per
  ``fusion.teacher_group_size`` examples, or one (size 0, or a batch no larger)."""
  size = model.fusion.teacher_group_size
  if not teacher_values(model.fusion) or not size or batch_size <= size:
    return 1
  if batch_size % size:
    raise ConfigError(f"batch_size={batch_size} is not a multiple of "
                      f"fusion.teacher_group_size={size} (the examples that share one "
                      f"teacher r'); choose a multiple, or teacher_group_size=0 for one r' "
                      f"per batch")
  if not padded_training(model):
    raise ConfigError(f"fusion.teacher_group_size={size} splits the batch of {batch_size} "
                      f"into groups with an r' each, which needs the padded teacher "
                      f"(fusion.train_token_step None or > 0, pooling other than 'max'); "
                      f"or set teacher_group_size=0")
  return batch_size // size


def shared_blocks(schedules) -> int:
  """How many leading blocks fuse in none of `schedules`. The student and every teacher
  compute these blocks identically, so a train step runs them once (DeiT-S MCTF: block 0;
  MCTF-Fast: blocks 0-2)."""
  depth = len(schedules[0].layers)
  n = 0
  while n < depth and not any(s.layers[n].fuses for s in schedules):
    n += 1
  return n


def _step_keys(base_key, step):
  return jax.random.split(jax.random.fold_in(base_key, step), 4)


class GroupBranches(NamedTuple):
  layouts: tuple            # the switch's branches: the teacher's own, then the covering
                            # layouts they lack
  branch_of_lowest: tuple   # values[i] is the smallest r' drawn: the branch that fits it
                            # and every larger value


def group_branches(teachers: TeacherBranches) -> GroupBranches:
  """The switch branches of a padded teacher whose step draws several r' (``teacher_groups``
  > 1): the groups run together in the layout that fits the smallest r' drawn and every
  larger one (``padded.covering_layout``), or all drew 0 and run its unfused branch. At
  full width that is the branch of the r' > 0; on a token grid a draw of 0 beside larger r'
  needs a fusing layout at the full width, a branch of its own."""
  if teachers.layouts is None:
    raise ValueError("groups of r' need the padded teacher (TeacherBranches.layouts)")
  value_layouts = [teachers.layouts[b] for b in teachers.branch_of_value]
  covering = [padded.covering_layout(value_layouts[i:]) for i in range(len(value_layouts))]
  layouts = list(teachers.layouts) + [c for c in dict.fromkeys(covering)
                                      if c not in teachers.layouts]
  return GroupBranches(tuple(layouts), tuple(layouts.index(c) for c in covering))


def switch_paths(teachers: TeacherBranches, groups: int = 1) -> tuple:
  """The branches of the train step's teacher switch: a Schedule each (exact shapes) or a
  PaddedLayout each, with several r' a step (`groups` > 1) also the covering layouts."""
  if groups > 1:
    return group_branches(teachers).layouts
  return teachers.schedules if teachers.layouts is None else teachers.layouts


def _draw(key, num_values: int, groups: int = 1):
  """Indices into the teacher values: a scalar for one group (the draw of a step before
  there were groups), else one per group."""
  return jax.random.randint(key, () if groups == 1 else (groups,), 0, num_values)


def teacher_value_at(model: VisionTransformer, seed: int, step: int, batch_size: int = 0):
  """The r' that the train step numbered `step` (0-based) draws on a global batch of
  batch_size: one value, or a tuple of one per group (``teacher_groups``); None without a
  teacher. (benchmarks/train_step.py uses it to time every r' alike.)"""
  values = teacher_values(model.fusion)
  if not values:
    return None
  groups = teacher_groups(model, batch_size)
  k_draw = _step_keys(jax.random.PRNGKey(seed), step)[0]
  draw = np.asarray(_draw(k_draw, len(values), groups))
  return values[int(draw)] if groups == 1 else tuple(values[int(i)] for i in draw)


def loss_config(config) -> losses.LossConfig:
  c = config.loss
  return losses.LossConfig(label_smoothing=c.label_smoothing,
                           threshold=c.consistency_threshold,
                           weights=(c.weight_student, c.weight_teacher, c.weight_consistency))


def make_train_step(model: VisionTransformer, tx: optax.GradientTransformation, config,
                    schedule_fn=None):
  """train_step(state, batch) -> (state, metrics); jit it with the shardings you need.

  batch: 'image' (B, H, W, 3) float, 'label' (B,) int, and with mixup/cutmix 'targets'
  (B, C) soft targets and 'mixed_label' (B,).

  The loss is L = L_student + L_teacher + L_consistency(student, stop_gradient(teacher)),
  so its gradient splits into the gradient of L_teacher, which depends on the teacher path
  alone, and that of L_student + L_consistency with the teacher's class token held fixed.
  Each switch branch computes its teacher's forward and backward pass itself, and nothing
  is differentiated through the switch: differentiating through it would make every
  branch carry every other branch's residuals, and compile time grow with their square.
  The embedding and the blocks before the first fused one (``shared_blocks``) run once;
  both paths' gradients with respect to their output flow back through them together.
  """
  student_schedule = model.schedule()
  pad = padded_training(model)
  teachers = step_teachers(model)
  shared = shared_blocks((student_schedule,) + teachers.schedules)
  loss_cfg = loss_config(config)
  w_student, w_teacher, w_cons = loss_cfg.weights
  ema_decay = float(config.ema_decay)
  base_key = jax.random.PRNGKey(config.seed)
  depth = len(student_schedule.layers)
  if pad:
    value_schedules = [model.schedule(v) for v in teachers.values]
    bound = padded.max_moved([student_schedule] + value_schedules)
    student_path = padded.layout_of(student_schedule, student_schedule.tokens_per_layer)
    student_splits = padded.splits_of(student_schedule)
    # Every r' runs its branch's program with its own merge counts, read from this table.
    teacher_splits = (np.stack([padded.splits_of(s) for s in value_schedules])
                      if value_schedules else None)
    # With groups (several r' a step): the branch that fits the smallest r' drawn.
    grouped = group_branches(teachers) if teachers.values else None
  else:
    student_path, student_splits, grouped = student_schedule, None, None
  if config.get("batch_size") is not None:
    teacher_groups(model, int(config.batch_size))   # a bad batch or group size fails here

  def shared_tokens(params, images, k_embed, k_blocks):
    # The embedding and the blocks before the first fusion, common to both paths (as the
    # reference shares the embedded tokens between them; those blocks see identical input).
    x = model.apply({"params": params}, images, deterministic=False, method=model.embed,
                    rngs={"dropout": k_embed})
    return model.apply({"params": params}, x, shared, deterministic=False,
                       method=model.run_unfused, rngs={"dropout": k_blocks})

  def encode(params, h, path, key, splits=None, first=None):
    """The final tokens of one path: path is a Schedule (exact shapes), or a
    PaddedLayout with its merge counts in the runtime array `splits` (and `first`, the
    index of the first block as a runtime value: see ``run_blocks_padded``)."""
    if isinstance(path, Schedule):
      return model.apply({"params": params}, h, path, deterministic=False,
                         trace_source=False, start=shared, method=model.run_blocks,
                         rngs={"dropout": key}).tokens_BxTxC
    return model.apply({"params": params}, h, path, splits, max_moved=bound, first=first,
                       deterministic=False, start=shared, method=model.run_blocks_padded,
                       rngs={"dropout": key}).tokens_BxTxC

  def classify(params, tokens):
    return model.apply({"params": params}, tokens, method=model.classify)

  def ce(logits, batch):
    return losses.classification_loss(logits, batch["label"], loss_cfg.label_smoothing,
                                      batch.get("targets"))

  def teacher_branch(path):
    def run(params, h, batch, k_teacher, splits, first):
      def teacher_loss(params, h):
        cls = encode(params, h, path, k_teacher, splits, first)[:, :1]
        return w_teacher * ce(classify(params, cls), batch), cls
      (loss, cls), grads = jax.value_and_grad(teacher_loss, argnums=(0, 1), has_aux=True)(
          params, h)
      return loss, cls, grads
    return run

  def student_loss(params, h, batch, teacher_cls, k_student, first):
    tokens = encode(params, h, student_path, k_student, student_splits, first)
    logits = classify(params, tokens)
    loss = w_student * ce(logits, batch)
    parts = {"loss_student": loss}
    if teacher_cls is not None:
      cons, passed = losses.consistency_loss(consistency(tokens, teacher_cls), logits,
                                             batch["label"], loss_cfg.threshold,
                                             batch.get("mixed_label"))
      parts.update(loss_consistency=w_cons * cons, pass_rate=jnp.mean(passed))
      loss = loss + w_cons * cons
    return loss, (parts, logits)

  def train_step(state: TrainState, batch):
    k_draw, k_embed, k_student, k_teacher = _step_keys(base_key, state.step)
    # `shared` as a value XLA cannot fold (the step is never negative): see
    # ``run_blocks_padded``; with it the blocks of one width share their kernels.
    first = shared + jnp.minimum(state.step, 0)
    # The shared blocks take the student's dropout key: the student path is then exactly
    # what one call of the model with k_student would compute.
    h, shared_vjp = jax.vjp(lambda p: shared_tokens(p, batch["image"], k_embed, k_student),
                            state.params)
    teacher_cls, teacher_r = None, jnp.zeros((), jnp.float32)
    if teachers.values:
      batch_size = batch["image"].shape[0]
      groups = teacher_groups(model, batch_size)
      draw = _draw(k_draw, len(teachers.values), groups)
      teacher_r = jnp.mean(jnp.asarray(teachers.values, jnp.float32)[draw])
      if groups > 1:
        # All drew r' = 0: its own branch (no fusion). Else the smallest r' drawn decides.
        lowest = jnp.asarray(grouped.branch_of_lowest, jnp.int32)[jnp.min(draw)]
        branch = jnp.where(jnp.max(draw) == 0, teachers.branch_of_value[0], lowest)
        paths = grouped.layouts
        # (depth, B, 2): the merge counts of each example's group.
        splits = jnp.repeat(jnp.asarray(teacher_splits)[draw], batch_size // groups, axis=0)
        splits = jnp.transpose(splits, (1, 0, 2))
      else:
        branch = jnp.asarray(teachers.branch_of_value, jnp.int32)[draw]
        paths = switch_paths(teachers)
        splits = (jnp.asarray(teacher_splits)[draw] if pad
                  else jnp.zeros((depth, 2), jnp.int32))   # unused at exact shapes
      loss_teacher, teacher_cls, (teacher_grads, teacher_dh) = jax.lax.switch(
          branch, [teacher_branch(p) for p in paths], state.params, h, batch, k_teacher,
          splits, first)
    (loss, (parts, logits)), (grads, dh) = jax.value_and_grad(
        student_loss, argnums=(0, 1), has_aux=True)(state.params, h, batch, teacher_cls,
                                                    k_student, first)
    if teacher_cls is not None:
      grads = jax.tree.map(jnp.add, grads, teacher_grads)
      dh = dh + teacher_dh
      loss = loss + loss_teacher
      parts["loss_teacher"] = loss_teacher
    grads = jax.tree.map(jnp.add, grads, shared_vjp(dh)[0])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    metrics = dict(parts, loss=loss, teacher_r=teacher_r,
                   accuracy=jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
                   grad_norm=optax.global_norm(grads))
    if schedule_fn is not None:
      metrics["lr"] = schedule_fn(state.step)
    metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
    return TrainState(state.step + 1, params, opt_state, ema), metrics

  return train_step


def tree_is_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
