r"""Fused against plain, as the TPU compiler sees them: every config on TPU slices, compiled.

    python benchmarks/tpu_compile.py --configs=deit_s --topologies=v5e:2x2 --programs=eval
    python benchmarks/tpu_compile.py --json=workdirs/tpu_compile.json     # everything: hours

For each config (configs/<name>.py) and topology, compiles eval.py's forward at the
config's r and at r=0, and train.py's train step with and without fusion and teacher
(``mctf_jax.tools.compile``, the entry points' own programs), in bfloat16 (model.dtype
and param_dtype) at --batch_per_chip images per chip, and prints per program the fused /
plain ratios of FLOPs (the traced matrix products, and XLA's count), bytes accessed,
XLA's time estimate (the speed-up it implies, with the instructions its TPU cost model
cannot cost at 0), compile time and HBM per chip. These are compiled figures, not run
ones; a program that does not fit prints its one-line error and the sweep goes on.
With --noteacher the fused train step is the student's alone (no teacher branches under a
``lax.switch``, which XLA's cost analysis does not count in full), so its bytes and
XLA's estimate compare with the plain step's.

On this project's 2-core CPU a DeiT-S forward compiles in minutes and a train step with
its teacher branches in tens of minutes: choose --configs, --topologies and --programs.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mctf_jax.tools import compile as aot  # noqa: E402  (sets the TPU compile environment)

from absl import app, flags  # noqa: E402

import mctf_jax  # noqa: E402
from mctf_jax.errors import MctfError  # noqa: E402
from mctf_jax.tools import cli  # noqa: E402

FLAGS = flags.FLAGS
CONFIGS = ("deit_t", "deit_s", "deit_b", "deit_s_fast", "tome", "pitome", "lvvit_s",
           "t2t_vit_14", "vit_b16_augreg", "siglip_b16")
flags.DEFINE_list("configs", list(CONFIGS), "Config names (configs/<name>.py).")
flags.DEFINE_list("topologies", ["v5e:2x2", "v6e:2x2"], "TPU slices (or cpu:N).")
flags.DEFINE_list("programs", ["eval", "train"], "eval: the forwards; train: the steps.")
flags.DEFINE_integer("batch_per_chip", 256, "Images per chip and step.", lower_bound=1)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "model.dtype and param_dtype.")
flags.DEFINE_bool("teacher", True,
                  "Train steps with the config's teacher branches (--noteacher: the fused "
                  "student's step alone, which XLA's estimate covers: no lax.switch).")
flags.DEFINE_string("json", None, "Write every figure to this JSON file.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_for(name: str, chips: int, *, dtype: str, batch_per_chip: int, teacher: bool):
  """configs/<name>.py as the sweep compiles it: `dtype` compute and parameters,
  `batch_per_chip` images per chip for training and evaluation, the forward at the
  config's r only, and (without `teacher`) the student's train step alone."""
  config = mctf_jax.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  config.model.dtype = config.model.param_dtype = dtype
  config.batch_size = config.eval_batch_size = batch_per_chip * chips
  config.eval.r_values = ()
  if not teacher:
    config.fusion.teacher_r_max = 0.0
  return config


def main(argv):
  cli.begin_script(argv, FLAGS)
  rows = []
  for topology, tgt in aot.each_target(FLAGS.topologies):
    for name in FLAGS.configs:
      config = config_for(name, len(tgt.devices), dtype=FLAGS.dtype,
                          batch_per_chip=FLAGS.batch_per_chip, teacher=FLAGS.teacher)
      t0 = time.time()
      try:
        results = aot.compile_all(config, tgt, tuple(FLAGS.programs),
                                  say=lambda s: print(f"  {name}: {s}", flush=True))
      except MctfError as e:
        print(f"  {name}: {e}", flush=True)
        rows.append({"config": name, "topology": topology, "error": str(e)})
        continue
      by_name = {c.name: c for c in results}
      row = {"config": name, "topology": topology, "device_kind": tgt.device_kind,
             "batch_per_chip": FLAGS.batch_per_chip, "dtype": FLAGS.dtype,
             "teacher": FLAGS.teacher,
             "programs": [c.as_dict() for c in results], "seconds": time.time() - t0}
      if "train step" in by_name:
        row["train_ratios"] = aot.ratios(by_name["train step"], by_name["train step, plain"])
        print("  " + aot.format_ratios(by_name["train step"], by_name["train step, plain"]))
      plain = by_name.get("forward r=0")
      fused = [c for c in results if c.name.startswith("forward") and c is not plain]
      if plain and fused:
        row["forward_ratios"] = aot.ratios(fused[0], plain)
        print("  " + aot.format_ratios(fused[0], plain))
      rows.append(row)
  if FLAGS.json:
    cli.write_json(FLAGS.json, rows)


if __name__ == "__main__":
  app.run(main)
