r"""Forward speed-ups of the MCTF configs over the same models without fusion, and where the
fused forward's time goes.

    python benchmarks/forward.py                       # the four configs, batch 32, float32
    python benchmarks/forward.py --configs=deit_s --batch_size=256 --dtype=bfloat16
    python benchmarks/forward.py --configs=deit_s,deit_t --batch_sizes=1,8,32,128   # sweep
    python benchmarks/forward.py --configs=lvvit_s,lvvit_s@12,lvvit_s@16,t2t_vit_14
    python benchmarks/forward.py --plot=speedups.png --plot_from=a.json,b.json  # from runs
    python benchmarks/forward.py --configs=deit_t --batch_size=1 --steps_free --profile=false

A config is a name under configs/ or a path; NAME@R runs it at fusion.r=R.

For each config (configs/<name>.py): ``mctf_jax.tools.benchmark.compare`` (jitted forward on one
device, random weights and images, after compilation and warm-up, repetitions of the fused
and the plain model alternating, median) gives img/s of both, their ratio and the FLOP
ratio; then ``mctf_jax.tools.profiling`` traces the same compiled fused forward with jax.profiler
and splits its kernel time by part: the fusion's own steps (scores, matching, merges,
attention merge) against the transformer's. Prints one table and the profiles, writes JSON
with --json. --steps_free times a third forward alongside, the blocks at the fused token
counts without the fusion steps (``steps_free_forward``): the speed-up those shapes allow
and the fusion steps' share of the fused forward's time.

With --batch_sizes, each config is compared at every batch size instead (no profile): img/s
fused and plain, the speed-up against the FLOP ratio, and the latency of one batch, which at
batch 1 is the latency of one image.

The targets (float32, 2 CPU threads: at batch 32, at batch 1, and the sweep's) are printed
next to the figures; on a machine with more cores, pin two (``taskset -c 0,1 python
benchmarks/forward.py``) to compare with them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from mctf_jax.tools import benchmark, cli, profiling  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["deit_s", "deit_s_fast", "deit_t", "deit_t_fast"],
                  "Config names under configs/, or config file paths.")
flags.DEFINE_integer("batch_size", 32, "Images per forward call.", lower_bound=1)
flags.DEFINE_list("batch_sizes", None, "A sweep: compare fused and plain at each of these "
                  "batch sizes (e.g. 1,8,32,128) instead of --batch_size.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("repeats", 20, "Timed repetitions per model (median reported).",
                     lower_bound=1)
flags.DEFINE_integer("settle", 1, "Untimed calls before each timed repetition.",
                     lower_bound=0)
flags.DEFINE_bool("profile", True, "Also profile the fused forward (fusion's share of time).")
flags.DEFINE_bool("steps_free", False,
                  "Also time the blocks at the fused token counts without the fusion steps "
                  "(mctf_jax.tools.benchmark.steps_free_forward): the speed-up those shapes "
                  "allow, and the fusion steps' share of the fused forward's time.")
flags.DEFINE_string("json", None, "Write the figures as JSON to this path.")
flags.DEFINE_string("plot", None, "Draw each config's speed-up against its FLOP ratio (PNG).")
flags.DEFINE_list("plot_from", None, "Draw --plot from these --json files of earlier runs "
                  "(single batch size or sweeps) instead of measuring.")

# Speed-up targets (img/s fused / plain) at float32, batch 32, 2 CPU threads. MCTF ViT-B/16
# (big_vision): 90% of its FLOP ratio (17.583 / 10.408 = 1.69).
TARGETS = {"deit_s": 1.65, "deit_s_fast": 1.70, "deit_t": 1.50, "vit_b16_augreg": 1.52}
# Other configs (LV-ViT, T2T-ViT, ...): this share of their FLOP ratio.
FLOP_RATIO_SHARE_TARGET = 0.9
FUSION_SHARE_TARGET = 0.10
# The sweep's targets: speed-up at batch 1 (float32, 2 CPU threads), and at every batch size
# fused no slower than plain.
BATCH1_TARGETS = {"deit_s": 1.45, "deit_t": 1.35}


def speedup_target(name: str, batch_size: int, flop_ratio: float) -> float:
  """The speed-up a config must reach at one batch size: at batch 1 its batch-1 target
  (else no slower than plain), at the others the batch-32 targets."""
  if batch_size == 1:
    return BATCH1_TARGETS.get(name, 1.0)
  return TARGETS.get(name, FLOP_RATIO_SHARE_TARGET * flop_ratio)


def _load_config(name: str):
  """configs/<name>.py by name, or a config file by path; NAME@R at fusion.r = R."""
  name, at, r = name.partition("@")
  if at:
    config = _load_config(name)
    try:
      config.fusion.r = float(r)
    except ValueError:
      raise app.UsageError(f"{name}@{r}: expected NAME@R with R a number") from None
    return config
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


def _batch_sizes() -> list[int] | None:
  if FLAGS.batch_sizes is None:
    return None
  try:
    sizes = [int(b) for b in FLAGS.batch_sizes]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    raise app.UsageError(f"--batch_sizes={','.join(FLAGS.batch_sizes)}: expected positive "
                         f"integers separated by commas, e.g. 1,8,32,128")
  return sizes


def sweep(configs: dict, sizes: list[int], device) -> dict:
  """compare() of every config at every batch size; prints a table per config and the
  targets met."""
  results = {}
  for label, config in configs.items():
    config.model.dtype = FLAGS.dtype
    rows = {}
    for batch in sizes:
      print(f"{label}, batch {batch}: compiling and timing ...", flush=True)
      rows[batch] = benchmark.compare(config, batch_size=batch, repeats=FLAGS.repeats,
                                      settle=FLAGS.settle)
    results[label] = {"rows": rows}
  print(f"\nbatch sweep ({FLAGS.dtype}, {device.device_kind}):")
  head = (f"{'config':<12s} {'batch':>5s} {'img/s fused':>11s} {'img/s plain':>11s} "
          f"{'speed-up':>8s} {'pairs: quartiles':>16s} {'FLOP ratio':>10s} "
          f"{'ms/batch fused':>14s} {'plain':>7s}")
  print(head)
  print("-" * len(head))
  for label, res in results.items():
    targets = res["targets"] = {}
    for batch, row in res["rows"].items():
      fused, plain = row["fused"], row["plain"]
      if fused is None:
        print(f"{label:<12s} {batch:5d} no fusion in this config")
        continue
      q1, _, q3 = row["speedup_quartiles"]
      print(f"{label:<12s} {batch:5d} {fused['img_per_s']:11.1f} {plain['img_per_s']:11.1f} "
            f"{row['speedup']:7.2f}x {q1:7.2f}-{q3:.2f}x {row['flop_ratio']:9.2f}x "
            f"{fused['median_s'] * 1e3:14.2f} {plain['median_s'] * 1e3:7.2f}")
    speedups = {b: row["speedup"] for b, row in res["rows"].items() if row["fused"]}
    if speedups:
      targets["never_slower"] = {"min": 1.0, "met": bool(min(speedups.values()) >= 1.0)}
    if label in BATCH1_TARGETS and 1 in speedups:
      targets["batch_1_speedup"] = {"min": BATCH1_TARGETS[label],
                                    "met": bool(speedups[1] >= BATCH1_TARGETS[label])}
    verdict = ", ".join(f"{k.replace('_', ' ')} (>= {t['min']:.2f}x) "
                        f"{'yes' if t['met'] else 'NO'}" for k, t in targets.items())
    print(f"{'':<12s} targets: {verdict or '-'}")
  print("targets at float32, 2 CPU threads: fused no slower than plain at any batch; at batch 1 "
        + ", ".join(f"{k} >= {v:.2f}x" for k, v in BATCH1_TARGETS.items()))
  return results


def speedup_points(data: dict) -> list[tuple[str, float, float, float, float]]:
  """(label, FLOP ratio, speed-up, its lower and upper pair quartile) of every fused config
  of a --json file (a sweep's: every batch size)."""
  points = []
  for name, res in data["results"].items():
    rows = ({f"{name}, batch {b}": row for b, row in res["rows"].items()} if "rows" in res
            else {f"{name}, batch {data['batch_size']}": res})
    for label, row in rows.items():
      if row.get("speedup"):
        q1, _, q3 = row["speedup_quartiles"]
        points.append((label, row["flop_ratio"], row["speedup"], q1, q3))
  return points


def draw(points, path: str, title: str) -> None:
  """Speed-up against FLOP ratio: the diagonal is the FLOP limit, the dashed line the
  targets' 90% of it; a point is img/s fused / plain, its bar the per-pair quartiles."""
  import matplotlib   # here, not at the top: a second of start-up that runs without --plot skip
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # (after the backend is chosen)
  fig, ax = plt.subplots(figsize=(7.5, 5.5))
  top = max(max(p[1] for p in points), max(p[4] for p in points)) * 1.08
  grid = [1.0, top]
  ax.plot(grid, grid, color="grey", lw=1, label="speed-up = FLOP ratio (the limit)")
  ax.plot(grid, [FLOP_RATIO_SHARE_TARGET * g for g in grid], color="grey", lw=1, ls="--",
          label=f"{FLOP_RATIO_SHARE_TARGET:.0%} of the FLOP ratio")
  colors = {}
  for label, ratio, speedup, q1, q3 in points:
    config, _, batch = label.partition(", ")
    first = config not in colors
    color = colors.setdefault(config, f"C{len(colors) % 10}")
    ax.vlines(ratio, q1, q3, lw=2, alpha=0.4, color=color)
    ax.plot([ratio], [speedup], "o", ms=5, color=color, label=config if first else None)
    ax.annotate(batch, (ratio, speedup), textcoords="offset points", xytext=(5, -3),
                fontsize=7, color=color)
  ax.set_xlim(1.0, top)
  ax.set_ylim(1.0, top)
  ax.set_xlabel("FLOP ratio (plain / fused, fvcore convention)")
  ax.set_ylabel("speed-up (img/s fused / plain)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  cli.begin_script(argv, FLAGS)   # the --json path too, before the first config is timed
  if FLAGS.plot_from:
    if not FLAGS.plot:
      raise app.UsageError("--plot_from needs --plot=PATH.png")
    points = []
    for path in FLAGS.plot_from:
      try:
        with open(path) as f:
          points += speedup_points(json.load(f))
      except (OSError, ValueError, KeyError) as e:
        raise app.UsageError(f"--plot_from={path}: not a --json file of this script ({e})")
    draw(points, FLAGS.plot, "forward speed-up against FLOP ratio (float32, CPU)")
    print(f"wrote {FLAGS.plot} ({len(points)} points)")
    return
  sizes = _batch_sizes()
  if sizes and FLAGS.steps_free:
    raise app.UsageError("--steps_free times one batch size (--batch_size), not a sweep "
                         "(--batch_sizes)")

  # Every config is checked before the first one is timed.
  configs = {os.path.basename(name).replace(".py", ""): _load_config(name)
             for name in FLAGS.configs}
  device = jax.devices()[0]
  if sizes:
    print(f"{benchmark.machine_summary(device)}; batches {sizes}, dtype {FLAGS.dtype}",
          flush=True)
    results = sweep(configs, sizes, device)
    if FLAGS.json:
      cli.write_json(FLAGS.json, {"batch_sizes": sizes, "dtype": FLAGS.dtype,
                                  "device": str(device), "device_kind": device.device_kind,
                                  "jax": jax.__version__, "results": results})
    if FLAGS.plot:
      draw(speedup_points({"results": results}), FLAGS.plot,
           f"forward speed-up against FLOP ratio ({FLAGS.dtype}, {device.device_kind})")
    return
  print(f"{benchmark.machine_summary(device)}; batch {FLAGS.batch_size}, dtype {FLAGS.dtype}",
        flush=True)
  results = {}
  for label, config in configs.items():
    config.model.dtype = FLAGS.dtype
    print(f"{label}: compiling and timing ...", flush=True)
    result = benchmark.compare(config, batch_size=FLAGS.batch_size, repeats=FLAGS.repeats,
                               settle=FLAGS.settle, profile=FLAGS.profile,
                               steps_free=FLAGS.steps_free)
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
    target = speedup_target(name, FLAGS.batch_size, res["flop_ratio"])
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
  if FLAGS.batch_size == 1:
    print(f"targets at float32, batch 1, 2 CPU threads: speed-up {BATCH1_TARGETS}, else "
          f"fused no slower than plain; fusion share <= {100 * FUSION_SHARE_TARGET:.0f}%")
  else:
    print(f"targets at float32, batch 32, 2 CPU threads: speed-up {TARGETS}, else "
          f"{FLOP_RATIO_SHARE_TARGET:.0%} of the FLOP ratio; fusion share <= "
          f"{100 * FUSION_SHARE_TARGET:.0f}%")
  if FLAGS.json:
    cli.write_json(FLAGS.json, {"batch_size": FLAGS.batch_size, "dtype": FLAGS.dtype,
                                "device": str(device), "device_kind": device.device_kind,
                                "jax": jax.__version__, "results": results})
  if FLAGS.plot:
    draw(speedup_points({"results": results, "batch_size": FLAGS.batch_size}), FLAGS.plot,
         f"forward speed-up against FLOP ratio (batch {FLAGS.batch_size}, {FLAGS.dtype}, "
         f"{device.device_kind})")


if __name__ == "__main__":
  app.run(main)
