"""What train.py checks before anything starts: the training loop's settings, and the
config a work directory records (a run resumes only under the config it was made with, up
to ``RESUMABLE_CHANGES``; fields added since, ``ADDED_FIELDS``, read as the value the older
runs had)."""

from __future__ import annotations

import json
import os

import jax
from flax import traverse_util

from mctf_jax.errors import ConfigError, TrainingError, is_number

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
                "model.remat_policy": "none", "distributed.lost_process_timeout": 30.0,
                "fusion.pitome_margin": 0.75}  # (processes.DEFAULT_TIMEOUT)


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
