"""MCTF fine-tuning on one device, many devices and many hosts: ``train_and_evaluate``.

The loop around ``train_step``: data, mesh and shardings, initialisation (random or from a
converted/PyTorch checkpoint), Orbax checkpoints with exact resumption, preemption
(SIGTERM) handling, a stop on a non-finite loss that keeps the last good checkpoint,
progress lines, TensorBoard events and per-epoch evaluation at the student r and without
fusion.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

import mctf_jax
from mctf_jax import checkpoint as ckpt_lib
from mctf_jax import cost, parallel, processes
from mctf_jax import data as data_lib   # lazy: TensorFlow loads when a pipeline is built
from mctf_jax.errors import ConfigError, TrainingError, is_number
from mctf_jax.training import evaluation, optim, programs
from mctf_jax.training.plan import teacher_plan
from mctf_jax.training.train_step import TrainState, count_params, tree_is_finite

logger = logging.getLogger("mctf_jax.train")

CONFIG_FILE = "config.json"
# Fields that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                     "eval_every_epochs", "eval_batch_size", "init.checkpoint", "data.data_dir",
                     "data.prefetch", "eval.", "fusion.merge_impl", "mesh.fsdp",
                     "model.remat_policy", "distributed.")
# Fields added to the configs after runs were made without them, with the value those
# runs had: a workdir whose config.json lacks one resumes as if it held that value.
ADDED_FIELDS = {"model.arch": "deit", "fusion.method": "mctf", "fusion.inflection": 0.0,
                "fusion.target_gflops": 0.0, "fusion.target_fraction": 0.0,
                "model.remat_policy": "none", "distributed.lost_process_timeout": 30.0}  # (processes.DEFAULT_TIMEOUT)


def _log(msg: str, *args):
  if jax.process_index() == 0:
    print(msg % args if args else msg, flush=True)


# ----------------------------------------------------------------------------- workdir


# The training loop's own settings: (field, smallest value, whether it must be an int).
# (Batch sizes: parallel.check_batch_size.)
_LOOP_SETTINGS = (("num_epochs", 0, True), ("cooldown_epochs", 0, True),
                  ("warmup_epochs", 0, True), ("log_every_steps", 1, True),
                  ("checkpoint_every_steps", 1, True), ("keep_checkpoints", 1, True),
                  ("eval_every_epochs", 1, True), ("min_lr", 0, False),
                  ("warmup_lr", 0, False), ("weight_decay", 0, False), ("grad_clip", 0, False))


def check_training_config(config) -> None:
  """ConfigError naming the first training-loop setting out of range, before anything
  starts (a step or checkpoint interval of 0 failed only once training had started)."""
  for name, low, whole in _LOOP_SETTINGS:
    value = config[name]
    if not is_number(value, whole) or value < low:
      raise ConfigError(f"{name}={value!r}: expected {'an int' if whole else 'a number'} "
                        f">= {low}")
  if config.num_epochs + config.cooldown_epochs < 1:
    raise ConfigError(f"num_epochs={config.num_epochs}, cooldown_epochs="
                      f"{config.cooldown_epochs}: nothing to train; expected at least one epoch")
  if not is_number(config.base_lr) or not config.base_lr > 0:
    raise ConfigError(f"base_lr={config.base_lr!r}: expected a number > 0")
  for name, value, low, high, closed in (
      ("ema_decay", config.ema_decay, 0, 1, False),
      ("loss.label_smoothing", config.loss.label_smoothing, 0, 1, False),
      ("loss.consistency_threshold", config.loss.consistency_threshold, 0, 1, True)):
    if not is_number(value) or not (low <= value <= high if closed else low <= value < high):
      raise ConfigError(f"{name}={value!r}: expected a number in [{low}, {high}"
                        f"{']' if closed else ')'}")
  for name in ("weight_student", "weight_teacher", "weight_consistency"):
    value = config.loss[name]
    if not is_number(value) or value < 0:
      raise ConfigError(f"loss.{name}={value!r}: expected a number >= 0")
  seed = config.seed
  if not is_number(seed, whole=True) or not 0 <= seed < 2 ** 63:
    raise ConfigError(f"seed={seed!r}: expected an int in [0, 2**63)")


def _flat_config(tree: dict) -> dict:
  """{'model.arch': 'deit', ...}: a JSON config's fields by dotted name, with the fields
  added since (``ADDED_FIELDS``) where it lacks them."""
  return {**ADDED_FIELDS, **traverse_util.flatten_dict(tree, sep=".")}


def check_workdir_config(workdir: str, config) -> None:
  """Records the config in the workdir; refuses a workdir that holds another config's run."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = _flat_config(json.loads(config.to_json_best_effort()))
  if os.path.exists(path):
    with open(path) as f:
      stored = _flat_config(json.load(f))
    differ = sorted(k for k in set(stored) | set(current)
                    if stored.get(k) != current.get(k)
                    and not any(k == c or (c.endswith(".") and k.startswith(c))
                                for c in RESUMABLE_CHANGES))
    if differ:
      details = "; ".join(f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now"
                          for k in differ[:8])
      raise TrainingError(
          f"workdir {workdir} holds a run of another config ({len(differ)} field(s) differ: "
          f"{details}). Use a new --workdir, or the same config to resume that run.")
  elif os.path.exists(workdir) and not os.path.isdir(workdir):
    raise TrainingError(f"the workdir {workdir} is a file; give a directory as --workdir")
  elif jax.process_index() == 0:
    # Written whole, then renamed into place: the other processes of a multi-process run
    # check this file at about the same time, and must find it absent or complete (an
    # empty file, created but not yet written, failed their json.load).
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
      os.makedirs(workdir, exist_ok=True)
      with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=1))
      os.replace(tmp, path)
    except OSError as e:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise TrainingError(f"cannot write to the workdir {workdir}: {e.strerror or e}; give "
                          f"a writable --workdir") from None


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


