"""MCTF fine-tuning on one device, many devices and many hosts: ``train_and_evaluate``.

The loop around ``train_step``: data, mesh and shardings, initialisation (random or from a
converted/PyTorch checkpoint), exact resumption from its checkpoints (written and read by
mctf_jax.checkpoint), preemption (SIGTERM) handling, a stop on a non-finite loss that keeps
the last good checkpoint, progress lines, TensorBoard events and per-epoch evaluation at
the student r and without fusion.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

import mctf_jax
from mctf_jax import checkpoint as ckpt_lib
from mctf_jax import cost, parallel, processes
from mctf_jax import data as data_lib   # lazy: TensorFlow loads when a pipeline is built
from mctf_jax.errors import TrainingError
from mctf_jax.training import evaluation, optim, programs, run_config
from mctf_jax.training.plan import teacher_plan
from mctf_jax.training.train_step import TrainState, count_params, tree_is_finite

logger = logging.getLogger("mctf_jax.train")

def _log(msg: str, *args):
  if jax.process_index() == 0:
    print(msg % args if args else msg, flush=True)


# ----------------------------------------------------------------------------- input


def prefetch_to_mesh(batches: Iterator[dict], mesh, size: int) -> Iterator[dict]:
  """Moves batches onto the mesh in a background thread, `size` batches ahead."""
  size = max(int(size), 1)
  out: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  sentinel = object()

  def produce():
    try:
      for local in batches:
        if stop.is_set():
          return
        out.put(parallel.global_batch(local, mesh))
      out.put(sentinel)
    except BaseException as e:  # re-raised in the consumer
      out.put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = out.get()
      if item is sentinel:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


# ----------------------------------------------------------------------------- preemption


class PreemptionWatch:
  """Turns SIGTERM (and SIGINT) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    _log("received %s: saving a checkpoint after this step, then stopping "
         "(rerun the same command to resume)", signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self, manager, step: int, sync: bool) -> bool:
    """Whether to save and stop after `step`. With several processes, a local SIGTERM is
    shared only when `sync` (every few steps), so that all stop at the same step."""
    stop = self.requested
    if jax.process_count() > 1:
      stop = False
      if sync:
        stop = bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))
    return stop or bool(manager.reached_preemption(step))


# ----------------------------------------------------------------------------- checkpoints


# ----------------------------------------------------------------------------- the loop


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _summary_writer(workdir: str):
  """TensorBoard event files in WORKDIR/tensorboard (process 0 only)."""
  if jax.process_index() != 0:
    return None
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _write_scalars(writer, step: int, scalars: dict):
  if writer is None:
    return
  for name, value in scalars.items():
    writer.add_scalar(name, value, step)
  writer.flush()


def initial_variables(model, config, rng, shardings):
  """The model's variables ({'params': ..., and its state collections}): a random
  initialisation, or a checkpoint (head reset / pos_embed resized as needed)."""
  init = jax.jit(lambda key: model.init(key, model.dummy_images()), out_shardings=shardings)
  path = config.init.checkpoint
  if not path:
    _log("initialising parameters at random (seed %d)", config.seed)
    return init(rng)
  _log("initialising from %s", path)
  loaded = ckpt_lib.load_variables(path, config, adapt=True)
  # The collections the checkpoint lacks (e.g. BatchNorm statistics of a checkpoint that
  # holds parameters only) start from the initialisation.
  fresh = {k: v for k, v in init(rng).items() if k not in loaded}
  loaded = {k: jax.tree.map(lambda x: np.asarray(x, np.float32), v) for k, v in loaded.items()}
  return {**fresh, **jax.device_put(loaded, {k: shardings[k] for k in loaded})}


