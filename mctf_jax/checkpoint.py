"""Checkpoints: parameter checkpoints (what the converter writes and eval.py reads) and
train.py's checkpoints of the whole training state (written, resumed and set aside here).

A *parameter checkpoint* is a directory with an Orbax ``params`` item (and a
``model_state`` item for models with state, e.g. BatchNorm statistics) and a
``mctf_jax.json`` file that records the model config it was made for::

    DIR/mctf_jax.json
    DIR/params/...        (ocp.StandardCheckpointer)
    DIR/model_state/...   (only for models with state)

train.py keeps its checkpoints in ``WORKDIR/checkpoints/<step>/`` (an Orbax
CheckpointManager) with the items ``params``, ``ema`` (when it keeps an EMA),
``model_state`` (when the model has state), ``opt_state`` and ``meta``: ``train_manager``,
``save_train_state``, ``restore_latest_readable``. A step that no longer restores is moved
to ``WORKDIR/unreadable_checkpoints/``.

``load_variables`` (and ``load_params``, its params) reads a parameter checkpoint, a
train.py work directory (its latest checkpoint), a PyTorch file (.pth/.npz/.safetensors)
or a big_vision / vision_transformer .npz ('FILE.npz:SUBTREE' for a sub-tree of one, e.g.
SigLIP's image encoder ':img'), the files converted on the fly, and checks every weight
against the config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mctf_jax import convert
from mctf_jax.convert import big_vision
from mctf_jax.config import model_config
from mctf_jax.errors import (CheckpointError, CheckpointNotFoundError, OutputError,
                             TrainingError)

METADATA = "mctf_jax.json"
PARAMS_ITEM = "params"
EMA_ITEM = "ema"
STATE_ITEM = "model_state"
CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"


def _config_dict(config: Any) -> dict:
  out = {"model": dataclasses.asdict(model_config(config))}
  fusion = getattr(config, "fusion", None)
  if fusion is not None and hasattr(fusion, "to_dict"):
    out["fusion"] = {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in fusion.to_dict().items()}
  return out


def check_save_target(path: str, *, overwrite: bool = False) -> str:
  """The absolute path where ``save_params`` can write, or OutputError saying why not:
  `path` exists and `overwrite` is off, or it is something other than a parameter
  checkpoint (a file, a directory holding other files), which is never replaced."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.lexists(path):
    return path
  if not overwrite:
    raise OutputError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
  if not os.path.isdir(path) or os.path.islink(path) or \
      not set(os.listdir(path)) <= {METADATA, PARAMS_ITEM, STATE_ITEM}:
    raise OutputError(f"{path} is not a parameter checkpoint (holds more than "
                      f"{METADATA}, {PARAMS_ITEM}/ and {STATE_ITEM}/); not replacing it")
  return path


def save_params(path: str, params, config: Any, *, overwrite: bool = False,
                model_state=None) -> str:
  """Writes params (the model's state collections too, if any, and the config they belong
  to) as a parameter checkpoint at `path` (with `overwrite`, replacing one written before;
  see ``check_save_target``)."""
  path = check_save_target(path, overwrite=overwrite)
  if os.path.lexists(path):
    shutil.rmtree(path)
  os.makedirs(path)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, PARAMS_ITEM), jax.tree.map(np.asarray, params))
  if model_state:
    ckptr.save(os.path.join(path, STATE_ITEM), jax.tree.map(np.asarray, model_state))
  ckptr.wait_until_finished()
  with open(os.path.join(path, METADATA), "w") as f:
    json.dump({"format": "mctf_jax.params", **_config_dict(config)}, f, indent=1)
  return path


