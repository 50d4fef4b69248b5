r"""Forward-pass throughput of a config with and without token fusion.

    python -m mctf_jax.tools.benchmark --config=configs/deit_s.py --batch_size=256
    python -m mctf_jax.tools.benchmark --config=configs/deit_s.py --batch_size=256 \
        --dtype=bfloat16 \
        --r=8 --json=/tmp/bench.json

Runs on the first device of ``jax.devices()`` (CPU, GPU or TPU). Weights are random unless
``--checkpoint`` is given (speed does not depend on their values). For the config at its r
(or ``--r``) and for the same model without fusion (r=0), it measures:

* img/s: the jitted forward pass (logits) on a device-resident batch, after compilation and
  warm-up calls; each timed repetition runs the call enough times to last at least
  ``--min_repeat_s`` and waits with ``block_until_ready``; the median repetition is reported
  (with the fastest and slowest). The two models' repetitions alternate, so that other load
  on the machine slows both alike and their ratio stays fair, and each starts with
  ``--settle`` untimed calls, so that the steady state is measured, not the switch;
* compile time: tracing + lowering, and XLA compilation (``.lower()``, ``.compile()``);
* memory: XLA's static estimate from ``compiled.memory_analysis()`` (arguments + outputs +
  temporaries - aliased), and on GPU/TPU also ``device.memory_stats()['peak_bytes_in_use']``
  after each model's warm-up. That is the process's running peak: the fused model is warmed
  up first, so the baseline's figure is its own unless the fused model needed more;

and prints both with the speed-up and the FLOP ratio (fvcore convention, ``mctf_jax.tools.flops``).
Compared with the official ``benchmark()`` (utils/utils.py: 200 runs of batch 256 in fp16
autocast on a GPU, first quarter thrown away, mean), this reports the median and keeps the
input on the device.

The measuring loop is a library function, ``benchmark_forward(model, variables, batch_size)``
(one model), built from ``prepare_forward`` and ``time_calls`` (any set of calls).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

import mctf_jax
from mctf_jax import checkpoint, cost, parallel
from mctf_jax.errors import ConfigError, MctfError
from mctf_jax.fusion.config import normalize_r
from mctf_jax.fusion.merge import attend
from mctf_jax.models.base import DTYPE_NAMES
from mctf_jax.tools import profiling
from mctf_jax.tools.cli import check_output_file, fail, write_json

MIB = 2 ** 20


def memory_figures(compiled, device) -> dict[str, int]:
  """Memory of a compiled executable: XLA's static analysis, and the device's running peak."""
  out: dict[str, int] = {}
  try:
    stats = compiled.memory_analysis()
  except Exception:  # some backends implement none
    stats = None
  if stats is not None:
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "alias_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes"):
      value = getattr(stats, name, None)
      if value is not None:
        out[name.replace("_in_bytes", "_bytes")] = int(value)
    out["estimated_peak_bytes"] = (
        out.get("argument_size_bytes", 0) + out.get("output_size_bytes", 0)
        + out.get("temp_size_bytes", 0) - out.get("alias_size_bytes", 0))
  try:
    device_stats = device.memory_stats()
  except Exception:
    device_stats = None
  if device_stats and "peak_bytes_in_use" in device_stats:
    out["device_peak_bytes_in_use"] = int(device_stats["peak_bytes_in_use"])
  return out


def time_calls(calls: Mapping[str, Callable[[], Any]], *, repeats: int = 10,
               seconds_per_call: Mapping[str, float] | None = None,
               min_repeat_s: float = 0.1, settle: int = 1) -> dict[str, tuple[list[float], int]]:
  """Seconds per call of each of `calls` (functions returning arrays, already warm).

  Each repetition makes `settle` untimed calls, then runs the call n times back to back (n
  from ``seconds_per_call``, an estimate, so that a repetition lasts about `min_repeat_s`;
  1 without an estimate) and blocks until the last result is ready. The calls'
  repetitions are interleaved (a, b, a, b, ...) so that other load on the machine slows
  them alike. The settling calls keep the switch itself out of the figures: on CPU the
  first call after another program's can run slower (its buffers are mapped and its
  weights brought into the caches afresh), and the figure wanted is the steady state of a
  program called again and again. Returns, per call, (seconds per call for each
  repetition, n).
  """
  if repeats < 1 or min_repeat_s < 0 or settle < 0:
    raise ValueError(f"need repeats >= 1, min_repeat_s >= 0 and settle >= 0; got "
                     f"repeats={repeats}, min_repeat_s={min_repeat_s}, settle={settle}")
  seconds_per_call = seconds_per_call or {}
  inner = {name: max(1, math.ceil(min_repeat_s / max(seconds_per_call.get(name, math.inf),
                                                      1e-9)))
           for name in calls}
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      for _ in range(settle):
        jax.block_until_ready(call())
      start = time.perf_counter()
      for _ in range(inner[name]):
        out = call()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / inner[name])
  return {name: (times[name], inner[name]) for name in calls}


def prepare_forward(model, variables, images, *, warmup: int = 2,
                    forward: Callable | None = None):
  """Compiles the forward pass of `model` for `images` and runs it `warmup` times (>= 1).
  forward(variables, images): another function of the model's variables to compile
  instead of ``model.apply`` (e.g. ``steps_free_forward(model)``).

  variables ({'params': ...}) and images must already be on the device. Returns (call,
  info): call() runs the compiled forward pass once (a ``functools.partial`` of the
  ``jax.stages.Compiled``, which is ``call.func``); info has trace_s (tracing + lowering),
  compile_s (XLA),
  warm_call_s (the last warm-up call), memory (``memory_figures`` after the warm-up) and
  the device, its platform and kind, batch_size, dtype.
  """
  if warmup < 0:
    raise ValueError(f"warmup must be >= 0, got {warmup}")
  device = next(iter(images.devices()))
  forward = jax.jit(forward or (lambda v, x: model.apply(v, x)))
  start = time.perf_counter()
  lowered = forward.lower(variables, images)
  traced = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  call = functools.partial(compiled, variables, images)
  warm = 0.0
  for _ in range(max(warmup, 1)):
    t = time.perf_counter()
    jax.block_until_ready(call())
    warm = time.perf_counter() - t
  return call, {
      "batch_size": int(images.shape[0]),
      "trace_s": traced - start,
      "compile_s": compiled_at - traced,
      "warm_call_s": warm,
      "memory": memory_figures(compiled, device),
      "device": str(device),
      "platform": device.platform,
      "device_kind": device.device_kind,
      "dtype": model.config.dtype,
  }


def steps_free_forward(model, slice_probs: bool = False) -> Callable:
  """The forward pass of `model` with the fusion steps' own work taken out: each block runs
  at the token counts of the model's schedule, as its fused forward does, but a block that
  fuses keeps its first tokens_out tokens instead of scoring, matching and merging them.
  The attention of such a block still takes its probabilities at the input width and
  multiplies them by values of that width (the values of the kept tokens, padded), as the
  one-step-ahead attention does; there is no proportional attention. Its logits mean
  nothing; its time is what the fused forward would take if the fusion steps cost nothing,
  so fused / plain speed-up against this one's / plain is what those steps cost.

  slice_probs: instead of padding the values, take the probabilities' rows and columns of
  the kept tokens (the softmax still runs over every input token): no padded copy of the
  values, and the product shrinks to the kept tokens. The leaner of the two forms on a TPU,
  as compiled (``benchmarks/tpu_limit.py``), so the stricter limit there.

  Only for MCTF's one-step-ahead mode ('approx'). Returns forward(variables, images).
  """
  fusion = model.fusion
  if fusion.method != "mctf" or fusion.one_step_ahead != "approx":
    raise ValueError(f"steps_free_forward follows MCTF's one-step-ahead attention "
                     f"(fusion.method='mctf', one_step_ahead='approx'); this model has "
                     f"method={fusion.method!r}, one_step_ahead={fusion.one_step_ahead!r}")
  plans = model.schedule().layers

  def body(m, images):
    x = m.embed(images)
    for block, plan in zip(m.blocks, plans):
      h = block.norm1(x)
      probs = block.attention_probs(h, None)
      if plan.fuses:
        x = x[:, :plan.tokens_out]
        v = block.attention_values(block.norm1(x))
        if slice_probs:
          out = attend(probs[:, :, :plan.tokens_out, :plan.tokens_out], v)
        else:
          v = jnp.pad(v, ((0, 0), (0, 0), (0, plan.r), (0, 0)))
          out = attend(probs, v)[:, :plan.tokens_out]
      else:
        out = attend(probs, block.attention_values(h))
      x = block.residual(x, block.attention_output(out, True), 0)
      x = block.residual(x, block.mlp(block.norm2(x), True), 1)
    x = m.finish(x)
    return m.classify(x, jnp.ones(x.shape[:2], jnp.float32))   # no token holds more than one

  return lambda variables, images: model.apply(variables, images, method=body)


def random_images(model, batch_size: int, seed: int = 0, device=None):
  """Random normal images for `model`, float32 NHWC, on `device` (default: the first)."""
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  device = jax.devices()[0] if device is None else device
  images = jax.random.normal(jax.random.key(seed),
                             (batch_size,) + tuple(model.config.image_shape), jnp.float32)
  return jax.device_put(images, device)


def _figures(info: dict, timing: tuple[list[float], int], repeats: int) -> dict:
  times, inner = timing
  median = statistics.median(times)
  return dict(info, img_per_s=info["batch_size"] / median, median_s=median,
              min_s=min(times), max_s=max(times), times_s=times, repeats=repeats,
              iters_per_repeat=inner)


def benchmark_forward(model, variables, batch_size: int, *, repeats: int = 10, warmup: int = 2,
                      min_repeat_s: float = 0.1, settle: int = 1, seed: int = 0,
                      device=None) -> dict:
  """Inference throughput of ``model.apply(variables, images)`` on one device.

  Random normal images (batch_size, img_size, img_size, in_chans), float32, on the device
  (default: the first of ``jax.devices()``). Returns a dict: img_per_s (from the median
  repetition), median_s / min_s / max_s / times_s (seconds per batch), repeats,
  iters_per_repeat, trace_s, compile_s, memory (see ``memory_figures``), batch_size,
  device, platform, device_kind, dtype.
  """
  images = random_images(model, batch_size, seed, device)
  variables = jax.device_put(variables, next(iter(images.devices())))
  call, info = prepare_forward(model, variables, images, warmup=warmup)
  timing = time_calls({"model": call}, repeats=repeats, min_repeat_s=min_repeat_s,
                      settle=settle, seconds_per_call={"model": info["warm_call_s"]})["model"]
  return _figures(info, timing, repeats)


def random_variables(model, seed: int = 0) -> dict:
  """Freshly initialised variables ({'params': ..., and the model's state collections};
  jitted init, on the default device).

  Initialised through the model without fusion (the same parameters; init runs a forward
  pass, which compiles much quicker without fusion), with the 'rbg' generator, whose
  compilation is 2-3x quicker than threefry's on CPU.
  """
  key = jax.random.key(seed, impl="rbg")
  return jax.jit(model.with_fusion(r=0).init)(key, model.dummy_images())


def compare(config, variables=None, *, batch_size: int, r=None, repeats: int = 10,
            warmup: int = 2, min_repeat_s: float = 0.1, settle: int = 1, seed: int = 0,
            device=None, profile: bool = False, steps_free: bool = False) -> dict:
  """Throughput of `config` at its r (or `r`) and of the same model at r=0, with FLOPs.

  Both run on the same weights (random when variables is None) and images; both are compiled
  and warmed up first (the fused one first), then their timed repetitions alternate, each
  after `settle` untimed calls (see ``time_calls``).
  Returns {'fused': ..., 'plain': ..., 'speedup': img/s fused / plain, 'speedup_pairs': the
  sorted ratios of each fused repetition's time to the plain one after it,
  'speedup_quartiles': their quartiles, 'flop_ratio': plain / fused FLOPs}; each entry is a
  ``benchmark_forward`` dict plus r, tokens_in, tokens_out and gflops (fvcore convention).
  With no fusion in the config, 'fused' is None. With `profile`, the fused entry also has
  'profile': ``mctf_jax.tools.profiling.profile_call`` of the same compiled forward pass
  (kernel time by part of the model), or 'profile_error' where the trace could not be
  attributed. With `steps_free` (and fusion), a third forward pass is timed alongside,
  ``steps_free_forward``: result['steps_free'] (img/s and the like), 'speedup_steps_free'
  (its img/s / plain) and 'steps_share' (the fraction of the fused forward's median time
  that the fusion steps take: 1 - steps-free time / fused time).
  """

  model = mctf_jax.create_model(config)
  if r is not None:
    model = model.with_fusion(r=r)
  if variables is None:
    variables = random_variables(model, seed)
  images = random_images(model, batch_size, seed, device)
  variables = jax.device_put(variables, next(iter(images.devices())))
  models = {"plain": model.with_fusion(r=0)}
  if model.schedule().fuses:
    models = {"fused": model, **models}
  prepared = {name: prepare_forward(mdl, variables, images, warmup=warmup)
              for name, mdl in models.items()}
  if steps_free and "fused" in models:
    prepared["steps_free"] = prepare_forward(model, variables, images, warmup=warmup,
                                             forward=steps_free_forward(model))
  timings = time_calls({name: call for name, (call, _) in prepared.items()}, repeats=repeats,
                       min_repeat_s=min_repeat_s, settle=settle,
                       seconds_per_call={n: info["warm_call_s"] for n, (_, info) in
                                         prepared.items()})
  result = {"fused": None, "plain": None, "speedup": None, "flop_ratio": None}
  for name, mdl in models.items():
    report = cost.model_flops(mdl)
    s = report.schedule
    result[name] = dict(_figures(prepared[name][1], timings[name], repeats), r=s.r,
                        tokens_in=s.tokens_in, tokens_out=s.tokens_out, gflops=report.gflops)
  if result["fused"] is not None:
    result["speedup"] = result["fused"]["img_per_s"] / result["plain"]["img_per_s"]
    # Each fused repetition against the plain one right after it: drifts in the machine's
    # speed (other tenants, clocks) cancel within a pair.
    pairs = sorted(p / f for f, p in zip(result["fused"]["times_s"], result["plain"]["times_s"]))
    result["speedup_pairs"] = pairs
    result["speedup_quartiles"] = tuple(statistics.quantiles(pairs, n=4, method="inclusive")
                                        if len(pairs) > 1 else pairs * 3)
    result["flop_ratio"] = result["plain"]["gflops"] / result["fused"]["gflops"]
    if "steps_free" in prepared:
      free = _figures(prepared["steps_free"][1], timings["steps_free"], repeats)
      result["steps_free"] = free
      result["speedup_steps_free"] = free["img_per_s"] / result["plain"]["img_per_s"]
      result["steps_share"] = 1 - free["median_s"] / result["fused"]["median_s"]
    if profile:
      call = prepared["fused"][0]
      try:
        result["fused"]["profile"] = profiling.profile_call(call.func, call)
      except RuntimeError as e:  # a trace this backend writes differently: keep the timings
        result["fused"]["profile_error"] = str(e)
  return result


def format_result(result: dict) -> str:
  """The table that the command line prints."""
  rows = [("MCTF r=" + repr(result["fused"]["r"]), result["fused"])] if result["fused"] else []
  rows.append(("no fusion (r=0)", result["plain"]))
  first = rows[0][1]
  lines = [f"device {first['device']} ({first['device_kind']}), dtype {first['dtype']}, "
           f"batch {first['batch_size']}, median of {first['repeats']} repetitions"]
  has_device_peak = any("device_peak_bytes_in_use" in row["memory"] for _, row in rows)
  head = (f"{'model':<16s} {'tokens':>8s} {'GFLOPs':>7s} {'img/s':>9s} {'ms/batch':>9s} "
          f"{'(min-max)':>15s} "
          f"{'trace s':>7s} {'compile s':>9s} {'XLA mem MiB':>11s}")
  if has_device_peak:
    head += f" {'peak MiB':>9s}"
  lines += [head, "-" * len(head)]
  for name, row in rows:
    tokens = (f"{row['tokens_in']}->{row['tokens_out']}" if row["tokens_in"] != row["tokens_out"]
              else str(row["tokens_in"]))
    mem = row["memory"].get("estimated_peak_bytes")
    spread = f"({row['min_s'] * 1e3:.1f}-{row['max_s'] * 1e3:.1f})"
    line = (f"{name:<16s} {tokens:>8s} {row['gflops']:7.3f} {row['img_per_s']:9.1f} "
            f"{row['median_s'] * 1e3:9.1f} "
            f"{spread:>15s} {row['trace_s']:7.2f} {row['compile_s']:9.2f} "
            f"{(mem / MIB if mem is not None else float('nan')):11.1f}")
    if has_device_peak:
      peak = row["memory"].get("device_peak_bytes_in_use")
      line += f" {(peak / MIB if peak is not None else float('nan')):9.1f}"
    lines.append(line)
  if result["speedup"] is not None:
    q1, q2, q3 = result["speedup_quartiles"]
    lines.append(f"speed-up {result['speedup']:.2f}x (img/s fused / plain; per pair of "
                 f"repetitions: median {q2:.2f}x, quartiles {q1:.2f}-{q3:.2f}x); FLOP ratio "
                 f"{result['flop_ratio']:.2f}x (plain / fused, fvcore convention)")
  if result.get("steps_free") is not None:
    free = result["steps_free"]
    lines.append(f"without the fusion steps' own work (the blocks at the fused token counts): "
                 f"{free['img_per_s']:.1f} img/s, speed-up {result['speedup_steps_free']:.2f}x; "
                 f"the fusion steps take {100 * result['steps_share']:.0f}% of the fused "
                 f"forward's time")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def machine_summary(device) -> str:
  """One line naming the device, the host's CPUs and the jax version, for benchmark output."""
  return (f"device {device} ({device.device_kind}), {os.cpu_count()} CPUs "
          f"({len(os.sched_getaffinity(0))} usable), jax {jax.__version__}")


def main(argv=None):

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_s.py; "
                                  "fields may be overridden: --config.fusion.r=8.")
  flags.DEFINE_integer("batch_size", 32, "Images per forward call.")
  flags.DEFINE_string("r", None, "Benchmark at this r (a count, or a ratio < 1) instead of "
                      "config.fusion.r.")
  flags.DEFINE_enum("dtype", None, DTYPE_NAMES, "Compute dtype (model.dtype); parameters stay in "
                    "model.param_dtype. Default: the config's.")
  flags.DEFINE_string("checkpoint", None, "Optional weights (converted Orbax dir, train.py "
                      "workdir or .pth/.npz/.safetensors); random weights otherwise.")
  flags.DEFINE_integer("repeats", 10, "Timed repetitions (the median is reported).")
  flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
  flags.DEFINE_float("min_repeat_s", 0.1, "Each repetition repeats the call to last at "
                     "least this long (0: one call).")
  flags.DEFINE_integer("settle", 1, "Untimed calls before each timed repetition (the "
                       "first call after the other model's is slower on CPU).")
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and images.")
  flags.DEFINE_string("json", None, "Write the figures as JSON to this path.")
  flags.mark_flags_as_required(["config"])

  def run(argv_):
    parallel.quiet_library_logs(FLAGS)
    if len(argv_) > 1:
      fail(f"unexpected arguments {argv_[1:]}; all options are --flags")
    config = FLAGS.config
    if FLAGS.batch_size < 1:
      fail(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    if (FLAGS.repeats < 1 or FLAGS.warmup < 0 or FLAGS.min_repeat_s < 0
        or FLAGS.settle < 0):
      fail(f"need --repeats >= 1, --warmup >= 0, --min_repeat_s >= 0, --settle >= 0; got "
           f"{FLAGS.repeats}, {FLAGS.warmup}, {FLAGS.min_repeat_s}, {FLAGS.settle}")
    if FLAGS.dtype is not None:
      config.model.dtype = FLAGS.dtype
    if FLAGS.json:
      try:
        check_output_file(FLAGS.json)
      except ValueError as e:
        fail(str(e))
    try:
      r = None
      if FLAGS.r is not None:
        try:
          r = normalize_r(float(FLAGS.r), "--r", mctf_jax.fusion_config(config).method)
        except ValueError as e:
          raise ConfigError(str(e) if isinstance(e, ConfigError) else
                            f"--r must be a number (a token count or a ratio < 1), got "
                            f"{FLAGS.r!r}")
      mctf_jax.create_model(config)  # validates the config before anything is timed
      variables = None
      if FLAGS.checkpoint:
        variables = checkpoint.load_variables(FLAGS.checkpoint, config)
    except MctfError as e:
      fail(str(e))
    result = compare(config, variables, batch_size=FLAGS.batch_size, r=r, repeats=FLAGS.repeats,
                     warmup=FLAGS.warmup, min_repeat_s=FLAGS.min_repeat_s,
                     settle=FLAGS.settle, seed=FLAGS.seed)
    print(format_result(result))
    if FLAGS.json:
      result = dict(result, checkpoint=FLAGS.checkpoint or None,
                    jax_version=jax.__version__, num_devices=jax.device_count())
      write_json(FLAGS.json, result)

  app.run(run, argv=argv)


if __name__ == "__main__":
  main()
