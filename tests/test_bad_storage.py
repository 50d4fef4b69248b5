"""Checkpoints on bad storage: unreadable (truncated) checkpoints and a full disk, with
train.py and eval.py as users run them on the shared digits_tiny run (see
tests/test_entry_points.py). A chaos run (SIGKILL at random moments) is a benchmark:
benchmarks/chaos_resume.py."""

import contextlib
import glob
import logging
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from ml_collections import ConfigDict

from mctf_jax import checkpoint
from mctf_jax.errors import CheckpointError, TrainingError
from mctf_jax.training.train_step import TrainState
from conftest import digits_config, run

CONFIG = digits_config()
MODEL = {"model": dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                       num_classes=10, mlp_ratio=2.0)}
# tests/data/tiny_deit.pth's model.
TINY = {"model": dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                      num_classes=10)}


def _truncate(step_dir, seed=0):
  """What a truncated copy leaves: every array file of the params item cut to 100 bytes."""
  rng = np.random.default_rng(seed)
  files = glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True)
  assert files
  for path in files:
    with open(path, "wb") as f:
      f.write(rng.bytes(100))


def _abstract(item_dir):
  """The shapes and dtypes of a saved item, from its metadata."""
  import orbax.checkpoint as ocp
  from etils import epath
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)


def _same_parameters(a, b):
  for ema in (False, True):
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(a, MODEL, ema=ema),
                 checkpoint.load_params(b, MODEL, ema=ema))


def test_unreadable_parameter_checkpoint(tmp_path):
  """The converter's output (a parameter checkpoint), truncated: one line naming it and the
  array."""
  params = checkpoint.load_params(os.path.join(os.path.dirname(__file__), "data",
                                               "tiny_deit.pth"), TINY)
  path = checkpoint.save_params(str(tmp_path / "converted"), params, TINY)
  _truncate(path)
  with pytest.raises(CheckpointError, match=r"cannot read the checkpoint .*converted \(params: "
                     r"OUT_OF_RANGE reading array [\w.]+: Requested byte range"):
    checkpoint.load_params(path, TINY)


def test_unreadable_checkpoints(trained, tmp_path, env):
  reference, _ = trained()
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  _truncate(workdir / "checkpoints" / "44")

  # No fallback: one line naming the step, the array, the readable steps; exit 1.
  with pytest.raises(CheckpointError, match=r"cannot read the checkpoint of step 44 in .*"
                     r"checkpoints \(params: OUT_OF_RANGE reading array [\w.]+: .*\); "
                     r"readable steps: \[40\] \(pass .*checkpoints/40 to use one\)"):
    checkpoint.load_params(str(workdir), MODEL)
  done = run(["eval.py", CONFIG, f"--checkpoint={workdir}", "--throughput_batch=0"], env)
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: cannot read the checkpoint of step 44")

  # train.py resumes from the newest checkpoint that reads, as if it had stopped there
  # (without evaluating: that changes no parameter).
  done = run(["train.py", CONFIG, f"--workdir={workdir}", "--config.eval_every_epochs=3"], env)
  assert done.returncode == 0, done.stdout + done.stderr
  assert done.stderr == "", done.stderr
  warning = [l for l in done.stdout.splitlines() if l.startswith("warning:")]
  assert len(warning) == 1 and "the checkpoint of step 44 cannot be restored (OUT_OF_RANGE " \
      "reading array" in warning[0] and "resuming from step 40" in warning[0], warning
  assert "resuming from" in done.stdout and "at step 40" in done.stdout
  _same_parameters(str(reference), str(workdir))
  # The broken one is set aside, not counted among the kept ones.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["40", "44"]
  assert os.listdir(workdir / "unreadable_checkpoints") == ["44"]

  # None reads: an error listing them, nothing started from scratch (train.py prints it in
  # one line, as every MctfError).
  abstract = TrainState(jax.ShapeDtypeStruct((), np.int32),
                        *(_abstract(workdir / "checkpoints" / "40" / item)
                          for item in ("params", "opt_state", "ema")), {})
  for step in ("40", "44"):
    _truncate(workdir / "checkpoints" / step, seed=1)
  config = ConfigDict(dict(keep_checkpoints=2, ema_decay=0.9))
  manager = checkpoint.train_manager(str(workdir), config)
  with pytest.raises(TrainingError, match=r"none of the 2 checkpoint\(s\) in .* can be restored "
                     r"\(step 44: OUT_OF_RANGE reading .*; step 40: OUT_OF_RANGE reading .*\); "
                     r"move them away to start afresh"):
    checkpoint.restore_latest_readable(manager, abstract, str(workdir))
  manager.close()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["40", "44"]


@contextlib.contextmanager
def _tmpfs(path, size_kb):
  os.makedirs(path)
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                         capture_output=True, text=True)
  if mount.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()})")
  try:
    yield lambda kb: subprocess.run(["mount", "-o", f"remount,size={kb}k", str(path)],
                                    check=True)
  finally:
    subprocess.run(["umount", str(path)], check=False)


def test_full_disk_stops_the_run_and_the_rerun_resumes(trained, tmp_path, env):
  """(One epoch, no evaluation: that the rerun ends where an uninterrupted run does is
  test_unreadable_checkpoints' check.)"""
  reference, _ = trained()
  size = sum(os.path.getsize(f) for f in glob.glob(
      os.path.join(reference, "checkpoints", "44", "**"), recursive=True) if os.path.isfile(f))
  args = ["train.py", CONFIG, "--config.num_epochs=1", "--config.eval_every_epochs=2"]
  # Room for one checkpoint and the run's other files, not for a second checkpoint.
  with _tmpfs(tmp_path / "disk", int(1.5 * size) // 1024) as resize:
    workdir = tmp_path / "disk" / "run"
    args.append(f"--workdir={workdir}")
    done = run(args, env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert f"error: saving a checkpoint in {workdir} failed (" in done.stderr
    assert "No space left on device" in done.stderr
    assert "the checkpoint of step 10 is intact: rerun the same command" in done.stderr
    assert sorted(os.listdir(workdir / "checkpoints"))[0] == "10"
    resize(20 * 1024)
    done = run(args, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming from" in done.stdout and "at step 10" in done.stdout
    assert "step 22/22" in done.stdout and "done:" in done.stdout


def test_failed_orbax_file_writes_are_not_reported_twice(tmp_path, caplog):
  """A save that fails (e.g. on a full disk) leaves Orbax's own file writes failing in
  futures nobody awaits; asyncio would log each with a traceback after our one-line error.
  Those are dropped; a never-retrieved failure of anything else is still reported."""
  import asyncio
  import gc
  from etils import epath
  from orbax.checkpoint._src.path import async_path

  checkpoint.quiet_abandoned_io()

  async def abandon(coroutine):
    future = asyncio.ensure_future(coroutine)
    await asyncio.wait([future])
    del future

  async def other_failure():
    raise OSError(28, "No space left on device")

  missing = epath.Path(tmp_path / "missing" / "_sharding")
  for coroutine, reported in ((async_path.write_text(missing, "{}"), False),
                              (other_failure(), True)):
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
      asyncio.run(abandon(coroutine))
      gc.collect()
    assert any("never retrieved" in r.getMessage() for r in caplog.records) == reported
