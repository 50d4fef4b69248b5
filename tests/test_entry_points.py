"""train.py and eval.py as users run them, on the embedded digits data (shrunk model).

A run interrupted by SIGTERM (preemption) and resumed ends with exactly the parameters of an
uninterrupted run (under SIGKILL at random moments, too: benchmarks/chaos_resume.py; resuming
from an earlier checkpoint: tests/test_bad_storage.py).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from mctf_jax import checkpoint
from conftest import FAST_COMPILE, ROOT, digits_config, run, run_once

CONFIG = digits_config()
TOTAL = 44   # 2 epochs of 22 steps


def run_until(args, env, line_prefix: str, sig) -> tuple[int, str]:
  """Starts a run, sends `sig` once a line starting with line_prefix is printed."""
  proc = subprocess.Popen([sys.executable] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  out = []
  try:
    for line in proc.stdout:
      out.append(line)
      if line.startswith(line_prefix):
        proc.send_signal(sig)
        break
    out.append(proc.communicate(timeout=300)[0])
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, "".join(out)


@pytest.fixture(scope="session")
def finished(trained):
  """The uninterrupted run of digits_tiny (shared with tests/test_backbones.py)."""
  return trained()


def _params(workdir, ema=False):
  config = {"model": dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                          num_classes=10, mlp_ratio=2.0)}
  return checkpoint.load_params(workdir, config, ema=ema)


def test_train_prints_what_a_user_needs(finished):
  workdir, out = finished
  for needle in ("digits, 352 train / 360 eval images, 10 classes", "fusion schedule (r=8)",
                 "process(es), 1 device(s)", "compiled the train step", "img/s | ETA",
                 "epoch 1 eval", "r=8: top1", "r=0: top1", f"step {TOTAL}/{TOTAL}", "done:"):
    assert needle in out, needle
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["40", "44"]   # keep 2
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "44", "ema"))


def test_interrupted_runs_resume_to_the_same_parameters(finished, tmp_path, env):
  reference, _ = finished
  workdir = str(tmp_path / "interrupted")
  # (No evaluation: it changes no parameter, and test_train_prints_what_a_user_needs has it.)
  args = ["train.py", CONFIG, f"--workdir={workdir}", "--config.eval_every_epochs=3"]
  code, out = run_until(args, env, "step 10/", signal.SIGTERM)
  assert code == 0, out
  assert "received SIGTERM" in out and "Rerun the same command to resume" in out
  stopped = int(out.split("stopped at step ")[1].split()[0])
  assert 10 <= stopped < TOTAL
  done = run(args, env)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "resuming from" in done.stdout and f"at step {stopped}" in done.stdout
  assert f"step {TOTAL}/{TOTAL}" in done.stdout
  for ema in (False, True):
    jax.tree.map(np.testing.assert_array_equal, _params(reference, ema), _params(workdir, ema))
  events = sorted(os.listdir(os.path.join(workdir, "tensorboard")))
  again = run(args, env)
  assert again.returncode == 0 and "is complete" in again.stdout
  # A complete run writes nothing (it opened an empty TensorBoard event file each time).
  assert sorted(os.listdir(os.path.join(workdir, "tensorboard"))) == events


# eval.py's table, JSON and CSV on this run: tests/test_backbones.py, for every backbone.


def test_eval_py_clear_errors(finished, tmp_path, env):
  workdir, _ = finished
  missing = run(["eval.py", CONFIG, f"--checkpoint={tmp_path}/nope", "--throughput_batch=0"], env)
  assert missing.returncode == 1 and "does not exist" in missing.stderr
  assert "Traceback" not in missing.stderr
  wrong = run(["eval.py", CONFIG, f"--checkpoint={workdir}", "--config.model.embed_dim=48",
               "--throughput_batch=0"], env)
  assert wrong.returncode == 1 and "wrong shape" in wrong.stderr
  assert "blocks.0.attn.qkv.weight is (96, 32), the config needs (144, 48)" in wrong.stderr
  bad_r = run(["eval.py", CONFIG, f"--checkpoint={workdir}", "--config.eval.r_values=(1.5,)",
               "--throughput_batch=0"], env)
  assert bad_r.returncode == 1 and "must be a whole number" in bad_r.stderr
  (tmp_path / "notes.pth").write_text("not a checkpoint")
  unreadable = run(["eval.py", CONFIG, f"--checkpoint={tmp_path}/notes.pth",
                    "--throughput_batch=0"], env)
  assert unreadable.returncode == 1 and "notes.pth" in unreadable.stderr
  assert "Traceback" not in unreadable.stderr
  for flag, says in (("--split=nosuch", "got split 'nosuch'"),
                     ("--throughput_batch=-1", "--throughput_batch=-1: expected an int >= 0")):
    bad = run(["eval.py", CONFIG, f"--checkpoint={workdir}", flag], env)
    assert bad.returncode == 1 and says in bad.stderr, bad.stderr
    assert "evaluating" not in bad.stdout and "Traceback" not in bad.stderr
  # Results that cannot be written fail before the evaluation (config.eval.output_dir, as
  # --output_dir, which the other tests use).
  unwritable = run(["eval.py", CONFIG, f"--checkpoint={workdir}", "--throughput_batch=0",
                    f"--config.eval.output_dir={tmp_path}/notes.pth/x"], env)
  assert unwritable.returncode == 1, unwritable.stderr
  assert f"cannot write the results to {tmp_path}/notes.pth/x" in unwritable.stderr
  assert "evaluating" not in unwritable.stdout and "Traceback" not in unwritable.stderr


def test_train_py_clear_errors(finished, tmp_path, env):
  workdir, _ = finished
  other = run(["train.py", CONFIG, f"--workdir={workdir}", "--config.model.embed_dim=48"], env)
  assert other.returncode == 1 and "holds a run of another config" in other.stderr
  assert "model.embed_dim: 32 there, 48 now" in other.stderr
  (tmp_path / "a_file").write_text("")
  for where, says in ((tmp_path / "a_file", "the workdir {} is a file"),
                      (tmp_path / "a_file" / "run", "cannot write to the workdir {}")):
    bad = run(["train.py", CONFIG, f"--workdir={where}"], env)
    assert bad.returncode == 1 and says.format(where) in bad.stderr
    assert "Traceback" not in bad.stderr
  unknown = run(["train.py", CONFIG, f"--workdir={tmp_path}/u", "--config.batchsize=3"], env)
  assert unknown.returncode != 0 and "batchsize" in unknown.stderr
  eight = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
  odd = run(["train.py", CONFIG, f"--workdir={tmp_path}/b", "--config.batch_size=60"], eight)
  assert odd.returncode == 1
  assert "batch_size=60 is not divisible by the number of devices (8)" in odd.stderr
  # Not recorded: the corrected config is not refused as another run's.
  assert not os.path.exists(tmp_path / "b" / "config.json")


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_multi_process_flags_checked_before_anything_starts(script, tmp_path, env):
  where = (f"--workdir={tmp_path}/w" if script == "train.py"
           else f"--checkpoint={tmp_path}/none")
  cases = [("--coordinator_address=localhost:1",),
           ("--num_processes=2", "--process_id=0"),
           ("--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2")]
  said = ["--coordinator_address=localhost:1 needs --num_processes and --process_id",
          "go with --coordinator_address=host:port, which is missing",
          "--process_id=2 must lie in [0, --num_processes=2)"]
  for flags, message in zip(cases, said):
    done = run([script, CONFIG, where, *flags], env, timeout=120)
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
  assert not (tmp_path / "w").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, env):
  workdir = tmp_path / "diverged"
  done = run(["train.py", CONFIG, f"--workdir={workdir}", "--config.base_lr=1e30",
              "--config.checkpoint_every_steps=1"], env)
  assert done.returncode == 1, done.stdout + done.stderr
  assert "non-finite loss at step" in done.stderr
  failed_at = int(done.stderr.split("non-finite loss at step ")[1].split()[0])
  kept = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert kept and max(kept) < failed_at
  assert f"the last good checkpoint (step {max(kept)}) is kept" in done.stderr
  params = _params(str(workdir))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def _processes(workdir, env, n=2, extra=(), kill=None):
  """train.py as `n` processes (one CPU device each) joined by a local coordinator, one
  epoch. kill=(victim, line prefix): SIGKILL process `victim` once process 0 prints that
  line. Returns [(exit code, stdout, stderr, seconds from the kill to the exit)]."""
  import socket
  import threading
  import time
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, "train.py", CONFIG, f"--workdir={workdir}", "--config.num_epochs=1",
       f"--coordinator_address=localhost:{port}", f"--num_processes={n}", f"--process_id={i}",
       *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(n)]
  outs, errs, ended, killed = [[] for _ in procs], [""] * n, [0.0] * n, [None]

  def read(i):
    for line in procs[i].stdout:
      outs[i].append(line)
      if kill and i == 0 and killed[0] is None and line.startswith(kill[1]):
        procs[kill[0]].kill()
        killed[0] = time.time()
    errs[i] = procs[i].stderr.read()
    procs[i].wait()
    ended[i] = time.time()
  threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(600)
  for p in procs:
    if p.poll() is None:
      p.kill()
  return [(p.returncode, "".join(o), e, ended[i] - (killed[0] or ended[i]))
          for i, (p, o, e) in enumerate(zip(procs, outs, errs))]


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory, env):
  """An uninterrupted run of train.py as two processes, shared by the tests of every xdist
  worker (``run_once``)."""
  workdir, outputs = run_once(tmp_path_factory, "two_processes",
                              lambda workdir: json.dumps(_processes(workdir, env)))
  return pathlib.Path(workdir), [tuple(result) for result in json.loads(outputs)]


def test_two_processes(two_processes):
  """Each process reads its half of the data, the global batch spans both, evaluation
  scores every image once."""
  workdir, results = two_processes
  assert [r[0] for r in results] == [0, 0], results
  lead = results[0][1]
  assert "2 process(es), 2 device(s)" in lead
  assert "training 22 steps" in lead and "(360 images)" in lead and "done:" in lead
  assert "step 22/22" not in results[1][1]          # only process 0 prints progress
  assert os.path.isdir(workdir / "checkpoints" / "22" / "params")
  params = _params(str(workdir))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_a_checkpoint_one_process_did_not_write_is_not_taken(two_processes, tmp_path, capsys):
  """The newest step directory without process 1's files (a copy cut short, a store that
  lost them): the resume takes the step before, with one warning, and sets it aside."""
  import glob
  import shutil
  import orbax.checkpoint as ocp
  from etils import epath
  from ml_collections import ConfigDict
  from mctf_jax.training.train_step import TrainState
  workdir = tmp_path / "run"
  shutil.copytree(two_processes[0], workdir)
  newest = workdir / "checkpoints" / "22"
  gone = glob.glob(str(newest / "*" / "ocdbt.process_1")) + glob.glob(
      str(newest / "*" / "array_metadatas" / "process_1"))
  assert len(gone) == 6   # params, opt_state, ema
  for path in gone:
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

  def abstract(item):
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(workdir / "checkpoints" / "20"
                                                               / item))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  state = TrainState(jax.ShapeDtypeStruct((), np.int32), abstract("params"),
                     abstract("opt_state"), abstract("ema"), {})
  manager = checkpoint.train_manager(str(workdir), ConfigDict(dict(keep_checkpoints=2,
                                                                      ema_decay=0.9)))
  capsys.readouterr()
  _, step = checkpoint.restore_latest_readable(manager, state, str(workdir))
  manager.close()
  out = capsys.readouterr().out.strip().splitlines()
  assert step == 20
  assert len(out) == 1 and out[0].startswith("warning: the checkpoint of step 22 cannot be "
                                             "restored") and "resuming from step 20" in out[0]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["20"]
  assert os.listdir(workdir / "unreadable_checkpoints") == ["22"]


def test_a_run_resumes_on_another_number_of_processes(two_processes, tmp_path, env):
  """The two-process run's checkpoint of step 20, resumed by one process with two devices,
  ends at step 22 with the two-process run's parameters and EMA, bit for bit: the data
  order is global (mctf_jax.data.pipeline), and an all-reduce of two terms is exact in
  either order."""
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(two_processes[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / "22")
  two = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}")
  done = run(["train.py", CONFIG, f"--workdir={workdir}", "--config.num_epochs=1",
              "--config.eval_every_epochs=2"], two)      # (no evaluation: not compared)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "1 process(es), 2 device(s)" in done.stdout and "at step 20" in done.stdout
  for ema in (False, True):
    jax.tree.map(np.testing.assert_array_equal, _params(str(workdir), ema=ema),
                 _params(str(two_processes[0]), ema=ema))


def test_a_lost_coordinator_stops_the_others_and_the_rerun_resumes(two_processes, tmp_path,
                                                                   env):
  """Process 0 (the coordinator) SIGKILLed mid-run: JAX's runtime would abort process 1
  from C++; it exits 1 at once with one line naming what it lost. Rerunning both resumes
  from the newest complete checkpoint and ends with the uninterrupted run's parameters and
  EMA, bit for bit."""
  workdir = tmp_path / "run"
  extra = ("--config.distributed.lost_process_timeout=10",)
  results = _processes(workdir, env, extra=extra, kill=(0, "step 15/"))
  code, _, err, seconds = results[1]
  assert code == 1, results[1]
  assert err.strip().splitlines() == [
      "error: process 1 of 2 lost the coordinator (process 0): it is gone (killed, lost its "
      "host or its network); stopping"], err
  assert seconds < 10, seconds
  results = _processes(workdir, env, extra=extra)
  assert [r[0] for r in results] == [0, 0], results
  assert "at step 10" in results[0][1] and "done:" in results[0][1]
  reference = str(two_processes[0])
  for ema in (False, True):
    jax.tree.map(np.testing.assert_array_equal, _params(str(workdir), ema=ema),
                 _params(reference, ema=ema))


def test_eval_py_on_a_torch_checkpoint_with_another_fusion_config(tmp_path, env):
  """A pretrained (not MCTF-fine-tuned) PyTorch checkpoint, evaluated as it is under any
  fusion config: here ToMe itself, as in the paper's comparison without training, at the r
  of a FLOP budget (and at r=0, eval.py's default pair)."""
  out_dir = tmp_path / "eval"
  done = run(["eval.py", "--config=tests/configs/tiny.py", "--checkpoint=tests/data/tiny_deit.pth",
              f"--output_dir={out_dir}", "--config.data.dataset=digits",
              "--split=train[:240]", "--config.fusion.method=tome", "--config.fusion.one_step_ahead=off",
              "--config.fusion.tau_info=0", "--config.fusion.tau_size=0",
              "--config.fusion.bidirectional=False", "--config.fusion.layers=(0, 1, 2, 3)",
              "--config.fusion.target_fraction=0.88", "--throughput_batch=0"], env)
  assert done.returncode == 0, done.stdout + done.stderr
  # --split (here a part of one): its size in the log and the results (it said the eval
  # split's).
  assert "on digits (train[:240], 240 images)" in done.stdout
  result = json.loads((out_dir / "results.json").read_text())
  rows = result["results"]
  assert result["split"] == "train[:240]"
  assert "FLOP budget 0.013 GFLOPs (88.0% of the unfused 0.015): r=4, 0.013 GFLOPs (87.0%)" \
      in done.stdout
  assert [(row["r"], row["tokens_out"], row["images"]) for row in rows] == [(4, 49, 240),
                                                                              (0, 65, 240)]
  assert rows[0]["gflops"] < rows[1]["gflops"]