def _checkpoint_manager(workdir: str, config, model_state: bool = False):
  """The workdir's CheckpointManager; items params, opt_state, meta, and ema and
  model_state when the run keeps them."""
  ckpt_lib.quiet_abandoned_io()
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         enable_async_checkpointing=True)
  items = (("params", "opt_state", "meta") + (("ema",) if config.ema_decay > 0 else ())
           + ((ckpt_lib.STATE_ITEM,) if model_state else ()))
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), ckpt_lib.CHECKPOINTS_DIR),
                               item_names=items, options=options)


def save_checkpoint(manager, state: TrainState, epoch: float):
  step = int(state.step)
  items = dict(params=ocp.args.StandardSave(state.params),
               opt_state=ocp.args.StandardSave(state.opt_state),
               meta=ocp.args.JsonSave({"step": step, "epoch": epoch}))
  if state.ema is not None:
    items["ema"] = ocp.args.StandardSave(state.ema)
  if state.model_state:
    items[ckpt_lib.STATE_ITEM] = ocp.args.StandardSave(state.model_state)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


UNREADABLE_DIR = "unreadable_checkpoints"


def restore_latest_readable(manager, abstract_state: TrainState, workdir: str):
  """The newest checkpoint of `manager` that restores, as (TrainState, step), or (None,
  None) when there is none. Newer ones that cannot be restored (missing or truncated
  files, wrong shapes, unreadable metadata) are reported in one warning line each and moved
  to WORKDIR/unreadable_checkpoints/, so that they are neither read again, nor counted
  among the kept checkpoints, nor in the way of the next save. When no checkpoint
  restores, TrainingError lists them all (a workdir that holds a run never restarts from
  scratch silently)."""
  steps = sorted(manager.all_steps(), reverse=True)
  failed = []
  for step in steps:
    try:
      state = restore_checkpoint(manager, abstract_state, step)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported, not raised
      ckpt_lib.quiet_abandoned_io()
      failed.append((step, ckpt_lib.failure_reason(e)))
      continue
    for bad_step, reason in failed:
      moved = _set_aside(manager, bad_step, workdir)
      _log("warning: the checkpoint of step %d cannot be restored (%s); moved to %s, "
           "resuming from step %d", bad_step, reason, moved, step)
    if failed:
      _sync("mctf_jax unreadable checkpoints set aside")
      manager.reload()
    return state, step
  if failed:
    listing = "; ".join(f"step {s}: {reason}" for s, reason in failed)
    raise TrainingError(f"none of the {len(failed)} checkpoint(s) in {manager.directory} can "
                        f"be restored ({listing}); move them away to start afresh, or "
                        f"restore a copy")
  return None, None


def _set_aside(manager, step: int, workdir: str) -> str:
  """Moves checkpoint `step` out of the manager's directory (process 0 only); returns
  where it went."""
  source = os.path.join(str(manager.directory), str(step))
  target = os.path.join(workdir, UNREADABLE_DIR, str(step))
  n = 1
  while os.path.lexists(target):
    target = os.path.join(workdir, UNREADABLE_DIR, f"{step}.{n}")
    n += 1
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(source, target)
  return target


