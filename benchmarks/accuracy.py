r"""Accuracy at equal FLOPs: MCTF against ToMe, PiToMe and no fusion, with and without training.

    python benchmarks/accuracy.py --workdir=workdirs/accuracy --json=workdirs/accuracy/acc.json \
        --plot=workdirs/accuracy/acc_vs_gflops.png

The paper's tables, on the cluttered digits (``configs/cluttered_digits.py``: 64x64 canvases,
256 patch tokens, most of them clutter):

1. a DeiT trained without fusion (``--base_epochs`` epochs; one model shared by every seed
   with ``--shared_base``, the default, else one per seed);
2. "no training": that model evaluated with ToMe (``fusion.method='tome'``), PiToMe
   (``'pitome'``: a keep ratio per block) and with MCTF at
   each FLOP level of ``--levels`` (fractions of the plain model's FLOPs; each method gets
   the r whose FLOPs, counted as fvcore counts the official code, come closest to the level
   from below: ``mctf_jax.cost.budget_choice``), and the MCTF ablations (no
   one-step-ahead attention, no size criterion, no informativeness criterion; a level a
   method cannot reach is skipped and listed);
3. "fine-tuned": the plain model fine-tuned ``--finetune_steps`` steps from its checkpoint
   with ToMe's and PiToMe's merging and with MCTF plus token reduction consistency (teacher r' below
   r/2) at each level, the same steps for the plain model (the reference), and the
   ablations (no one-step-ahead, no size, no informativeness, no consistency loss) at
   ``--ablation_level``;
   once per seed of ``--seeds``.

Prints top-1 (mean +- standard deviation over the seeds) per method and level, draws
top-1 against GFLOPs (--plot, PNG) and writes every figure (--json). Results are kept in
WORKDIR/results.json and training runs in WORKDIR/<run>: rerunning the same command resumes
where it stopped. A benchmark, not a test: about 35 minutes on 2 busy CPU cores at the
defaults (docs/accuracy.md); tests/test_accuracy_benchmark.py runs it shrunk.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import mctf_jax  # noqa: E402
from mctf_jax import checkpoint, cost, data, parallel, recipes  # noqa: E402
from mctf_jax.errors import ConfigError  # noqa: E402
from mctf_jax.training import evaluation, trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "cluttered_digits.py"),
    "The plain model's config (no fusion; fusion.layers are the blocks that fuse).")
flags.DEFINE_string("workdir", "workdirs/accuracy", "Training runs and cached results.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds of the fine-tuning runs (and of the base models "
                  "without --shared_base).")
flags.DEFINE_bool("shared_base", True, "One plain model (seed = the first seed) for every "
                  "seed; else a plain model per seed.")
flags.DEFINE_integer("base_epochs", None, "Epochs of the plain model (default: the config's).")
flags.DEFINE_integer("base_steps_per_epoch", None, "Cut the plain model's epochs to this many "
                     "steps (smoke tests; default: the whole train split).")
flags.DEFINE_list("levels", ["0.65", "0.5", "0.4"], "FLOP levels: fractions of the plain "
                  "model's FLOPs (0.5 = 50% fewer FLOPs).")
flags.DEFINE_list("train_levels", ["0.65", "0.5", "0.4"], "The levels at which ToMe and MCTF "
                  "are fine-tuned (a subset of --levels).")
flags.DEFINE_float("ablation_level", 0.5, "The level at which the ablations are fine-tuned.")
flags.DEFINE_integer("finetune_steps", 32, "Steps of each fine-tuning run.")
flags.DEFINE_integer("finetune_epochs", 4, "Scheduler epochs the fine-tuning steps are cut "
                     "into (the cosine decays over them; the first two run at the peak).")
flags.DEFINE_float("finetune_lr", 4e-3, "Fine-tuning base_lr (per 512 images).")
flags.DEFINE_string("json", None, "Write the figures as JSON to this path.")
flags.DEFINE_string("plot", None, "Draw top-1 against GFLOPs to this PNG.")

# name: (label, fusion changes on MCTF's recipe, or None for ToMe / no fusion)
METHODS = {
    "plain": "no fusion",
    "tome": "ToMe",
    "pitome": "PiToMe",
    "mctf": "MCTF",
    "mctf_no_osa": "MCTF w/o one-step-ahead",
    "mctf_no_size": "MCTF w/o size criterion",
    "mctf_no_info": "MCTF w/o informativeness",
    "mctf_no_consistency": "MCTF w/o consistency loss",
}
ABLATIONS = ("mctf_no_osa", "mctf_no_size", "mctf_no_info", "mctf_no_consistency")


def _log(message: str) -> None:
  print(message, flush=True)


# ----------------------------------------------------------------------------- configs


def fusion_section(method: str, layers, r=0, target_fraction: float = 0.0):
  """The config.fusion of `method` at r (or at a FLOP budget, with r of the count kind)."""
  layers = tuple(layers)
  if method == "plain":
    return recipes.mctf_fusion(r=0.0, layers=layers, teacher_r_max=0.0)
  if method == "tome":
    fusion = recipes.tome_fusion(r=float(r), layers=layers)
  elif method == "pitome":   # r: the keep ratio (0 before a budget chooses it)
    fusion = recipes.pitome_fusion(keep_ratio=float(r), layers=layers)
  else:
    changes = {"mctf_no_osa": dict(one_step_ahead="off"), "mctf_no_size": dict(tau_size=0.0),
               "mctf_no_info": dict(tau_info=0.0)}
    fusion = recipes.mctf_fusion(r=float(r), layers=layers, **changes.get(method, {}))
    # Token reduction consistency: the teacher's r' ~ U{0, ..., r/2 - 1} (the recipe's
    # 8 for r = 16); none for the ablation without the consistency loss.
    fusion.teacher_r_max = 0.0 if method == "mctf_no_consistency" else float(
        max(1, round(r / 2)))
  fusion.target_fraction = float(target_fraction)
  return fusion


def method_config(base, method: str, level: float | None):
  """`base` with `method`'s fusion at the r whose FLOPs meet `level` (level None: no
  fusion); None when no r of the method comes down to the level."""
  config = base.copy_and_resolve_references()
  layers = base.fusion.layers
  if method == "plain" or level is None:
    config.fusion = fusion_section("plain", layers)
    return config
  config.fusion = fusion_section(method, layers, r=0, target_fraction=level)
  try:
    choice = cost.budget_choice(config)
  except ConfigError:
    return None    # the level is out of the method's reach (e.g. fusing after the MLP)
  config.fusion = fusion_section(method, layers, r=choice.r)
  return config


def gflops(config) -> float:
  return cost.count_flops(config).gflops


# ----------------------------------------------------------------------------- runs


class Results:
  """Accuracies by key, kept in WORKDIR/results.json so that a rerun skips them."""

  def __init__(self, path: str):
    self.path = path
    self.data = {}
    if os.path.exists(path):
      with open(path) as f:
        self.data = json.load(f)

  def get(self, key: str, compute):
    if key not in self.data:
      self.data[key] = compute()
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(self.data, f, indent=1, sort_keys=True)
      os.replace(tmp, self.path)
    return self.data[key]


def train(config, workdir: str, steps_per_epoch: int | None = None) -> None:
  """trainer.train_and_evaluate, with epochs of `steps_per_epoch` steps of the train
  pipeline when given (None: the whole split). Resumes or skips a run already there."""
  if steps_per_epoch is None:
    trainer.train_and_evaluate(config, workdir)
    return
  pipeline = data.TrainPipeline(config, config.batch_size, config.seed, jax.process_index(),
                                jax.process_count(),
                                label_smoothing=config.loss.label_smoothing)
  trainer.train_and_evaluate(
      config, workdir, batches=pipeline.iterate, steps_per_epoch=steps_per_epoch,
      eval_batches_fn=lambda: data.eval_batches(config, config.eval_batch_size,
                                                jax.process_index(), jax.process_count()))


def top1(config, variables) -> float:
  """Top-1 (%) of `variables` under `config`'s model on its evaluation split."""
  mesh = parallel.create_mesh(config.mesh.fsdp)
  shardings = parallel.tree_shardings(mesh, variables)
  variables = jax.device_put(variables, shardings)
  step = evaluation.compile_eval_step(mctf_jax.create_model(config), mesh, shardings)
  result = evaluation.accuracy(step, variables, data.eval_batches(
      config, config.eval_batch_size, jax.process_index(), jax.process_count()), mesh)
  return result["top1"]