def failure_reason(error: BaseException) -> str:
  """One line on why reading or writing a checkpoint failed: the array that Orbax /
  TensorStore could not read (named anywhere in the chain of causes) with the storage's
  status code and message, else the first line of the innermost error."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  texts = [f"{type(e).__name__}: {e}" for e in chain]
  for text in reversed(texts):
    found = re.search(r'Error (reading|writing) (local file )?"([^"]+)"', text)
    if found:
      verb, local, name = found.groups()
      code = re.search(r"\b([A-Z][A-Z_]{3,}): ", text)
      line = text.strip().splitlines()[0]
      # "...: Failed to write N bytes to file 7: <the OS's reason> [os_error_code=...]"
      # (the bracketed details: TensorStore's status payloads)
      detail = re.sub(r"\s*\[[\w\[\]]+=.*$", "", line).rsplit(": ", 1)[-1]
      what = f"file {name}" if local else f"array {re.sub(r'/(.zarray|[0-9.]+)$', '', name)}"
      return (f"{code.group(1) + ' ' if code else ''}{verb} {what}"
              + (f": {detail[:160]}" if detail and detail != line else ""))
  for text in texts:
    found = re.search(r"'path': '([^'/]+)/'", text)
    if found:
      return f"array {found.group(1)}: {texts[-1].splitlines()[0][:200]}"
  first = texts[-1].strip().splitlines()[0] if texts else "unknown error"
  return first if len(first) <= 300 else first[:297] + "..."


def quiet_abandoned_io() -> None:
  """Drops the reports of Orbax/TensorStore work left behind by a failed read or write,
  which would otherwise follow our one-line error as pages of tracebacks: the reads of the
  other arrays, collected as coroutines ("Exception ignored in: <coroutine ...>"), and the
  storage callbacks that find their event loop closed ("RuntimeError: Event loop is
  closed", reported as unraisable or through sys.excepthook), and the futures of those
  reads that asyncio logs as never retrieved. Any other report goes where it went before.
  Idempotent."""
  if not getattr(sys.unraisablehook, "_mctf_quiet", False):
    previous_unraisable = sys.unraisablehook

    def unraisable_hook(unraisable):
      code = getattr(unraisable.object, "cr_code", None)
      if (code is not None and "orbax" in code.co_filename) or _closed_loop(
          unraisable.exc_type, unraisable.exc_value):
        return
      previous_unraisable(unraisable)
    unraisable_hook._mctf_quiet = True
    sys.unraisablehook = unraisable_hook
  if not any(getattr(f, "_mctf_quiet", False) for f in logging.getLogger("asyncio").filters):
    logging.getLogger("asyncio").addFilter(_AbandonedStorageFutures())
  if not getattr(sys.excepthook, "_mctf_quiet", False):
    previous_except = sys.excepthook

    def except_hook(kind, value, tb):
      if not _closed_loop(kind, value):
        previous_except(kind, value, tb)
    except_hook._mctf_quiet = True
    sys.excepthook = except_hook


class _AbandonedStorageFutures(logging.Filter):
  _mctf_quiet = True

  def filter(self, record):
    message = record.getMessage()
    if "never retrieved" not in message:
      return True
    if re.search(r"Error (reading|writing|opening)|Event loop is closed", message):
      return False
    # Orbax's own file writes (e.g. a metadata file on a full disk) fail in a thread pool
    # whose futures nobody awaits once the save has failed.
    error = record.exc_info[1] if record.exc_info else None
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return not (isinstance(error, OSError)
                and any("orbax" in frame.filename for frame in frames))


def _closed_loop(kind, value) -> bool:
  return kind is RuntimeError and str(value) == "Event loop is closed"


def _restore_tree(item_path: str):
  quiet_abandoned_io()
  # The item's own metadata (a directory saved by a CheckpointManager has no step metadata).
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(item_path))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(item_path, target))


def _readable(item_path: str) -> bool:
  try:
    _restore_tree(item_path)
    return True
  except Exception:  # noqa: BLE001 - any failure means unreadable
    quiet_abandoned_io()
    return False


def _restore_item(item_path: str):
  """A saved array tree as numpy, whatever devices or processes saved it (e.g. a pod
  checkpoint read on one GPU): restored against a target on this process's first device.
  CheckpointError in one line when it cannot be read: the path, the step (train.py
  checkpoints), the first unreadable array, and the steps beside it that do read."""
  item_path = os.path.abspath(item_path)
  try:
    return _restore_tree(item_path)
  except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types
    quiet_abandoned_io()
    reason = failure_reason(e)
  step_dir, item = os.path.split(item_path)
  parent, step = os.path.split(step_dir)
  if not step.isdigit():
    raise CheckpointError(f"cannot read the checkpoint {step_dir} ({item}: {reason})") from None
  others = sorted((int(d) for d in os.listdir(parent)
                   if d.isdigit() and d != step and os.path.isdir(os.path.join(parent, d, item))),
                  reverse=True)
  readable = [s for s in others if _readable(os.path.join(parent, str(s), item))]
  hint = (f"; readable steps: {readable} (pass {os.path.join(parent, str(readable[0]))} to "
          f"use one)" if readable else "; no other step reads")
  raise CheckpointError(f"cannot read the checkpoint of step {step} in {parent} ({item}: "
                        f"{reason}){hint}") from None


def _latest_step_dir(path: str) -> str | None:
  steps = [d for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))]
  return os.path.join(path, max(steps, key=int)) if steps else None


def _item_dir(path: str, ema: bool) -> str | None:
  """The directory holding the params item (or the EMA's) that `path` names: a parameter
  checkpoint, a train.py workdir (its latest checkpoint), its checkpoints/ directory or one
  step directory; None if it holds none."""
  if os.path.isfile(os.path.join(path, METADATA)):
    return path
  candidates = [path]
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    candidates.insert(0, os.path.join(path, CHECKPOINTS_DIR))
  for directory in candidates:
    step_dir = directory if os.path.isdir(os.path.join(directory, PARAMS_ITEM)) else \
        _latest_step_dir(directory)
    if step_dir is not None and os.path.isdir(os.path.join(step_dir, PARAMS_ITEM)):
      return step_dir
  return None


def find_train_params(path: str, ema: bool = True) -> str | None:
  """The params (or EMA) item of the latest checkpoint under a train.py workdir, or None.

  `path` may be the workdir, its checkpoints/ directory, or one step directory.
  """
  step_dir = _item_dir(path, ema)
  if step_dir is None:
    return None
  for item in ((EMA_ITEM, PARAMS_ITEM) if ema else (PARAMS_ITEM,)):
    if os.path.isdir(os.path.join(step_dir, item)):
      return os.path.join(step_dir, item)
  return None


def load_variables(path: str, config: Any, *, ema: bool = False, adapt: bool = False) -> dict:
  """The model's variables ({'params': ..., and its state collections}) for `config` from a
  parameter checkpoint, a train.py workdir, a torch file or a big_vision .npz (see the
  module docstring).

  ema: for train.py checkpoints, take the EMA weights (when the run kept them).
  adapt: resize the position embedding and re-initialise the head where the image size or
    class count differ (initialising a fine-tuning run); without it those are errors.
  Raises CheckpointNotFoundError (a FileNotFoundError) for a path that does not exist or
  holds no checkpoint, CheckpointMismatchError (listing every weight) when the shapes do
  not fit the config, and CheckpointError for a file it cannot read.
  """
  cfg = model_config(config)
  path = os.fspath(path)
  file, _ = big_vision.split_path(path)   # 'FILE.npz:SUBTREE': a sub-tree of a .npz
  if not os.path.exists(file):
    raise CheckpointNotFoundError(f"checkpoint {file!r} does not exist")
  if os.path.isfile(file):
    if not file.lower().endswith(convert.STATE_DICT_EXTENSIONS):
      raise CheckpointError(
          f"{path!r} is a file but not a PyTorch checkpoint "
          f"({', '.join(convert.STATE_DICT_EXTENSIONS)}) nor a big_vision .npz; Orbax "
          f"checkpoints are directories")
    return convert.file_to_variables(path, cfg, adapt=adapt)
  step_dir = _item_dir(path, ema)
  if step_dir is None:
    raise CheckpointNotFoundError(
        f"{path!r} holds no checkpoint: expected a directory written by "
        f"`python -m mctf_jax.convert` (with {METADATA}), a train.py workdir, or a PyTorch "
        f"file ({', '.join(convert.STATE_DICT_EXTENSIONS)})")
  item = EMA_ITEM if ema and os.path.isdir(os.path.join(step_dir, EMA_ITEM)) else PARAMS_ITEM
  model_state = (_restore_item(os.path.join(step_dir, STATE_ITEM))
                 if os.path.isdir(os.path.join(step_dir, STATE_ITEM)) else None)
  state = convert.flax_to_torch(_restore_item(os.path.join(step_dir, item)), cfg,
                                model_state=model_state)
  # One path for every format: the PyTorch-layout names checked against the config.
  return convert.torch_to_variables(state, cfg, adapt=adapt, source=path)


def load_params(path: str, config: Any, *, ema: bool = False, adapt: bool = False):
  """The params of ``load_variables`` (same arguments and errors)."""
  return load_variables(path, config, ema=ema, adapt=adapt)["params"]


# ----------------------------------------------------------------------------- training

def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def train_manager(workdir: str, config, model_state: bool = False):
  """The work directory's CheckpointManager (config.keep_checkpoints kept); items params,
  opt_state, meta, and ema and model_state when the run keeps them."""
  quiet_abandoned_io()
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         enable_async_checkpointing=True)
  items = (("params", "opt_state", "meta") + (("ema",) if config.ema_decay > 0 else ())
           + ((STATE_ITEM,) if model_state else ()))
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR),
                               item_names=items, options=options)


def save_train_state(manager, state, epoch: float):
  """Starts the asynchronous save of a TrainState at its step."""
  step = int(state.step)
  items = dict(params=ocp.args.StandardSave(state.params),
               opt_state=ocp.args.StandardSave(state.opt_state),
               meta=ocp.args.JsonSave({"step": step, "epoch": epoch}))
  if state.ema is not None:
    items["ema"] = ocp.args.StandardSave(state.ema)
  if state.model_state:
    items[STATE_ITEM] = ocp.args.StandardSave(state.model_state)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest_readable(manager, abstract_state, workdir: str):
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
      state = restore_train_state(manager, abstract_state, step)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported, not raised
      quiet_abandoned_io()
      failed.append((step, failure_reason(e)))
      continue
    for bad_step, reason in failed:
      moved = _set_aside(manager, bad_step, workdir)
      _say(f"warning: the checkpoint of step {bad_step} cannot be restored ({reason}); moved "
           f"to {moved}, resuming from step {step}")
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


def save_or_stop(manager, state, epoch: float, workdir: str) -> None:
  """save_train_state, with a failure (this save's, or the previous asynchronous one's) as
  one TrainingError line."""
  try:
    save_train_state(manager, state, epoch)
  except Exception as e:  # noqa: BLE001 - full disks and lost permissions raise many types
    raise _save_error(manager, workdir, e) from None


def finish_saves(manager, workdir: str) -> None:
  """Waits for the asynchronous saves; a failure as in ``save_or_stop``."""
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
  return TrainingError(f"saving a checkpoint in {workdir} failed ({failure_reason(error)})"
                       f"; stopping, {kept} once there is space or permission to write")


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def restore_train_state(manager, abstract_state, step: int):
  """Checkpoint `step` restored into the shapes and shardings of `abstract_state` (a
  TrainState of ShapeDtypeStructs)."""
  items = dict(params=ocp.args.StandardRestore(abstract_state.params),
               opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
               meta=ocp.args.JsonRestore())
  if abstract_state.ema is not None:
    items["ema"] = ocp.args.StandardRestore(abstract_state.ema)
  if abstract_state.model_state:
    items[STATE_ITEM] = ocp.args.StandardRestore(abstract_state.model_state)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if restored.meta["step"] != step:
    raise TrainingError(f"checkpoint {step} records step {restored.meta['step']}")
  return abstract_state.replace(
      step=jnp.asarray(step, jnp.int32), params=restored.params,
      opt_state=restored.opt_state,
      ema=restored.ema if abstract_state.ema is not None else None,
      model_state=restored[STATE_ITEM] if abstract_state.model_state else {})
