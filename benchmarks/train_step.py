r"""The MCTF train step against a plain DeiT train step: time, compile time, memory.

    python benchmarks/train_step.py --config=configs/deit_s.py --batch_size=32

Both steps are the trainer's own (``mctf_jax.training.train_step.make_train_step``, jitted
with the state donated, as train.py runs it) on the same model, weights and batch of random images;
"plain" is the config with no fused layers and no teacher (``fusion.layers=()``,
``fusion.teacher_r_max=0``): a DeiT fine-tuning step. The MCTF step runs the student (fixed
r), the teacher (r' drawn inside the step) and the consistency loss.

* time: the teacher's r' changes the step's cost, so the MCTF step is timed at step numbers
  chosen to draw every r' (``TeacherPlan.value_at``), the same number of times each; its figure
  is the mean over r' of the median time per r', what a long run averages to. (Where the
  batch is larger than fusion.teacher_group_size, every step draws an r' per group; the
  step is then timed at as many consecutive step numbers as there are r' values.) The two
  steps take turns (plain, MCTF at r'=0, plain, MCTF at r'=1, ...), so that other load on
  the machine slows both alike; each turn makes one untimed call, then --block timed ones
  (a step's first call after the other's runs slower: its buffers are allocated afresh).
* FLOPs: forward FLOPs (fvcore convention) of the student and the mean teacher, less the
  patch embedding and blocks that the step runs once for both (``TeacherPlan.shared``), over
  the plain model's: the ratio the step time would have if time followed FLOPs.
* compile: tracing + lowering and XLA compilation of the whole step (all teacher branches),
  without the persistent compilation cache; each step is compiled --compiles times, the two
  taking turns, and the shortest counts (separate compilations of one program vary by
  ~10% on a busy machine).
* memory: XLA's static estimate (arguments + outputs + temporaries - donated), and on GPU/TPU
  the device's running peak after each step's warm-up (the MCTF step runs first).

With --compile_profile, the plain step, the student alone (``teacher_r_max=0``) and the
MCTF step are compiled once more under jax.profiler, and the phases of each compilation and
the kernels emitted per part of the model (``profiling.profile_compile``) are printed.

Prints a table, the ratios MCTF / plain and whether each meets its target (time <= 1.4x,
compile <= 3x, memory <= 1.5x), and writes them as JSON with --json.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import mctf_jax  # noqa: E402
from mctf_jax import cost, parallel  # noqa: E402
from mctf_jax.tools import benchmark, cli, profiling  # noqa: E402
from mctf_jax.training import programs  # noqa: E402
from mctf_jax.training.plan import teacher_plan  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_s.py; fields "
                                "may be overridden: --config.fusion.r=8.")
flags.DEFINE_integer("batch_size", 32, "Images per step (one device).", lower_bound=1)
flags.DEFINE_integer("repeats", 2, "Visits to each step per teacher r'.", lower_bound=1)
flags.DEFINE_integer("block", 2, "Timed calls per visit, after one untimed call.", lower_bound=1)
flags.DEFINE_integer("compiles", 2, "Compilations of each step (the shortest counts).",
                     lower_bound=1)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: config's).")
flags.DEFINE_bool("compile_profile", False, "Also compile the plain step, the student "
                  "alone (no teacher) and the MCTF step once more under jax.profiler and "
                  "print where their compile time goes (XLA:CPU).")
flags.DEFINE_string("json", None, "Write the figures as JSON to this path.")
flags.mark_flags_as_required(["config"])

MIB = 2 ** 20
# The issue's targets for the MCTF step against the plain one (at most these ratios).
TARGETS = {"time": 1.4, "compile": 3.0, "memory": 1.5}


def _jitted_step(config, variables, images, labels):
  """train.py's own jitted, donated train step of `config` (programs.train_program) on one
  device, with a fresh state and batch."""
  program = programs.train_program(config, parallel.create_mesh(1, jax.devices()[:1]),
                                   steps_per_epoch=1000)
  # Copies: the step donates its state, and the caller's variables serve the next config.
  fresh = jax.tree.map(jnp.copy, variables)
  state = program.init_state(jax.device_put(fresh, program.variables_shardings))
  batch = {"image": images, "label": labels}
  return program.step, state, batch


def prepare(config, variables, images, labels, warm: bool = True):
  """The jitted, donated train step of `config`, compiled (and warm unless `warm` is
  False); returns (run, info): run(step_number) makes one step numbered so, info has
  trace_s, compile_s and memory."""
  step, state, batch = _jitted_step(config, variables, images, labels)
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  traced = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  holder = {"state": state}

  def run(step_number: int):
    s = holder["state"].replace(step=jnp.asarray(step_number, jnp.int32))
    holder["state"], metrics = compiled(s, batch)
    return metrics

  if warm:
    jax.block_until_ready(run(0))
  device = next(iter(images.devices()))
  info = {"trace_s": traced - start, "compile_s": done - traced,
          "memory": benchmark.memory_figures(compiled, device)}
  return run, info


def compile_profiles(mctf_cfg, plain_cfg, variables, images, labels) -> dict:
  """Where compile time goes: the plain step, the student alone and the MCTF step, each
  compiled once more under the profiler (``profiling.profile_compile``)."""
  student_cfg = mctf_cfg.copy_and_resolve_references()
  student_cfg.fusion.teacher_r_max = 0
  out = {}
  print("\nwhere compile time goes (one more compilation each, under jax.profiler; kernel "
        "emission is split by part, LLVM's machine code is not):")
  for name, cfg in (("plain", plain_cfg), ("student alone", student_cfg), ("mctf", mctf_cfg)):
    step, state, batch = _jitted_step(cfg, variables, images, labels)
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    trace_s = time.perf_counter() - start
    prof = profiling.profile_compile(lowered)
    del prof["compiled"]
    prof["trace_s"] = trace_s
    out[name] = prof
    print(profiling.format_compile_profile(prof, f"{name}: trace {trace_s:.1f} s, "),
          flush=True)
  return out


def main(argv):
  cli.begin_script(argv, FLAGS)

  # Compile times are cold ones: no persistent compilation cache, even where the
  # environment names one (JAX_COMPILATION_CACHE_DIR).
  jax.config.update("jax_enable_compilation_cache", False)
  mctf_cfg = FLAGS.config
  if FLAGS.dtype:
    mctf_cfg.model.dtype = FLAGS.dtype
  mctf_cfg.batch_size = FLAGS.batch_size
  plain_cfg = mctf_cfg.copy_and_resolve_references()
  plain_cfg.fusion.layers = ()
  plain_cfg.fusion.teacher_r_max = 0
  try:   # a bad config fails here, before anything is compiled
    model = mctf_jax.create_model(mctf_cfg)
    plan = teacher_plan(model, FLAGS.batch_size)
  except mctf_jax.ConfigError as e:
    raise app.UsageError(str(e)) from None
  variables = benchmark.random_variables(model)
  images = benchmark.random_images(model, FLAGS.batch_size)
  labels = jnp.arange(FLAGS.batch_size, dtype=jnp.int32) % mctf_cfg.model.num_classes
  device = next(iter(images.devices()))
  print(f"{benchmark.machine_summary(device)}; batch {FLAGS.batch_size}, "
        f"dtype {mctf_cfg.model.dtype}", flush=True)

  steps, compile_times = {}, {"mctf": [], "plain": []}
  for round_ in range(FLAGS.compiles):
    for name, cfg in (("mctf", mctf_cfg), ("plain", plain_cfg)):
      print(f"compiling the {name} step ...", flush=True)
      steps[name] = prepare(cfg, variables, images, labels, warm=round_ == FLAGS.compiles - 1)
      compile_times[name].append(steps[name][1]["trace_s"] + steps[name][1]["compile_s"])
      print(f"  {compile_times[name][-1]:.1f} s", flush=True)

  if plan.groups == 1:
    values = plan.values
    step_of = {}
    for i in range(10_000):
      if len(step_of) == len(values):
        break
      step_of.setdefault(plan.value_at(mctf_cfg.seed, i), i)
    print(f"timing: {FLAGS.repeats} x (plain, MCTF at r' = {', '.join(map(str, values))})",
          flush=True)
  else:
    # Each step draws an r' per group: time as many consecutive steps as there are r'
    # values, keyed by the r' each drew.
    step_of = {plan.value_at(mctf_cfg.seed, i): i for i in range(len(plan.values))}
    values = list(step_of)
    print(f"timing: {FLAGS.repeats} x (plain, MCTF at steps {list(step_of.values())}, "
          f"{plan.groups} groups of {plan.group_size} images with an r' each)",
          flush=True)
  times = {"plain": [], **{("mctf", v): [] for v in values}}
  for _ in range(FLAGS.repeats):
    for v in values:
      for key, (run, _) in (("plain", steps["plain"]), (("mctf", v), steps["mctf"])):
        for i in range(FLAGS.block + 1):
          t = time.perf_counter()
          metrics = run(step_of[v] if key != "plain" else 0)
          jax.block_until_ready(metrics)
          if i:
            times[key].append(time.perf_counter() - t)
        if key != "plain" and abs(float(metrics["teacher_r"]) - float(np.mean(v))) > 1e-6:
          raise RuntimeError(f"step {step_of[v]} drew r'={float(metrics['teacher_r'])}, "
                             f"expected {v}")

  plain_s = statistics.median(times["plain"])
  per_value = {v: statistics.median(times[("mctf", v)]) for v in values}
  mctf_s = statistics.mean(per_value.values())
  plain_info, mctf_info = steps["plain"][1], steps["mctf"][1]
  flop = lambda r: cost.model_flops(model, r).gflops
  plain_flops = cost.model_flops(model, 0)
  shared = plan.shared
  # The step runs the patch embedding and the shared blocks once for both paths.
  shared_gflops = sum(s.flops for s in plain_flops.stages[:1 + shared]) / 1e9
  teacher_gflops = statistics.mean(flop(v) for v in plan.values)   # over uniform r'
  flop_ratio = (flop(None) + teacher_gflops - shared_gflops) / plain_flops.gflops

  def mem(info):
    return info["memory"].get("device_peak_bytes_in_use",
                              info["memory"].get("estimated_peak_bytes", 0))

  result = {
      "config": mctf_cfg.to_dict(), "batch_size": FLAGS.batch_size, "device": str(device),
      "device_kind": device.device_kind, "jax": jax.__version__,
      "plain": {"step_s": plain_s, "compile_s": min(compile_times["plain"]),
                "compile_s_each": compile_times["plain"], "memory": plain_info["memory"]},
      "mctf": {"step_s": mctf_s, "step_s_per_teacher_r": {str(k): v for k, v in
                                                          per_value.items()},
               "compile_s": min(compile_times["mctf"]),
               "compile_s_each": compile_times["mctf"],
               "teacher_branches": plan.num_branches,
               "padded": plan.padded, "memory": mctf_info["memory"]},
  }
  result["ratios"] = {
      "time": mctf_s / plain_s,
      "compile": result["mctf"]["compile_s"] / result["plain"]["compile_s"],
      "memory": mem(mctf_info) / max(mem(plain_info), 1),
      "flops": flop_ratio}
  print(model.schedule())
  print(f"\n{'step':<6s} {'ms/step':>9s} {'compile s':>10s} {'memory MiB':>11s}")
  for name in ("plain", "mctf"):
    row = result[name]
    print(f"{name:<6s} {row['step_s'] * 1e3:9.0f} {row['compile_s']:10.1f} "
          f"{mem(steps[name][1]) / MIB:11.0f}")
  print("MCTF ms/step per teacher r': " + ", ".join(f"{v}: {s * 1e3:.0f}"
                                                    for v, s in per_value.items()))
  r = result["ratios"]
  print(f"ratios MCTF / plain: time {r['time']:.2f}x (FLOPs {r['flops']:.2f}x), compile "
        f"{r['compile']:.1f}x ({plan.num_branches} teacher branches, "
        f"{'padded shapes' if plan.padded else 'exact shapes'}), memory "
        f"{r['memory']:.2f}x")
  result["targets"] = {k: {"max_ratio": t, "met": bool(r[k] <= t)} for k, t in TARGETS.items()}
  print("targets: " + ", ".join(f"{k} <= {t['max_ratio']}x {'met' if t['met'] else 'NOT met'}"
                                for k, t in result["targets"].items()))
  if FLAGS.compile_profile:
    result["compile_profile"] = compile_profiles(mctf_cfg, plain_cfg, variables, images,
                                                 labels)
  if FLAGS.json:
    cli.write_json(FLAGS.json, result)


if __name__ == "__main__":
  app.run(main)
