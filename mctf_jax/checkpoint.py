"""Parameter checkpoints: what the converter writes and what train.py / eval.py read.

A *parameter checkpoint* is a directory with an Orbax ``params`` item and a
``mctf_jax.json`` file that records the model config it was made for::

    DIR/mctf_jax.json
    DIR/params/...        (ocp.StandardCheckpointer)

train.py keeps its checkpoints in ``WORKDIR/checkpoints/<step>/`` (an Orbax
CheckpointManager) with the items ``params``, ``ema`` (when it keeps an EMA),
``opt_state`` and ``meta``.

``load_params`` reads a parameter checkpoint, a train.py work directory (its latest checkpoint,
EMA weights by default), or a PyTorch file (.pth/.npz/.safetensors, converted on the fly),
and checks every weight against the config.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from mctf_jax.config import model_config
from mctf_jax.convert import STATE_DICT_EXTENSIONS

METADATA = "mctf_jax.json"
PARAMS_ITEM = "params"
EMA_ITEM = "ema"
CHECKPOINTS_DIR = "checkpoints"


def _config_dict(config: Any) -> dict:
  import dataclasses
  out = {"model": dataclasses.asdict(model_config(config))}
  fusion = getattr(config, "fusion", None)
  if fusion is not None and hasattr(fusion, "to_dict"):
    out["fusion"] = {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in fusion.to_dict().items()}
  return out


def check_save_target(path: str, *, overwrite: bool = False) -> str:
  """The absolute path where ``save_params`` can write, or FileExistsError saying why not:
  `path` exists and `overwrite` is off, or it is something other than a parameter
  checkpoint (a file, a directory holding other files), which is never replaced."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.lexists(path):
    return path
  if not overwrite:
    raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
  if not os.path.isdir(path) or os.path.islink(path) or \
      not set(os.listdir(path)) <= {METADATA, PARAMS_ITEM}:
    raise FileExistsError(f"{path} is not a parameter checkpoint (holds more than "
                          f"{METADATA} and {PARAMS_ITEM}/); not replacing it")
  return path


def save_params(path: str, params, config: Any, *, overwrite: bool = False) -> str:
  """Writes params (and the config they belong to) as a parameter checkpoint at `path`
  (with `overwrite`, replacing one written before; see ``check_save_target``)."""
  import orbax.checkpoint as ocp
  path = check_save_target(path, overwrite=overwrite)
  if os.path.lexists(path):
    shutil.rmtree(path)
  os.makedirs(path)
  params = jax.tree.map(np.asarray, params)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, PARAMS_ITEM), params)
  ckptr.wait_until_finished()
  with open(os.path.join(path, METADATA), "w") as f:
    json.dump({"format": "mctf_jax.params", **_config_dict(config)}, f, indent=1)
  return path


def _restore_item(item_path: str):
  """A saved array tree as numpy, whatever devices or processes saved it (e.g. a pod
  checkpoint read on one GPU): restored against a target on this process's first device."""
  import orbax.checkpoint as ocp
  from etils import epath
  item_path = os.path.abspath(item_path)
  # The item's own metadata (a directory saved by a CheckpointManager has no step metadata).
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(item_path))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(item_path, target))


def _latest_step_dir(path: str) -> str | None:
  steps = [d for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))]
  return os.path.join(path, max(steps, key=int)) if steps else None


def find_train_params(path: str, ema: bool = True) -> str | None:
  """The params (or EMA) item of the latest checkpoint under a train.py workdir, or None.

  `path` may be the workdir, its checkpoints/ directory, or one step directory.
  """
  candidates = [path]
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    candidates.insert(0, os.path.join(path, CHECKPOINTS_DIR))
  for directory in candidates:
    step_dir = directory if os.path.isdir(os.path.join(directory, PARAMS_ITEM)) else \
        _latest_step_dir(directory)
    if step_dir is None:
      continue
    for item in ((EMA_ITEM, PARAMS_ITEM) if ema else (PARAMS_ITEM,)):
      if os.path.isdir(os.path.join(step_dir, item)):
        return os.path.join(step_dir, item)
  return None


def load_params(path: str, config: Any, *, ema: bool = False, adapt: bool = False):
  """Params for `config` from a parameter checkpoint, a train.py workdir or a torch file.

  ema: for train.py checkpoints, take the EMA weights (when the run kept them).
  adapt: resize the position embedding and re-initialise the head where the image size or
    class count differ (initialising a fine-tuning run); without it those are errors.
  Raises FileNotFoundError for a path that does not exist or holds no checkpoint,
  CheckpointMismatchError (listing every weight) when the shapes do not fit the config, and
  CheckpointError for a file it cannot read.
  """
  from mctf_jax import convert
  cfg = model_config(config)
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  if os.path.isfile(path):
    if not path.lower().endswith(STATE_DICT_EXTENSIONS):
      raise convert.CheckpointError(
          f"{path!r} is a file but not a PyTorch checkpoint "
          f"({', '.join(STATE_DICT_EXTENSIONS)}); Orbax checkpoints are directories")
    state = convert.load_state_dict(path)
  else:
    if os.path.isfile(os.path.join(path, METADATA)):
      item = os.path.join(path, PARAMS_ITEM)
    else:
      item = find_train_params(path, ema=ema)
    if item is None:
      raise FileNotFoundError(
          f"{path!r} holds no checkpoint: expected a directory written by "
          f"`python -m mctf_jax.convert` (with {METADATA}), a train.py workdir, or a PyTorch "
          f"file ({', '.join(STATE_DICT_EXTENSIONS)})")
    state = convert.flax_to_torch(_restore_item(item))
  # One path for every format: the torch-layout names checked against the config.
  return convert.torch_to_flax(state, cfg, adapt=adapt, source=path)