def load(workdir: str, config):
  return checkpoint.load_variables(workdir, config)


def _levels(values, name: str) -> list[float]:
  try:
    levels = [float(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)}: expected fractions such as 0.5")
  bad = [v for v in levels if not 0 < v < 1]
  if bad:
    raise app.UsageError(f"--{name}: fractions of the plain model's FLOPs in (0, 1), got {bad}")
  return levels


def run_benchmark(base, workdir: str, seeds: list[int], levels: list[float],
                  train_levels: list[float], ablation_level: float) -> dict:
  """Trains, fine-tunes and evaluates; returns the figures (see module docstring)."""
  os.makedirs(workdir, exist_ok=True)
  results = Results(os.path.join(workdir, "results.json"))
  timings = {}
  base_seeds = seeds[:1] if FLAGS.shared_base else seeds

  # 1. The plain model(s).
  t0 = time.time()
  base_dirs = {}
  for seed in base_seeds:
    config = method_config(base, "plain", None)
    config.seed = seed
    if FLAGS.base_epochs is not None:
      config.num_epochs = FLAGS.base_epochs
    base_dirs[seed] = os.path.join(workdir, f"base_seed{seed}")
    _log(f"== plain model, seed {seed}: {base_dirs[seed]}")
    train(config, base_dirs[seed], FLAGS.base_steps_per_epoch)
  timings["base_training_s"] = time.time() - t0

  # 2. No training: each base model at every level.
  t0 = time.time()
  rows = {}   # (setting, method, level) -> {r, gflops, top1: [...]}

  def record(setting, method, level, config, value):
    row = rows.setdefault((setting, method, level), dict(
        setting=setting, method=method, label=METHODS[method], level=level,
        r=config.fusion.r, gflops=gflops(config), top1=[]))
    row["top1"].append(value)

  plain_gflops = gflops(method_config(base, "plain", None))
  unreachable = set()
  for seed, base_dir in base_dirs.items():
    variables = None
    for method in ("plain", "tome", "pitome", "mctf", "mctf_no_osa", "mctf_no_size",
                   "mctf_no_info"):
      for level in ([None] if method == "plain" else levels):
        config = method_config(base, method, level)
        if config is None:
          _log(f"no training: {METHODS[method]} cannot come down to {level:.0%} of the FLOPs")
          unreachable.add((method, level))
          continue
        key = f"notrain/base_seed{seed}/{method}/{level}"

        def evaluate(config=config):
          nonlocal variables
          variables = variables if variables is not None else load(base_dir, config)
          return top1(config, variables)
        value = results.get(key, evaluate)
        _log(f"no training, base seed {seed}: {METHODS[method]:26s} level {level} "
             f"r={config.fusion.r} {gflops(config):.4f} GFLOPs: top-1 {value:.2f}")
        record("no training", method, level, config, value)
  timings["no_training_eval_s"] = time.time() - t0

  # 3. Fine-tuning from the plain model, per seed.
  t0 = time.time()
  runs = [("plain", None)] + [(m, l) for l in train_levels
                              for m in ("tome", "pitome", "mctf")] + [
      (m, ablation_level) for m in ABLATIONS]
  for seed in seeds:
    base_dir = base_dirs[base_seeds[0] if FLAGS.shared_base else seed]
    for method, level in runs:
      config = method_config(base, method, level)
      if config is None:
        _log(f"fine-tuning: {METHODS[method]} cannot come down to {level:.0%} of the FLOPs")
        unreachable.add((method, level))
        continue
      config.seed = seed
      config.init.checkpoint = base_dir
      config.num_epochs = FLAGS.finetune_epochs
      config.warmup_epochs = 0
      config.cooldown_epochs = 0
      config.base_lr = FLAGS.finetune_lr
      config.eval_every_epochs = 10 ** 6     # evaluated below, once
      config.checkpoint_every_steps = 10 ** 6  # the last step only
      config.log_every_steps = max(1, FLAGS.finetune_steps // 4)
      name = f"ft_{method}_{level}_seed{seed}"
      run_dir = os.path.join(workdir, name)

      def finetune(config=config, run_dir=run_dir):
        _log(f"== fine-tuning {name}: r={config.fusion.r} "
             f"teacher_r_max={config.fusion.teacher_r_max}")
        t = time.time()
        train(config, run_dir, max(1, FLAGS.finetune_steps // FLAGS.finetune_epochs))
        value = top1(config, load(run_dir, config))
        return {"top1": value, "seconds": time.time() - t}
      value = results.get(f"finetune/{name}", finetune)["top1"]
      _log(f"fine-tuned, seed {seed}: {METHODS[method]:26s} level {level} r={config.fusion.r} "
           f"{gflops(config):.4f} GFLOPs: top-1 {value:.2f}")
      record("fine-tuned", method, level, config, value)
  timings["finetuning_s"] = time.time() - t0

  out = []
  for row in rows.values():
    values = row["top1"]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) \
        if len(values) > 1 else 0.0
    out.append(dict(row, mean=mean, std=std, n=len(values),
                    flop_fraction=row["gflops"] / plain_gflops))
  return {"rows": out, "plain_gflops": plain_gflops, "timings": timings,
          "unreachable": sorted([m, l] for m, l in unreachable)}


# ----------------------------------------------------------------------------- report


def format_table(rows: list[dict]) -> str:
  """One line per method and level: r, GFLOPs and top-1 (mean +- std over the runs) without
  training and fine-tuned."""
  by_key = {}
  for row in rows:
    by_key.setdefault((row["level"] if row["level"] is not None else 1.0, row["method"]),
                      {})[row["setting"]] = row
  order = list(METHODS)
  lines = [f"{'FLOPs':>6s}  {'method':26s} {'r (no tr./ft.)':>14s} {'GFLOPs':>8s}  "
           f"{'top-1 no training':>18s}  {'top-1 fine-tuned':>18s}"]
  lines.append("-" * len(lines[0]))
  for level, method in sorted(by_key, key=lambda k: (-k[0], order.index(k[1]))):
    cells = by_key[(level, method)]
    any_row = next(iter(cells.values()))
    r = any_row["r"]

    def fmt(setting):
      row = cells.get(setting)
      if row is None:
        return "-"
      return f"{row['mean']:.2f} +- {row['std']:.2f} ({row['n']})"
    lines.append(f"{any_row['flop_fraction']:6.1%}  {METHODS[method]:26s} {str(r):>14s} "
                 f"{any_row['gflops']:8.4f}  {fmt('no training'):>18s}  "
                 f"{fmt('fine-tuned'):>18s}")
  return "\n".join(lines)


def plot(rows: list[dict], out: str, title: str) -> None:
  """Top-1 against GFLOPs, a panel per setting, a line per method (error bars: std)."""
  import matplotlib   # here, not at the top: a second of start-up that runs without --plot skip
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # (after the backend is chosen)

  settings = ("no training", "fine-tuned")
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110, sharey=True)
  styles = {"tome": ("tab:blue", "s-"), "pitome": ("tab:cyan", "P-"), "mctf": ("tab:red", "o-"),
            "mctf_no_osa": ("tab:orange", "^--"), "mctf_no_size": ("tab:green", "v--"),
            "mctf_no_info": ("tab:brown", "<--"),
            "mctf_no_consistency": ("tab:purple", "D--")}
  for ax, setting in zip(axes, settings):
    chosen = [row for row in rows if row["setting"] == setting]
    for row in chosen:
      if row["method"] == "plain":
        ax.errorbar([row["gflops"]], [row["mean"]], yerr=[row["std"]], fmt="k*", ms=12,
                    label="no fusion", capsize=3)
    for method, (color, fmt) in styles.items():
      points = sorted((row for row in chosen if row["method"] == method),
                      key=lambda row: row["gflops"])
      if points:
        ax.errorbar([p["gflops"] for p in points], [p["mean"] for p in points],
                    yerr=[p["std"] for p in points], fmt=fmt, color=color, capsize=3,
                    label=METHODS[method])
    ax.set_title(setting)
    ax.set_xlabel("GFLOPs per image (fvcore convention)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
  axes[0].set_ylabel("top-1 (%)")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise app.UsageError(f"--seeds={','.join(FLAGS.seeds)}: expected integers")
  if not seeds:
    raise app.UsageError("--seeds: give at least one seed")
  levels = _levels(FLAGS.levels, "levels")
  train_levels = _levels(FLAGS.train_levels, "train_levels") if FLAGS.train_levels else []
  ablation_level = FLAGS.ablation_level
  missing = [l for l in train_levels + [ablation_level] if l not in levels]
  if missing:
    raise app.UsageError(f"--train_levels / --ablation_level {missing} must be among --levels")
  base = FLAGS.config
  t0 = time.time()
  figures = run_benchmark(base, os.path.abspath(FLAGS.workdir), seeds, levels, train_levels,
                          ablation_level)
  figures["timings"]["total_s"] = time.time() - t0
  device = jax.devices()[0]
  figures.update(
      machine=dict(platform=platform.platform(), processor=platform.processor(),
                   cpu_count=os.cpu_count(), device=f"{device.platform}:{device.device_kind}"),
      flags=dict(seeds=seeds, shared_base=FLAGS.shared_base, base_epochs=FLAGS.base_epochs,
                 base_steps_per_epoch=FLAGS.base_steps_per_epoch, levels=levels,
                 train_levels=train_levels, ablation_level=ablation_level,
                 finetune_steps=FLAGS.finetune_steps, finetune_epochs=FLAGS.finetune_epochs,
                 finetune_lr=FLAGS.finetune_lr),
      config=json.loads(base.to_json_best_effort()))
  table = format_table(figures["rows"])
  print("\n" + table)
  for method, level in figures["unreachable"]:
    print(f"{METHODS[method]}: no r comes down to {level:.0%} of the FLOPs")
  print(f"\n{len(seeds)} seed(s) {seeds}; plain model {figures['plain_gflops']:.4f} GFLOPs; "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in figures["timings"].items()))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(figures, f, indent=1)
  if FLAGS.plot:
    plot(figures["rows"], FLAGS.plot,
         f"{base.data.dataset}: top-1 against FLOPs ({len(seeds)} seed(s), "
         f"{FLAGS.finetune_steps} fine-tuning steps)")
    print(f"plot: {FLAGS.plot}")


if __name__ == "__main__":
  app.run(main)
