r"""Chaos test of train.py's resumption: a run killed with SIGKILL at random moments, and
rerun after each kill, must end with the parameters and EMA of an uninterrupted run, bit
for bit.

    python benchmarks/chaos_resume.py                      # 8 kills, seed 0
    python benchmarks/chaos_resume.py --kills=20 --seed=3

The run is tests/configs/digits_tiny.py (the embedded digits, 44 steps, a checkpoint every
10 steps, 2 kept). Half of the kills (drawn with the seed) come at a random moment of the
run, the others a random 0-300 ms after the log line of a step that saves a checkpoint,
that is in the middle of the asynchronous checkpoint write. Prints one line per attempt
and the comparison; exits 1 if the parameters differ. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("kills", 8, "SIGKILLs before the run may finish.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
flags.DEFINE_string("workdir", None, "Where to put the two runs (default: a temporary "
                    "directory, removed afterwards).")

CONFIG = "--config=tests/configs/digits_tiny.py"
CHECKPOINT_EVERY = 10
MODEL = {"model": dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                       num_classes=10, mlp_ratio=2.0)}


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
              PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def _train(workdir: str, kill_after=None, at_checkpoint_step=False):
  """One train.py run; with kill_after (seconds), SIGKILL that long after it starts, or
  (at_checkpoint_step) that long after it logs a step that saves a checkpoint. Returns
  (exit code, last step logged, seconds)."""
  start = time.time()
  proc = subprocess.Popen([sys.executable, "train.py", CONFIG, f"--workdir={workdir}"],
                          cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  last = [0]
  timer = None
  if kill_after is not None and not at_checkpoint_step:
    timer = threading.Timer(kill_after, proc.kill)
    timer.start()
  for line in proc.stdout:
    if line.startswith("step "):
      last[0] = int(line.split()[1].split("/")[0])
      if (kill_after is not None and at_checkpoint_step and timer is None
              and last[0] % CHECKPOINT_EVERY == 0):
        timer = threading.Timer(kill_after, proc.kill)
        timer.start()
  proc.wait()
  if timer is not None:
    timer.cancel()
  return proc.returncode, last[0], time.time() - start


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from absl import logging
  logging.set_verbosity(logging.WARNING)   # Orbax's INFO lines while reading the results
  from mctf_jax import checkpoint
  import jax
  import numpy as np

  root = FLAGS.workdir or tempfile.mkdtemp(prefix="mctf_chaos_")
  reference, chaos = os.path.join(root, "uninterrupted"), os.path.join(root, "chaos")
  for path in (reference, chaos):
    if os.path.exists(path):
      shutil.rmtree(path)
  code, _, seconds = _train(reference)
  if code:
    raise SystemExit(f"the uninterrupted run failed (exit {code})")
  print(f"uninterrupted run: {seconds:.1f} s")
  rng = random.Random(FLAGS.seed)
  attempt = 0
  while True:
    attempt += 1
    if attempt <= FLAGS.kills:
      at_checkpoint = rng.random() < 0.5
      delay = rng.uniform(0.0, 0.3) if at_checkpoint else rng.uniform(0.0, seconds)
    else:
      at_checkpoint, delay = False, None
    code, last, took = _train(chaos, delay, at_checkpoint)
    how = ("no kill" if delay is None else
           f"kill {delay * 1000:.0f} ms after a checkpoint step" if at_checkpoint else
           f"kill at {delay:.1f} s")
    print(f"attempt {attempt:2d}: {how:<34s} exit {code:4d}, last step logged {last:2d}, "
          f"{took:.1f} s", flush=True)
    if code == 0:
      break
    if code != -signal.SIGKILL:
      raise SystemExit(f"attempt {attempt} failed with exit {code}: rerun {CONFIG} "
                       f"--workdir={chaos} to see why")
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
