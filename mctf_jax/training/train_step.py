"""The jitted MCTF train step (a pure function of the state and a batch).

One train step runs the student path (fixed r) and the teacher path (same weights, r'
drawn inside the step from [0, teacher_r_max)), and updates the parameters and the EMA.
The teacher r' changes token counts, hence shapes: the branches of one ``lax.switch``,
compiled once, hold the teacher's programs, and a draw from the step's key picks the
branch; which branches there are is the ``TeacherPlan`` (``mctf_jax.training.plan``). The
key is derived from the seed and the step number, so the whole step is a deterministic
function of (state, batch) and a resumed run repeats an uninterrupted one exactly.

The step reaches the model only through the backbone protocol of
``mctf_jax.models.base``: ``embed``, ``run_unfused``, ``run_blocks`` /
``run_blocks_padded``, ``train_logits`` and ``features``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mctf_jax.errors import ConfigError
from mctf_jax.fusion.config import normalize_r
from mctf_jax.fusion.padded import PaddedLayout
from mctf_jax.models.base import consistency
from mctf_jax.training import losses
from mctf_jax.training.plan import TeacherPlan, draw_values, step_keys, teacher_plan


@flax.struct.dataclass
class TrainState:
  step: jax.Array     # number of updates done (int32 scalar)
  params: Any
  opt_state: Any
  ema: Any            # EMA of the params, or None
  model_state: Any = flax.struct.field(default_factory=dict)
  # model_state: the model's variables other than params, by collection (e.g.
  # {'batch_stats': ...}); empty for most backbones.


def loss_config(config) -> losses.LossConfig:
  c = config.loss
  return losses.LossConfig(label_smoothing=c.label_smoothing,
                           threshold=c.consistency_threshold,
                           weights=(c.weight_student, c.weight_teacher, c.weight_consistency))


class TrainOutputs(NamedTuple):
  """One training forward (``loss_and_grads``), what the train step differentiates.

  loss: the total, L_student + L_teacher + L_consistency.
  parts: the weighted terms (``losses.student_loss``, ``losses.teacher_loss``):
    loss_student, and with a teacher loss_teacher, loss_consistency and pass_rate.
  student_logits: (B, classes), the logits the losses read (``Backbone.train_logits``).
  teacher_logits: the teacher path's, or None without a teacher.
  consistency: (B,) the distance of the student's features to the teacher's (held fixed),
    before the confidence mask; None without a teacher.
  model_state: the model state after the step's embedding (e.g. BatchNorm statistics).
  """
  loss: jax.Array
  parts: dict
  student_logits: jax.Array
  teacher_logits: jax.Array | None
  consistency: jax.Array | None
  model_state: Any


def make_loss_and_grads(model, loss_cfg: losses.LossConfig, plan: TeacherPlan):
  """fn(params, model_state, batch, keys, first, teacher) -> (TrainOutputs, grads): the
  training forward and backward of the train step, without the draw and the update.

  keys: (embedding, student, teacher) dropout keys. first: ``plan.shared``, the first block
  after the shared ones, as a runtime int32 (``fusion.stack.run_padded``). teacher: None
  (no teacher), or (branch, splits): the index of the plan's path the teacher runs and
  its merge counts (padded paths: (depth, 2), or (depth, B, 2) per example; unused at
  exact shapes).

  The loss is L = L_student + L_teacher + L_consistency(student, stop_gradient(teacher)),
  so its gradient splits into the gradient of L_teacher, which depends on the teacher path
  alone, and that of L_student + L_consistency with the teacher's features held fixed.
  Each switch branch computes its teacher's forward and backward pass itself, and nothing
  is differentiated through the switch: differentiating through it would make every
  branch carry every other branch's residuals, and compile time grow with their square.
  The embedding and the blocks before the first fused one (``plan.shared``) run once;
  both paths' gradients with respect to their output flow back through them together.
  """
  shared = plan.shared
  if plan.padded:
    student_path, student_splits = plan.student_layout, plan.student_splits()
  else:
    student_path, student_splits = plan.student, None

  def variables(params, model_state):
    return {"params": params, **model_state}

  def shared_tokens(params, model_state, images, k_embed, k_blocks):
    # The embedding and the blocks before the first fusion, common to both paths (as the
    # reference shares the embedded tokens between them; those blocks see identical input).
    # The embedding updates the model state (e.g. BatchNorm statistics), if any.
    if model_state:
      x, new_state = model.apply(variables(params, model_state), images, deterministic=False,
                                 method=model.embed, rngs={"dropout": k_embed},
                                 mutable=list(model_state))
    else:
      x = model.apply({"params": params}, images, deterministic=False, method=model.embed,
                      rngs={"dropout": k_embed})
      new_state = model_state
    h = model.apply(variables(params, model_state), x, shared, deterministic=False,
                    method=model.run_unfused, rngs={"dropout": k_blocks})
    return h, new_state

  def encode(params, model_state, h, path, key, splits=None, first=None):
    """The EncoderOutput of one path: path is a Schedule (exact shapes), or a
    PaddedLayout with its merge counts in the runtime array `splits` (and `first`, the
    index of the first block as a runtime value: see ``fusion.stack.run_padded``)."""
    if isinstance(path, PaddedLayout):
      return model.apply(variables(params, model_state), h, path, splits,
                         max_moved=plan.max_moved, first=first, deterministic=False,
                         start=shared, method=model.run_blocks_padded, rngs={"dropout": key})
    return model.apply(variables(params, model_state), h, path, deterministic=False,
                       trace_source=False, start=shared, method=model.run_blocks,
                       rngs={"dropout": key})

  def head(params, model_state, out):
    v = variables(params, model_state)
    return (model.apply(v, out.tokens_BxTxC, out.size_BxT, method=model.train_logits),
            model.apply(v, out.tokens_BxTxC, out.size_BxT, method=model.features))

  def teacher_branch(path):
    def run(params, model_state, h, batch, k_teacher, splits, first):
      def teacher_loss(params, h):
        logits, features = head(params, model_state,
                                encode(params, model_state, h, path, k_teacher, splits, first))
        return losses.teacher_loss(logits, batch["label"], loss_cfg,
                                   batch.get("targets")), (features, logits)
      (loss, (features, logits)), grads = jax.value_and_grad(
          teacher_loss, argnums=(0, 1), has_aux=True)(params, h)
      return loss, features, logits, grads
    return run

  def student_loss(params, model_state, h, batch, teacher_features, k_student, first):
    out = encode(params, model_state, h, student_path, k_student, student_splits, first)
    logits, features = head(params, model_state, out)
    distance = None if teacher_features is None else consistency(features, teacher_features)
    loss, parts = losses.student_loss(logits, batch["label"], loss_cfg, batch.get("targets"),
                                      distance, batch.get("mixed_label"))
    return loss, (parts, logits, distance)

  def objective(params, model_state, batch, keys, first, teacher=None):
    k_embed, k_student, k_teacher = keys
    # The shared blocks take the student's dropout key: the student path is then exactly
    # what one call of the model with k_student would compute.
    h, shared_vjp, new_model_state = jax.vjp(
        lambda p: shared_tokens(p, model_state, batch["image"], k_embed, k_student),
        params, has_aux=True)
    teacher_features = teacher_logits = None
    if teacher is not None:
      branch, splits = teacher
      loss_teacher, teacher_features, teacher_logits, (teacher_grads, teacher_dh) = (
          jax.lax.switch(branch, [teacher_branch(p) for p in plan.paths], params,
                         model_state, h, batch, k_teacher, splits, first))
    (loss, (parts, logits, distance)), (grads, dh) = jax.value_and_grad(
        student_loss, argnums=(0, 2), has_aux=True)(params, model_state, h, batch,
                                                    teacher_features, k_student, first)
    if teacher is not None:
      grads = jax.tree.map(jnp.add, grads, teacher_grads)
      dh = dh + teacher_dh
      loss = loss + loss_teacher
      parts["loss_teacher"] = loss_teacher
    grads = jax.tree.map(jnp.add, grads, shared_vjp(dh)[0])
    return TrainOutputs(loss, parts, logits, teacher_logits, distance, new_model_state), grads

  return objective


def loss_and_grads(model, params, batch, key, *, teacher_r=None,
                   loss_config: losses.LossConfig = losses.LossConfig(), model_state=None):
  """The training loss of `batch` and its gradient, as train.py's step computes them, with
  the teacher at a given r' (the step draws it): (TrainOutputs, grads).

  batch: 'image' (B, H, W, C) floats and 'label' (B,) ints; with mixup/cutmix also
  'targets' (B, classes) and 'mixed_label' (B,). key: the step's dropout key. teacher_r: a
  static r' (count, ratio or per-block counts), or None for the student alone. Jit it with
  `model` and `teacher_r` static, e.g.
  ``jax.jit(functools.partial(loss_and_grads, model, teacher_r=3))``.
  """
  values = () if teacher_r is None else (normalize_r(teacher_r, "teacher_r",
                                                    model.fusion.method),)
  plan = teacher_plan(model, int(batch["image"].shape[0]), values=values)
  fn = make_loss_and_grads(model, loss_config, plan)
  k_embed, k_student, k_teacher = jax.random.split(key, 3)
  teacher = None
  if values:
    splits = (jnp.asarray(plan.teacher_splits()[0]) if plan.padded
              else jnp.zeros((len(plan.student.layers), 2), jnp.int32))
    teacher = (0, splits)
  return fn(params, {} if model_state is None else model_state, batch,
            (k_embed, k_student, k_teacher), jnp.asarray(plan.shared, jnp.int32), teacher)


def make_train_step(model, tx: optax.GradientTransformation, config, schedule_fn=None,
                    plan: TeacherPlan | None = None):
  """train_step(state, batch) -> (state, metrics); jit it with the shardings you need.

  batch: 'image' (B, H, W, C) float, 'label' (B,) int, and with mixup/cutmix 'targets'
  (B, classes) soft targets and 'mixed_label' (B,). plan: the step's teacher plan (default:
  ``teacher_plan(model, config.batch_size)``); the batch must have its batch size when its
  groups are more than one.

  The step draws the teacher's r' (one per group of examples) from the step's key, runs
  ``make_loss_and_grads`` and updates the parameters and the EMA.
  """
  if plan is None:
    plan = teacher_plan(model, int(config.batch_size))
  shared = plan.shared
  objective = make_loss_and_grads(model, loss_config(config), plan)
  ema_decay = float(config.ema_decay)
  base_key = jax.random.PRNGKey(config.seed)
  depth = len(plan.student.layers)
  # Every r' runs its branch's program with its own merge counts, read from this table.
  teacher_splits = plan.teacher_splits() if plan.padded and plan.values else None

  def train_step(state: TrainState, batch):
    k_draw, k_embed, k_student, k_teacher = step_keys(base_key, state.step)
    # `shared` as a value XLA cannot fold (the step is never negative): see
    # ``fusion.stack.run_padded``; with it the blocks of one width share their kernels.
    first = shared + jnp.minimum(state.step, 0)
    teacher, teacher_r = None, jnp.zeros((), jnp.float32)
    if plan.values:
      batch_size = batch["image"].shape[0]
      if plan.groups > 1 and batch_size != plan.group_size * plan.groups:
        raise ConfigError(f"the train step's plan is for batches of "
                          f"{plan.group_size * plan.groups} examples ({plan.groups} groups "
                          f"with an r' each), got {batch_size}")
      draw = draw_values(k_draw, len(plan.values), plan.groups)
      teacher_r = jnp.mean(jnp.asarray(plan.values, jnp.float32)[draw])
      if plan.groups > 1:
        # All drew r' = 0: its own branch (no fusion). Else the smallest r' drawn decides.
        lowest = jnp.asarray(plan.branch_of_lowest, jnp.int32)[jnp.min(draw)]
        branch = jnp.where(jnp.max(draw) == 0, plan.branch_of_value[0], lowest)
        # (depth, B, 2): the merge counts of each example's group.
        splits = jnp.repeat(jnp.asarray(teacher_splits)[draw], plan.group_size, axis=0)
        splits = jnp.transpose(splits, (1, 0, 2))
      else:
        branch = jnp.asarray(plan.branch_of_value, jnp.int32)[draw]
        splits = (jnp.asarray(teacher_splits)[draw] if plan.padded
                  else jnp.zeros((depth, 2), jnp.int32))   # unused at exact shapes
      teacher = (branch, splits)
    out, grads = objective(state.params, state.model_state, batch,
                           (k_embed, k_student, k_teacher), first, teacher)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    metrics = dict(out.parts, loss=out.loss, teacher_r=teacher_r,
                   accuracy=jnp.mean(jnp.argmax(out.student_logits, -1) == batch["label"]),
                   grad_norm=optax.global_norm(grads))
    if schedule_fn is not None:
      metrics["lr"] = schedule_fn(state.step)
    metrics["finite"] = jnp.isfinite(out.loss) & jnp.isfinite(metrics["grad_norm"])
    return TrainState(state.step + 1, params, opt_state, ema, out.model_state), metrics

  return train_step


def tree_is_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
