r"""Evaluate a checkpoint at several r: accuracy, GFLOPs and throughput in one table.

  python eval.py --config=configs/deit_s.py --checkpoint=PATH \
      --config.eval.r_values='(0, 8, 16)'

PATH: a directory written by train.py (its latest checkpoint) or by
``python -m mctf_jax.convert``, or a PyTorch .pth/.npz/.safetensors (converted on the fly).
Every image of the split is scored (padded last batch, on every host). Writes the table as
JSON and CSV to --output_dir (or config.eval.output_dir; default: PATH/eval, or
./eval_results for a file), which is checked before the evaluation starts.
"""

import csv
import json
import os
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before jax and tensorflow load
from mctf_jax import parallel  # noqa: E402
from mctf_jax.errors import OutputError  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_s.py.",
                                lock_config=True)
flags.DEFINE_string("checkpoint", None, "train.py workdir, converted Orbax dir, or torch file.")
flags.DEFINE_string("output_dir", None, "Where to write results.json and results.csv.")
flags.DEFINE_bool("ema", False, "Evaluate the EMA weights of a train.py checkpoint.")
flags.DEFINE_string("split", None, "Split to evaluate (default: config.data.eval_split).")
flags.DEFINE_integer("throughput_batch", 64, "Batch size of the throughput measurement "
                     "(the official numbers use 256 on a GPU); 0 skips it.")
parallel.define_runtime_flags()
flags.mark_flags_as_required(["config", "checkpoint"])
FLAGS = flags.FLAGS

COLUMNS = ("r", "tokens_out", "gflops", "img_per_s", "top1", "top5", "images")


def _default_output_dir(checkpoint: str) -> str:
  if os.path.isdir(checkpoint):
    return os.path.join(checkpoint, "eval")
  return os.path.abspath("eval_results")


def _prepare_output_dir(path: str) -> None:
  """Creates `path` and checks that a file can be written in it, before the evaluation
  (which can take hours) rather than after it."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise OutputError(f"cannot write the results to {path} (--output_dir or "
                         f"config.eval.output_dir): {e.strerror or e}; give a writable "
                         f"--output_dir") from None


def format_table(rows) -> str:
  head = f"{'r':>6s} {'tokens':>7s} {'GFLOPs':>8s} {'img/s':>9s} {'top-1':>7s} {'top-5':>7s} " \
         f"{'images':>8s}"
  lines = [head, "-" * len(head)]
  for row in rows:
    ips = f"{row['img_per_s']:9.1f}" if row["img_per_s"] is not None else f"{'-':>9s}"
    lines.append(f"{row['r']!s:>6s} {row['tokens_out']:7d} {row['gflops']:8.3f} {ips} "
                 f"{row['top1']:7.2f} {row['top5']:7.2f} {row['images']:8d}")
  return "\n".join(lines)


def run(config, checkpoint: str, output_dir: str, *, ema: bool, split, throughput_batch: int,
        config_name: str | None = None):
  # here: a supervising parent (several processes) never loads Orbax, Optax or TensorFlow
  import jax
  import mctf_jax
  from mctf_jax import checkpoint as ckpt_lib, cost, data, parallel, processes
  from mctf_jax.fusion.config import normalize_r
  from mctf_jax.tools import benchmark
  from mctf_jax.training import evaluation, programs

  if isinstance(throughput_batch, bool) or not isinstance(throughput_batch, int) or \
      throughput_batch < 0:
    raise mctf_jax.ConfigError(f"--throughput_batch={throughput_batch!r}: expected an int >= 0 "
                               f"(0 skips the measurement)")
  if split:   # the split evaluated everywhere below, its size and existence checked first
    config = config.copy_and_resolve_references()
    config.data.eval_split = split
  mesh = parallel.create_mesh(config.mesh.fsdp)
  model = programs.model_for_mesh(config, mesh)
  evaluation.check_image_outputs(model, "eval.py")
  budget = model.fusion.budget_choice   # how a FLOP budget chose r, if one did
  r_values = tuple(config.eval.r_values) or ((model.fusion.r, 0) if model.fusion.r else (0,))
  r_values = tuple(normalize_r(r, "eval.r_values", model.fusion.method) for r in r_values)
  if not model.fusion.layers and any(r for r in r_values):
    raise mctf_jax.ConfigError(f"eval.r_values {list(r_values)} asks for fusion, but "
                               f"fusion.layers is empty; set --config.fusion.layers")
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  # The checkpoint first: a wrong path or config fails before the input pipeline starts.
  variables = ckpt_lib.load_variables(checkpoint, config, ema=ema)
  if jax.process_index() == 0:
    _prepare_output_dir(output_dir)
  info = data.dataset_info(config)
  if info.num_classes != config.model.num_classes:
    raise mctf_jax.ConfigError(f"dataset {info.name} has {info.num_classes} classes but "
                               f"model.num_classes={config.model.num_classes}")
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  if budget:
    say(budget)
  say(f"evaluating {checkpoint} on {info.name} ({config.data.eval_split}, "
      f"{info.num_eval} images) at r = {list(r_values)} on {mesh.devices.size} device(s)")

  variables_sh = parallel.tree_shardings(mesh, variables)
  variables = jax.device_put(variables, variables_sh)
  batches_per_host = -(-info.num_eval // config.eval_batch_size)

  rows = []
  for r in r_values:
    model_r = model.with_fusion(r=r)
    report = cost.model_flops(model_r)
    throughput = None
    if throughput_batch:
      local = jax.device_put(variables, jax.local_devices()[0])
      throughput = benchmark.benchmark_forward(model_r, local, throughput_batch,
                                               repeats=5)["img_per_s"]
    step = evaluation.compiled_eval_step(model_r, mesh, variables,
                                         programs.eval_batch(config, model_r, mesh))
    processes.wait_for_all(f"eval step compiled r={r}")
    t0 = time.time()
    acc = evaluation.accuracy(step, variables, data.eval_batches(
        config, config.eval_batch_size, jax.process_index(), jax.process_count()),
        mesh, progress=f"r={r}", total=batches_per_host)
    row = dict(r=r, tokens_out=model_r.schedule().tokens_out, gflops=report.gflops,
               img_per_s=throughput, **acc)
    rows.append(row)
    say(f"r={r}: top-1 {acc['top1']:.2f}  top-5 {acc['top5']:.2f}  {report.gflops:.3f} GFLOPs"
        f"  ({acc['images']} images, {time.time() - t0:.1f} s)")

  say("\n" + format_table(rows))
  if jax.process_index() == 0:
    device = jax.local_devices()[0]
    result = {"config": config_name, "checkpoint": checkpoint,
              "dataset": info.name, "split": config.data.eval_split,
              "device": f"{device.platform}:{device.device_kind}",
              "throughput_batch": throughput_batch or None, "ema": ema, "results": rows}
    with open(os.path.join(output_dir, "results.json"), "w") as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(output_dir, "results.csv"), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=COLUMNS)
      writer.writeheader()
      writer.writerows({k: row[k] for k in COLUMNS} for row in rows)
    say(f"wrote {output_dir}/results.json and results.csv")
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")

  def evaluate():
    output_dir = (FLAGS.output_dir or FLAGS.config.eval.output_dir
                  or _default_output_dir(FLAGS.checkpoint))
    run(FLAGS.config, FLAGS.checkpoint, output_dir, ema=FLAGS.ema, split=FLAGS.split,
        throughput_batch=FLAGS.throughput_batch,
        config_name=config_flags.get_config_filename(FLAGS["config"]))
  parallel.run_entry_point(FLAGS, evaluate)


if __name__ == "__main__":
  app.run(main)
