r"""A run restarted on another topology: train.py saved by 4 processes x 2 devices, resumed
by 2 processes x 4 devices and by 1 process x 8 devices, against the run that never stopped.

    python benchmarks/topology_resume.py
    python benchmarks/topology_resume.py --from=4x2 --to=2x4,1x8 --resume_step=10

The run is tests/configs/digits_tiny.py for one epoch (22 steps, a checkpoint every 10).
The first topology runs it to the end; for each other one, a copy of its workdir with the
checkpoints after --resume_step removed is rerun there (the same command, other
--num_processes and device count) and its final parameters and EMA are compared with the
first run's: identical, or the largest difference. An uninterrupted run on the last
topology is compared too. The global batch order does not depend on the topology
(mctf_jax.data.pipeline); what may differ is the order in which the gradients' all-reduce
adds the devices' parts (docs/training.md), by float rounding: exits 1 if a run fails or a
difference exceeds --tolerance. Minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # reading the results (libtpu may be installed)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from mctf_jax import checkpoint  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("from", "4x2", "The topology of the first run: PROCESSESxDEVICES.")
flags.DEFINE_list("to", ["2x4", "1x8"], "Topologies that resume it.")
flags.DEFINE_integer("resume_step", 10, "The checkpoint the other topologies resume from "
                     "(a multiple of 10 below 22).", lower_bound=10, upper_bound=20)
flags.DEFINE_float("tolerance", 1e-4, "The largest difference of a parameter or EMA value "
                   "allowed between topologies (float rounding of the all-reduce).")
flags.DEFINE_string("workdir", None, "Where to put the runs (default: a temporary "
                    "directory, removed afterwards).")

CONFIG = "--config=tests/configs/digits_tiny.py"
MODEL = {"model": dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                       num_classes=10, mlp_ratio=2.0)}


def _topology(text: str) -> tuple[int, int]:
  try:
    processes, devices = (int(x) for x in text.split("x"))
  except ValueError:
    raise app.UsageError(f"topology {text!r}: expected PROCESSESxDEVICES, e.g. 4x2") from None
  if processes < 1 or devices < 1:
    raise app.UsageError(f"topology {text!r}: expected positive counts")
  return processes, devices


def _train(workdir: str, processes: int, devices: int) -> float:
  """train.py as `processes` processes with `devices` CPU devices each; seconds taken."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                       "--xla_backend_optimization_level=0")
  args = [sys.executable, "train.py", CONFIG, f"--workdir={workdir}", "--config.num_epochs=1",
          "--config.keep_checkpoints=5"]
  if processes > 1:
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    commands = [args + [f"--coordinator_address=localhost:{port}",
                        f"--num_processes={processes}", f"--process_id={i}"]
                for i in range(processes)]
  else:
    commands = [args]
  start = time.time()
  procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for c in commands]
  outs = [p.communicate()[0] for p in procs]
  if any(p.returncode for p in procs):
    codes = [p.returncode for p in procs]
    sys.exit(f"error: train.py on {processes}x{devices} exited {codes}:\n{outs[0][-3000:]}")
  return time.time() - start


def _compare(workdir: str, reference: str) -> tuple[str, float]:
  """What differs between two runs' final parameters and EMA, and the largest difference."""
  said, largest = [], 0.0
  for ema in (False, True):
    a = jax.tree.leaves(checkpoint.load_params(workdir, MODEL, ema=ema))
    b = jax.tree.leaves(checkpoint.load_params(reference, MODEL, ema=ema))
    if all(np.array_equal(x, y) for x, y in zip(a, b)):
      said.append(f"{'EMA' if ema else 'parameters'} identical")
    else:
      diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                 for x, y in zip(a, b))
      said.append(f"{'EMA' if ema else 'parameters'} differ, max |diff| {diff:.2g}")
      largest = max(largest, diff)
  return ", ".join(said), largest


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # Orbax's INFO lines while reading the results
  first = _topology(FLAGS["from"].value)
  others = [_topology(t) for t in FLAGS.to]
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="topology_resume_")
  os.makedirs(root, exist_ok=True)
  try:
    name = lambda t: f"{t[0]}x{t[1]}"
    reference = os.path.join(root, name(first))
    shutil.rmtree(reference, ignore_errors=True)
    seconds = _train(reference, *first)
    largest = 0.0
    print(f"{name(first)}: 22 steps in {seconds:.0f} s", flush=True)
    for topology in others:
      workdir = os.path.join(root, f"{name(first)}_to_{name(topology)}")
      shutil.rmtree(workdir, ignore_errors=True)
      shutil.copytree(reference, workdir)
      checkpoints = os.path.join(workdir, "checkpoints")
      for step in os.listdir(checkpoints):
        if int(step) > FLAGS.resume_step:
          shutil.rmtree(os.path.join(checkpoints, step))
      seconds = _train(workdir, *topology)
      said, diff = _compare(workdir, reference)
      largest = max(largest, diff)
      print(f"{name(first)} -> {name(topology)} from step {FLAGS.resume_step}: {said} "
            f"({seconds:.0f} s)", flush=True)
    last = others[-1] if others else first
    workdir = os.path.join(root, f"{name(last)}_uninterrupted")
    shutil.rmtree(workdir, ignore_errors=True)
    seconds = _train(workdir, *last)
    said, diff = _compare(workdir, reference)
    largest = max(largest, diff)
    print(f"{name(last)} uninterrupted against {name(first)}: {said} ({seconds:.0f} s)",
          flush=True)
    if largest > FLAGS.tolerance:
      sys.exit(f"error: the runs differ by up to {largest:.2g}, more than --tolerance="
               f"{FLAGS.tolerance:g}")
  finally:
    if not FLAGS.workdir:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