def train_and_evaluate(config, workdir: str, *, batches=None, eval_batches_fn=None,
                       steps_per_epoch: int | None = None, devices=None) -> TrainState:
  """Trains `config` in `workdir`, resuming the latest checkpoint there.

  batches / eval_batches_fn / steps_per_epoch replace the input pipeline of config.data
  (tests): batches(start_step) -> iterator of local numpy batches; eval_batches_fn() ->
  iterator of eval batches with 'mask'. devices: the devices of the mesh (default: all).
  """
  workdir = os.path.abspath(workdir)
  # Every check of the config before the workdir records it: a workdir whose first start
  # failed on a bad value would otherwise refuse the corrected config as another run's.
  run_config.check_training_config(config)
  mesh = parallel.create_mesh(config.mesh.fsdp, devices)
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  model = programs.model_for_mesh(config, mesh)
  evaluation.check_image_outputs(model, "train.py")
  plan = teacher_plan(model, config.batch_size)
  run_config.check_workdir_config(workdir, config)

  _log("mctf-jax %s | jax %s | %d process(es), %d device(s): %s", mctf_jax.__version__,
       jax.__version__, jax.process_count(), mesh.devices.size,
       ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in mesh.devices.flat})))
  _log("mesh %s | global batch %d, per device %d", dict(mesh.shape), config.batch_size,
       config.batch_size // mesh.devices.size)
  _log("config:\n%s", config)
  _log("model: %s", model.describe(model.config))
  if model.fusion.budget_choice is not None:
    _log("%s", model.fusion.budget_choice)
  _log("student %s", plan.student)
  if plan.values:
    _log("%s", plan)

  if batches is None:
    info = data_lib.dataset_info(config)
    if info.num_classes != config.model.num_classes:
      raise TrainingError(f"dataset {info.name} has {info.num_classes} classes but "
                          f"model.num_classes={config.model.num_classes}; set "
                          f"--config.model.num_classes={info.num_classes}")
    pipeline = data_lib.TrainPipeline(config, config.batch_size, config.seed,
                                      jax.process_index(), jax.process_count(),
                                      label_smoothing=config.loss.label_smoothing,
                                      mix_groups=mesh.devices.size // jax.process_count())
    steps_per_epoch = pipeline.steps_per_epoch
    batches = pipeline.iterate
    eval_batches_fn = lambda: data_lib.eval_batches(config, config.eval_batch_size,
                                                    jax.process_index(), jax.process_count())
    _log("data: %s, %d train / %d eval images, %d classes", info.name, info.num_train,
         info.num_eval, info.num_classes)
  total_steps = optim.total_epochs(config) * steps_per_epoch
  # Shapes and shardings of the state and the jitted step, before anything is allocated.
  program = programs.train_program(config, mesh, steps_per_epoch, model=model, plan=plan)
  abstract, variables_sh = program.abstract_state, program.variables_shardings
  model_state_shape = abstract.model_state
  _log("parameters: %s", f"{count_params(abstract.params):,}")

  manager = ckpt_lib.train_manager(workdir, config, model_state=bool(model_state_shape))
  state, latest = ckpt_lib.restore_latest_readable(manager, abstract, workdir)
  if latest is not None:
    _log("resuming from %s at step %d", manager.directory, latest)
    state = state.replace(step=jax.device_put(state.step, parallel.replicated(mesh)))
  else:
    state = program.init_state(initial_variables(model, config,
                                                 jax.random.PRNGKey(config.seed), variables_sh))
  start_step = int(state.step)
  if start_step >= total_steps:   # before anything is compiled or written
    _log("the run in %s is complete (step %d of %d)", workdir, start_step, total_steps)
    manager.close()
    return state

  train_step = program.step
  eval_rs = [model.fusion.r] + ([0] if model.fusion.r != 0 and model.fusion.layers else [])
  eval_variables = {"params": abstract.params, **model_state_shape}
  eval_batch = programs.eval_batch(config, model, mesh)
  all_finite = jax.jit(tree_is_finite)

  writer = _summary_writer(workdir)
  _log("training %d steps (%d epochs of %d steps) from step %d", total_steps,
       optim.total_epochs(config), steps_per_epoch, start_step)

  batch_iter = prefetch_to_mesh(batches(start_step), mesh, config.data.prefetch)
  history: list = []        # (step, metrics on device) not yet checked
  last_good = latest
  t_log, steps_since_log, t_run = None, 0, None

  def drain(upto_step):
    """Fetches metrics of finished steps, stops on a non-finite loss, returns them."""
    fetched = []
    while history and history[0][0] <= upto_step:
      step, metrics = history.pop(0)
      m = jax.device_get(metrics)
      if not bool(m["finite"]):
        where = (f"the last good checkpoint (step {last_good}) is kept in {manager.directory}"
                 if last_good is not None else "no checkpoint had been saved yet")
        raise TrainingError(f"non-finite loss at step {step + 1} (epoch "
                            f"{step / steps_per_epoch:.2f}): loss={float(m['loss'])}, grad_norm="
                            f"{float(m['grad_norm'])}; stopping, {where}")
      fetched.append(m)
    return fetched

  pending_logs: list = []
  with PreemptionWatch() as watch:
    try:
      for step in range(start_step, total_steps):
        batch = next(batch_iter)
        if step == start_step:
          t0 = time.time()
          train_step = train_step.lower(state, batch).compile()
          _log("compiled the train step (student + %d teacher branch(es)) in %.1f s",
               plan.num_branches, time.time() - t0)
          t0 = time.time()
          eval_fns = {r: evaluation.compiled_eval_step(model.with_fusion(r=r), mesh,
                                                       eval_variables, eval_batch)
                      for r in eval_rs}
          _log("compiled the evaluation step at r = %s in %.1f s", eval_rs, time.time() - t0)
          processes.wait_for_all(f"train and eval steps compiled {step}")
          t_log = t_run = time.time()
        state, metrics = train_step(state, batch)
        history.append((step, metrics))
        pending_logs += drain(step - 1)   # one step late: keeps the device busy
        steps_since_log += 1
        done = step + 1
        epoch_end = done % steps_per_epoch == 0
        if done % config.log_every_steps == 0 or done == total_steps:
          pending_logs += drain(step)
          now = time.time()
          means = {k: float(np.mean([m[k] for m in pending_logs])) for k in pending_logs[0]
                   if k != "finite"}
          pending_logs = []
          rate = steps_since_log * config.batch_size / max(now - t_log, 1e-9)
          eta = (total_steps - done) * (now - t_run) / max(done - start_step, 1)
          parts = " ".join(f"{k}={means[k]:.4g}" for k in
                           ("loss", "loss_student", "loss_teacher", "loss_consistency",
                            "pass_rate", "accuracy", "teacher_r", "lr", "grad_norm") if k in means)
          _log("step %d/%d epoch %.2f | %s | %.1f img/s | ETA %s", done, total_steps,
               done / steps_per_epoch, parts, rate, _format_eta(eta))
          _write_scalars(writer, done, {f"train/{k}": v for k, v in means.items()} |
                         {"train/img_per_s": rate})
          t_log, steps_since_log = now, 0
        stop = watch.should_stop(manager, done, sync=done % config.log_every_steps == 0)
        if done % config.checkpoint_every_steps == 0 or done == total_steps or stop:
          pending_logs += drain(step)
          if not bool(all_finite(state.params)):
            raise TrainingError(f"non-finite parameters after step {done}; stopping, the last "
                                f"good checkpoint (step {last_good}) is kept")
          ckpt_lib.save_or_stop(manager, state, done / steps_per_epoch, workdir)
          last_good = done
        if epoch_end and (done // steps_per_epoch) % config.eval_every_epochs == 0:
          t_eval = time.time()
          variables = {"params": state.params, **state.model_state}
          results = {r: evaluation.accuracy(fn, variables, eval_batches_fn(), mesh)
                     for r, fn in eval_fns.items()}
          epoch = done // steps_per_epoch
          _log("epoch %d eval (%.1f s): %s", epoch, time.time() - t_eval, " | ".join(
              f"r={r}: top1 {v['top1']:.2f} top5 {v['top5']:.2f} ({v['images']} images)"
              for r, v in results.items()))
          # Evaluation time counts neither in the training img/s nor in the ETA.
          t_log += time.time() - t_eval
          t_run += time.time() - t_eval
          _write_scalars(writer, done, {f"eval/top1_r{r}": v["top1"] for r, v in results.items()}
                         | {f"eval/top5_r{r}": v["top5"] for r, v in results.items()})
        if stop:
          ckpt_lib.finish_saves(manager, workdir)
          _log("stopped at step %d on request; checkpoint saved in %s. Rerun the same command "
               "to resume.", done, manager.directory)
          return state
      ckpt_lib.finish_saves(manager, workdir)
      _log("done: %d steps in %s; checkpoints in %s", total_steps,
           _format_eta(time.time() - (t_run or time.time())), manager.directory)
      return state
    finally:
      try:   # (a failed save was reported above, or an error is already on its way)
        manager.wait_until_finished()
        manager.close()
      except Exception:  # noqa: BLE001
        pass
      if writer is not None:
        writer.close()
