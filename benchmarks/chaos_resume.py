r"""Chaos test of train.py's resumption: a run killed with SIGKILL at random moments, and
rerun after each kill, must end with the parameters and EMA of an uninterrupted run, bit
for bit.

    python benchmarks/chaos_resume.py                      # 8 kills, seed 0
    python benchmarks/chaos_resume.py --kills=20 --seed=3
    python benchmarks/chaos_resume.py --processes=4        # a pod of 4 CPU processes
    python benchmarks/chaos_resume.py --processes=4 --signal=term   # preemption notices

The run is tests/configs/digits_tiny.py (the embedded digits, 44 steps, a checkpoint every
10 steps, 2 kept). Half of the kills (drawn with the seed) come at a random moment of the
run, the others a random 0-300 ms after the log line of a step that saves a checkpoint,
that is in the middle of the asynchronous checkpoint write. With --processes=N, train.py
runs as N processes (one CPU device each, gloo) and each kill hits one process drawn with
the seed: every other process must then exit on its own with exit code 1 and one line
naming the lost process, no traceback (the seconds from the kill to the last exit are
printed). With --signal=term, one process drawn with the seed gets SIGTERM (a preemption
notice on one host): all must save the same step and exit 0. With --signal=stop, one
training process is held (SIGSTOP) for --stop_seconds, then resumed (a slow host): nothing
may fail, and process 0's slowest progress line is printed beside its median. Prints one line per attempt
and the comparison; exits 1 if anything differs. Minutes on 2 CPU cores (1 process), tens
of minutes for 4.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # reading the results (libtpu may be installed)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from mctf_jax import checkpoint  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("kills", 8, "SIGKILLs before the run may finish.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
flags.DEFINE_integer("processes", 1, "train.py processes (jax.distributed on CPU).",
                     lower_bound=1)
flags.DEFINE_enum("signal", "kill", ["kill", "term", "stop"], "SIGKILL (a lost process), "
                  "SIGTERM (a preemption notice) or SIGSTOP for --stop_seconds, then SIGCONT "
                  "(a slow host).")
flags.DEFINE_float("stop_seconds", 5.0, "How long --signal=stop holds a process.")
flags.DEFINE_float("lost_process_timeout", 30.0, "--config.distributed.lost_process_timeout "
                   "of the runs (seconds).")
flags.DEFINE_string("workdir", None, "Where to put the two runs (default: a temporary "
                    "directory, removed afterwards).")

CONFIG = "--config=tests/configs/digits_tiny.py"
CHECKPOINT_EVERY = 10
MODEL = {"model": dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                       num_classes=10, mlp_ratio=2.0)}


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
              PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def _train(workdir: str, kill_after=None, at_checkpoint_step=False, victim=0):
  """One train.py run of FLAGS.processes processes; with kill_after (seconds), the signal
  to process `victim` that long after the start, or (at_checkpoint_step) that long after
  process 0 logs a step that saves a checkpoint. Returns (exit codes, stderr of each, last
  step logged, seconds, seconds from the signal to the last exit)."""
  n = FLAGS.processes
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  several = ([f"--coordinator_address=localhost:{port}", f"--num_processes={n}"]
             if n > 1 else [])
  start = time.time()
  procs = [subprocess.Popen(
      [sys.executable, "train.py", CONFIG, f"--workdir={workdir}",
       f"--config.distributed.lost_process_timeout={FLAGS.lost_process_timeout}"] + several
      + ([f"--process_id={i}"] if n > 1 else []),
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(n)]
  sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "stop": signal.SIGSTOP}[FLAGS.signal]
  sent = [None]

  def send():
    if procs[victim].poll() is None:
      target = procs[victim].pid
      if FLAGS.signal == "stop" and n > 1:   # the training process, not its supervisor
        import psutil   # here: not in requirements.txt, and only this case needs it
        target = psutil.Process(target).children()[0].pid
      os.kill(target, sig)
      sent[0] = time.time()
      if FLAGS.signal == "stop":
        threading.Timer(FLAGS.stop_seconds, os.kill, (target, signal.SIGCONT)).start()
  errs = [""] * n
  readers = [threading.Thread(target=lambda i=i: errs.__setitem__(i, procs[i].stderr.read()))
             for i in range(n)]
  for t in readers:
    t.start()
  last, rates = [0], []
  timer = None
  if kill_after is not None and not at_checkpoint_step:
    timer = threading.Timer(kill_after, send)
    timer.start()
  for line in procs[0].stdout:
    if line.startswith("step "):
      last[0] = int(line.split()[1].split("/")[0])
      rates.append(float(line.split(" img/s")[0].rsplit("| ", 1)[1]))
      if (kill_after is not None and at_checkpoint_step and timer is None
              and last[0] % CHECKPOINT_EVERY == 0):
        timer = threading.Timer(kill_after, send)
        timer.start()
  for p in procs[1:]:
    p.stdout.read()
  for p in procs:
    p.wait()
  for t in readers:
    t.join()
  if timer is not None:
    timer.cancel()
  end = time.time()
  if FLAGS.signal == "stop" and sent[0] and rates:
    print(f"  progress lines (img/s): slowest {min(rates):.1f}, median "
          f"{sorted(rates)[len(rates) // 2]:.1f}")
  return ([p.returncode for p in procs], errs, last[0], end - start,
          end - sent[0] if sent[0] else None)


def _check_attempt(attempt, codes, errs, victim, signalled) -> str | None:
  """What is wrong with how the processes ended, or None."""
  if not signalled:
    return None if all(c == 0 for c in codes) else f"exit codes {codes} without a signal"
  if FLAGS.signal in ("term", "stop"):
    return None if all(c == 0 for c in codes) else (
        f"exit codes {codes} after SIG{FLAGS.signal.upper()}: {errs}")
  for i, (code, err) in enumerate(zip(codes, errs)):
    if i == victim:
      continue
    lines = err.strip().splitlines()
    if code == 0 and not lines:   # it had finished before the kill
      continue
    if code != 1 or len(lines) != 1 or not lines[0].startswith("error: "):
      return f"process {i} ended with exit {code} and stderr:\n{err}"
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)   # Orbax's INFO lines while reading the results

  root = FLAGS.workdir or tempfile.mkdtemp(prefix="mctf_chaos_")
  reference, chaos = os.path.join(root, "uninterrupted"), os.path.join(root, "chaos")
  for path in (reference, chaos):
    if os.path.exists(path):
      shutil.rmtree(path)
  codes, errs, _, seconds, _ = _train(reference)
  if any(codes):
    raise SystemExit(f"the uninterrupted run failed (exit {codes}): {errs}")
  print(f"uninterrupted run ({FLAGS.processes} process(es)): {seconds:.1f} s")
  rng = random.Random(FLAGS.seed)
  attempt, to_fail = 0, []
  while True:
    attempt += 1
    victim = rng.randrange(FLAGS.processes)
    if attempt <= FLAGS.kills:
      at_checkpoint = rng.random() < 0.5
      delay = rng.uniform(0.0, 0.3) if at_checkpoint else rng.uniform(0.0, seconds)
    else:
      at_checkpoint, delay = False, None
    codes, errs, last, took, after = _train(chaos, delay, at_checkpoint, victim)
    what = f"SIG{FLAGS.signal.upper()} to process {victim}" if FLAGS.processes > 1 else (
        f"SIG{FLAGS.signal.upper()}")
    how = ("no signal" if delay is None else
           f"{what} {delay * 1000:.0f} ms after a checkpoint step" if at_checkpoint else
           f"{what} at {delay:.1f} s")
    ended = "" if after is None else f", all ended {after:.1f} s after it"
    print(f"attempt {attempt:2d}: {how:<48s} exits {codes}, last step logged {last:2d}, "
          f"{took:.1f} s{ended}", flush=True)
    if after is not None and FLAGS.processes > 1 and FLAGS.signal == "kill":
      to_fail.append(after)
    wrong = _check_attempt(attempt, codes, errs, victim, after is not None)
    if wrong:
      raise SystemExit(f"attempt {attempt}: {wrong}\n(rerun {CONFIG} --workdir={chaos} to see "
                       f"more)")
    if all(c == 0 for c in codes) and os.path.isdir(os.path.join(chaos, "checkpoints", "44")):
      break
  if to_fail:
    print(f"{len(to_fail)} signal(s) to one of {FLAGS.processes} processes: all processes "
          f"ended {min(to_fail):.1f}-{max(to_fail):.1f} s after it")
  same = True
  for ema in (False, True):
    a = checkpoint.load_params(reference, MODEL, ema=ema)
    b = checkpoint.load_params(chaos, MODEL, ema=ema)
    equal = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    print(f"{'EMA' if ema else 'parameters'}: {'bit-identical' if equal else 'DIFFER'}")
    same &= equal
  if FLAGS.workdir is None:
    shutil.rmtree(root)
  sys.exit(0 if same else 1)


if __name__ == "__main__":
  app.run(main)
