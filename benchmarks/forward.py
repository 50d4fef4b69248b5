r"""Forward speed-ups of the MCTF configs over the same models without fusion, and where the
fused forward's time goes.

    python benchmarks/forward.py                       # the four configs, batch 32, float32
    python benchmarks/forward.py --configs=deit_s --batch_size=256 --dtype=bfloat16

For each config (configs/<name>.py): ``mctf_jax.tools.benchmark.compare`` (jitted forward on one
device, random weights and images, after compilation and warm-up, repetitions of the fused
and the plain model alternating, median) gives img/s of both, their ratio and the FLOP
ratio; then ``mctf_jax.tools.profiling`` traces the same compiled fused forward with jax.profiler
and splits its kernel time by part: the fusion's own steps (scores, matching, merges,
attention merge) against the transformer's. Prints one table and the profiles, writes JSON
with --json.

The issue's targets (float32, batch 32, 2 CPU threads) are printed next to the figures; on
a machine with more cores, pin two (``taskset -c 0,1 python benchmarks/forward.py``) to
compare with them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["deit_s", "deit_s_fast", "deit_t", "deit_t_fast"],
                  "Config names under configs/, or config file paths.")
flags.DEFINE_integer("batch_size", 32, "Images per forward call.", lower_bound=1)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("repeats", 20, "Timed repetitions per model (median reported).",
                     lower_bound=1)
flags.DEFINE_integer("settle", 1, "Untimed calls before each timed repetition.",
                     lower_bound=0)
flags.DEFINE_bool("profile", True, "Also profile the fused forward (fusion's share of time).")
flags.DEFINE_string("json", None, "Write the figures as JSON to this path.")

# Speed-up targets (img/s fused / plain) at float32, batch 32, 2 CPU threads. MCTF ViT-B/16
# (big_vision): 90% of its FLOP ratio (17.583 / 10.408 = 1.69).
TARGETS = {"deit_s": 1.65, "deit_s_fast": 1.70, "deit_t": 1.50, "vit_b16_augreg": 1.52}
FUSION_SHARE_TARGET = 0.10


def _load_config(name: str):
  """configs/<name>.py by name, or a config file by path."""
  if name.endswith(".py"):
    if not os.path.isfile(name):
      raise app.UsageError(f"config file {name} does not exist")
    spec = importlib.util.spec_from_file_location("bench_config", name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
  try:
    return importlib.import_module(f"configs.{name}").get_config()
  except ModuleNotFoundError:
    raise app.UsageError(f"no config configs/{name}.py (give a name under configs/ or a "
                         f"path ending in .py)") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import jax
  from mctf_jax.tools import benchmark, profiling

  # Every config and the --json path are checked before the first config is timed.
  if FLAGS.json:
    try:
      benchmark.check_output_file(FLAGS.json)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  configs = {os.path.splitext(os.path.basename(name))[0]: _load_config(name)
             for name in FLAGS.configs}
  device = jax.devices()[0]
  print(f"{benchmark.machine_summary(device)}; batch {FLAGS.batch_size}, dtype {FLAGS.dtype}",
        flush=True)
  results = {}
  for label, config in configs.items():
    config.model.dtype = FLAGS.dtype
    print(f"{label}: compiling and timing ...", flush=True)
    result = benchmark.compare(config, batch_size=FLAGS.batch_size, repeats=FLAGS.repeats,
                               settle=FLAGS.settle, profile=FLAGS.profile)
    print(benchmark.format_result(result), flush=True)
    if result["fused"] is not None and "profile" in result["fused"]:
      prof = result["fused"].pop("profile")
      result["profile"] = {"wall_s": prof["wall_s"], "kernel_s": prof["kernel_s"],
                           "parts": prof["parts"],
                           "fusion_share": profiling.fusion_share(prof)}
      print(profiling.format_profile(prof, f"{label} fused forward: "), flush=True)
    elif result["fused"] is not None and "profile_error" in result["fused"]:
      print(f"{label} fused forward: no profile ({result['fused']['profile_error']})",
            flush=True)
    results[label] = result

  print(f"\nsummary (batch {FLAGS.batch_size}, {FLAGS.dtype}, {device.device_kind}):")
  head = (f"{'config':<12s} {'r':>5s} {'GFLOPs':>13s} {'img/s fused':>11s} {'img/s plain':>11s} "
          f"{'speed-up':>8s} {'pairs: quartiles':>16s} {'FLOP ratio':>10s} {'target':>6s} "
          f"{'fusion share':>12s}  targets met")
  print(head)
  print("-" * len(head))
  for name, res in results.items():
    fused, plain = res["fused"], res["plain"]
    if fused is None:
      print(f"{name:<12s} no fusion in this config")
      continue
    target = TARGETS.get(name)
    share = res.get("profile", {}).get("fusion_share")
    res["targets"] = {}
    if target:
      res["targets"]["speedup"] = {"min": target, "met": bool(res["speedup"] >= target)}
    if share is not None:
      res["targets"]["fusion_share"] = {"max": FUSION_SHARE_TARGET,
                                        "met": bool(share <= FUSION_SHARE_TARGET)}
    verdict = ", ".join(f"{k.replace('_', ' ')} {'yes' if t['met'] else 'NO'}"
                        for k, t in res["targets"].items()) or "-"
    print(f"{name:<12s} {fused['r']!r:>5s} {fused['gflops']:6.3f}/{plain['gflops']:6.3f} "
          f"{fused['img_per_s']:11.1f} {plain['img_per_s']:11.1f} {res['speedup']:7.2f}x "
          f"{res['speedup_quartiles'][0]:7.2f}-{res['speedup_quartiles'][2]:.2f}x "
          f"{res['flop_ratio']:9.2f}x {(f'{target:.2f}x' if target else '-'):>6s} "
          f"{(f'{100 * share:.1f}%' if share is not None else '-'):>12s}  {verdict}")
  print(f"targets at float32, batch 32, 2 CPU threads; fusion share target <= "
        f"{100 * FUSION_SHARE_TARGET:.0f}%")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"batch_size": FLAGS.batch_size, "dtype": FLAGS.dtype, "device": str(device),
                 "device_kind": device.device_kind, "jax": jax.__version__,
                 "results": results}, f, indent=2, default=str)


if __name__ == "__main__":
  app.run(main)