def _save(manager, state: TrainState, epoch: float, workdir: str) -> None:
  """save_checkpoint, with a failure (this save's, or the previous asynchronous one's) as
  one TrainingError line."""
  try:
    save_checkpoint(manager, state, epoch)
  except Exception as e:  # noqa: BLE001 - full disks and lost permissions raise many types
    raise _save_error(manager, workdir, e) from None


def _finish_saves(manager, workdir: str) -> None:
  """Waits for the asynchronous saves; a failure as in ``_save``."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise _save_error(manager, workdir, e) from None


def _save_error(manager, workdir: str, error: BaseException) -> TrainingError:
  directory = str(manager.directory)
  try:
    intact = [int(d) for d in os.listdir(directory) if d.isdigit()]
  except OSError:
    intact = []
  kept = (f"the checkpoint of step {max(intact)} is intact: rerun the same command to resume "
          f"from it" if intact else "no checkpoint had been saved before")
  return TrainingError(f"saving a checkpoint in {workdir} failed ({ckpt_lib.failure_reason(error)})"
                       f"; stopping, {kept} once there is space or permission to write")


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def restore_checkpoint(manager, abstract_state: TrainState, step: int) -> TrainState:
  items = dict(params=ocp.args.StandardRestore(abstract_state.params),
               opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
               meta=ocp.args.JsonRestore())
  if abstract_state.ema is not None:
    items["ema"] = ocp.args.StandardRestore(abstract_state.ema)
  if abstract_state.model_state:
    items[ckpt_lib.STATE_ITEM] = ocp.args.StandardRestore(abstract_state.model_state)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if restored.meta["step"] != step:
    raise TrainingError(f"checkpoint {step} records step {restored.meta['step']}")
  return TrainState(step=jnp.asarray(step, jnp.int32), params=restored.params,
                    opt_state=restored.opt_state,
                    ema=restored.ema if abstract_state.ema is not None else None,
                    model_state=(restored[ckpt_lib.STATE_ITEM] if abstract_state.model_state
                                 else {}))


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
  check_training_config(config)
  mesh = parallel.create_mesh(config.mesh.fsdp, devices)
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  model = programs.model_for_mesh(config, mesh)
  evaluation.check_image_outputs(model, "train.py")
  plan = teacher_plan(model, config.batch_size)
  check_workdir_config(workdir, config)

  _log("mctf-jax %s | jax %s | %d process(es), %d device(s): %s", mctf_jax.__version__,
       jax.__version__, jax.process_count(), mesh.devices.size,
       ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in mesh.devices.flat})))
  _log("mesh %s | global batch %d, per device %d", dict(mesh.shape), config.batch_size,
       config.batch_size // mesh.devices.size)
  _log("config:\n%s", config)
  _log("model: %s", model.describe(model.config))
  if mctf_jax.fusion_config(config).has_budget:
    _log("%s", cost.budget_choice(config))
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
  tx, abstract, state_sh = program.tx, program.abstract_state, program.state_shardings
  variables_sh, param_sh = program.variables_shardings, program.state_shardings.params
  opt_sh, use_ema = program.state_shardings.opt_state, program.use_ema
  model_state_shape = abstract.model_state
  _log("parameters: %s", f"{count_params(abstract.params):,}")

  manager = _checkpoint_manager(workdir, config, model_state=bool(model_state_shape))
  state, latest = restore_latest_readable(manager, abstract, workdir)
  if latest is not None:
    _log("resuming from %s at step %d", manager.directory, latest)
    state = state.replace(step=jax.device_put(state.step, parallel.replicated(mesh)))
  else:
    variables = initial_variables(model, config, jax.random.PRNGKey(config.seed), variables_sh)
    params = variables["params"]
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    ema = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_sh)(
        params) if use_ema else None
    state = TrainState(jax.device_put(jnp.asarray(0, jnp.int32), parallel.replicated(mesh)),
                       params, opt_state, ema,
                       {k: v for k, v in variables.items() if k != "params"})
  start_step = int(state.step)
  if start_step >= total_steps:   # before anything is compiled or written
    _log("the run in %s is complete (step %d of %d)", workdir, start_step, total_steps)
    manager.close()
    return state

  train_step = program.step
  eval_rs = [model.fusion.r] + ([0] if model.fusion.r != 0 and model.fusion.layers else [])
  eval_fns = {r: evaluation.compile_eval_step(model.with_fusion(r=r), mesh, variables_sh)
              for r in eval_rs}
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
          processes.wait_for_all(f"train step compiled {step}")
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
          _save(manager, state, done / steps_per_epoch, workdir)
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
          _finish_saves(manager, workdir)
          _log("stopped at step %d on request; checkpoint saved in %s. Rerun the same command "
               "to resume.", done, manager.directory)
          return state
      _finish_saves(manager, workdir)
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
