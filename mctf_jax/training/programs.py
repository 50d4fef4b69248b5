"""The programs train.py and eval.py run, from shapes alone: one place that builds them.

``train_program(config, mesh, steps_per_epoch)`` gives the train state's abstract shapes
and shardings on the ``('data', 'fsdp')`` mesh, the teacher plan, the optimizer and the
jitted train step (the state donated); ``eval_program(model, mesh, variables_shardings)``
the jitted evaluation step. ``train_batch`` and ``eval_batch`` are the abstract batches the
input pipelines feed them. The trainer runs these very programs; the ahead-of-time compile
tool (``mctf_jax.tools.compile``) lowers them for a TPU topology without allocating
anything, so a program that compiles there is the program train.py runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

import mctf_jax
from mctf_jax import parallel
from mctf_jax.fusion.steps import resolve_merge_impl
from mctf_jax.models.base import Backbone
from mctf_jax.training import evaluation, optim
from mctf_jax.training.plan import TeacherPlan, teacher_plan
from mctf_jax.training.train_step import TrainState, make_train_step


def mesh_platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices ('cpu', 'gpu', 'tpu'): compile-only TPU devices
  say 'tpu' on a host without one."""
  return next(iter(mesh.devices.flat)).platform


def model_for_mesh(config, mesh: Mesh) -> Backbone:
  """``create_model(config)`` with ``fusion.merge_impl='auto'`` resolved for the mesh's
  devices (not for the host that traces: a TPU program compiled ahead of time on a CPU
  host gets the TPU's merges)."""
  model = mctf_jax.create_model(config)
  impl = resolve_merge_impl(model.fusion.merge_impl, mesh_platform(mesh))
  return model.with_fusion(merge_impl=impl) if impl != model.fusion.merge_impl else model


@dataclasses.dataclass(frozen=True, eq=False)
class TrainProgram:
  """What the trainer needs before the first step (see ``train_program``).

  abstract_state: the TrainState as ShapeDtypeStructs carrying their shardings.
  state_shardings / variables_shardings: the state's shardings; the model variables'
    ({'params': ..., and the model's state collections}).
  step: train_step(state, batch) -> (state, metrics), jitted with those shardings, the
    batch split over the mesh, the state donated.
  """
  config: Any
  model: Backbone
  mesh: Mesh
  plan: TeacherPlan
  tx: optax.GradientTransformation
  schedule_fn: Callable
  abstract_state: TrainState
  state_shardings: TrainState
  variables_shardings: dict
  step: Any

  @property
  def use_ema(self) -> bool:
    return self.abstract_state.ema is not None

  def init_state(self, variables) -> TrainState:
    """Step 0 of training from `variables` ({'params': ..., state collections}, placed with
    ``variables_shardings``): the optimizer's initial state and the EMA (a copy of the
    parameters), sharded as ``step`` takes them."""
    params = variables["params"]
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
    ema = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.state_shardings.ema)(
        params) if self.use_ema else None
    return TrainState(jax.device_put(jnp.asarray(0, jnp.int32), parallel.replicated(self.mesh)),
                      params, opt_state, ema, {k: v for k, v in variables.items() if k != "params"})

  def lower(self, batch=None):
    """The step lowered for `batch` (default: ``train_batch`` of the config's batch)."""
    return self.step.lower(self.abstract_state, batch if batch is not None else
                           train_batch(self.config, self.model, self.mesh))


def train_program(config, mesh: Mesh, steps_per_epoch: int, *, model: Backbone | None = None,
                  plan: TeacherPlan | None = None) -> TrainProgram:
  """The train state's shapes and shardings and the jitted train step of `config` on
  `mesh`, nothing allocated. model: default ``model_for_mesh(config, mesh)``; plan: default
  ``teacher_plan(model, config.batch_size)``."""
  model = model_for_mesh(config, mesh) if model is None else model
  plan = teacher_plan(model, config.batch_size) if plan is None else plan
  schedule_fn = optim.make_schedule(config, steps_per_epoch)
  tx = optim.make_optimizer(config, steps_per_epoch)

  variables_shape = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                      model.dummy_images()))
  variables_sh = parallel.tree_shardings(mesh, variables_shape)
  params_shape = variables_shape["params"]
  param_sh = variables_sh["params"]
  model_state_shape = {k: v for k, v in variables_shape.items() if k != "params"}
  model_state_sh = {k: v for k, v in variables_sh.items() if k != "params"}
  opt_shape = jax.eval_shape(tx.init, params_shape)
  opt_sh = parallel.tree_shardings(mesh, opt_shape)
  use_ema = config.ema_decay > 0
  state_sh = TrainState(step=parallel.replicated(mesh), params=param_sh, opt_state=opt_sh,
                        ema=param_sh if use_ema else None, model_state=model_state_sh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          TrainState(jax.ShapeDtypeStruct((), jnp.int32), params_shape,
                                     opt_shape, params_shape if use_ema else None,
                                     model_state_shape), state_sh)
  step = jax.jit(make_train_step(model, tx, config, schedule_fn, plan),
                 in_shardings=(state_sh, parallel.batch_sharding(mesh)),
                 out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=(0,))
  return TrainProgram(config, model, mesh, plan, tx, schedule_fn, abstract, state_sh,
                      variables_sh, step)


def eval_program(model: Backbone, mesh: Mesh, variables_shardings,
                 forward: Callable | None = None):
  """The jitted evaluation step of `model` (``evaluation.make_eval_step``) on `mesh`;
  forward(variables, images) -> logits instead of ``model.apply`` where given."""
  return evaluation.compile_eval_step(model, mesh, variables_shardings, forward)


def _batch_struct(mesh: Mesh, shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh))


def train_batch(config, model: Backbone, mesh: Mesh) -> dict:
  """The global train batch as ``data.TrainPipeline`` yields it, as ShapeDtypeStructs:
  float32 images, int32 labels, and with mixup or cutmix the soft targets and the mixed
  labels."""
  b = int(config.batch_size)
  batch = {"image": _batch_struct(mesh, (b,) + tuple(model.config.image_shape), jnp.float32),
           "label": _batch_struct(mesh, (b,), jnp.int32)}
  if float(config.data.mixup) > 0 or float(config.data.cutmix) > 0:
    batch["targets"] = _batch_struct(mesh, (b, model.config.num_classes), jnp.float32)
    batch["mixed_label"] = _batch_struct(mesh, (b,), jnp.int32)
  return batch


def eval_batch(config, model: Backbone, mesh: Mesh) -> dict:
  """The global evaluation batch as ``data.eval_batches`` yields it (with its mask)."""
  b = int(config.eval_batch_size)
  return {"image": _batch_struct(mesh, (b,) + tuple(model.config.image_shape), jnp.float32),
          "label": _batch_struct(mesh, (b,), jnp.int32),
          "mask": _batch_struct(mesh, (b,), jnp.bool_)}


def abstract_variables(model: Backbone, mesh: Mesh) -> dict:
  """The model's variables ({'params': ..., state collections}) as ShapeDtypeStructs with
  the shardings train.py and eval.py give them on `mesh`, nothing allocated."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), model.dummy_images()))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, parallel.tree_shardings(mesh, shapes))
