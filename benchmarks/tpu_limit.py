r"""How lean the fused program can be on a TPU: fused and plain against the blocks at the
fused widths without the fusion steps, as the TPU compiler sees them (compiled, not run).

    python benchmarks/tpu_limit.py --configs=deit_s --topologies=v5e:2x2
    python benchmarks/tpu_limit.py --configs=deit_s --programs=train --json=limit.json

For each config, compiles three forwards on the topology: the plain one (r=0), the fused
one (eval.py's program at the config's r) and the steps-free one: the same evaluation
step around ``mctf_jax.tools.benchmark.steps_free_forward(model, slice_probs=True)``,
whose blocks run at the fused token counts (a fusing block's softmax over its input
tokens, as MCTF's one-step-ahead attention has it, its product with the values of the
kept tokens only) while the fusion steps' own work (scores, matching, merges) is taken
out. No form of those steps can make the fused program leaner than that one, so
steps-free / plain is the limit of fused / plain on that chip, and the gap between the
fused and the steps-free programs is what the fusion steps cost there. With
--programs=train the same three as bare train steps (softmax cross-entropy and an SGD
update of the parameters, no dropout, exact token counts; not train.py's step, whose
student runs at padded widths with run-time merge counts and carries the recipe's losses,
but the same step for all three, so that they compare).

Prints per program the compiled figures and the fused / plain and steps-free / plain
ratios (FLOPs traced, bytes accessed, XLA's estimated speed-up with the instructions its
TPU cost model cannot cost at 0); --json writes them. Only for MCTF with the
one-step-ahead attention (``fusion.one_step_ahead='approx'``, every MCTF config here).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mctf_jax.tools import compile as aot  # noqa: E402  (sets the TPU compile environment)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

import mctf_jax  # noqa: E402
from mctf_jax import parallel  # noqa: E402
from mctf_jax.errors import MctfError  # noqa: E402
from mctf_jax.tools import cli  # noqa: E402
from mctf_jax.tools.benchmark import steps_free_forward  # noqa: E402
from mctf_jax.training import programs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["deit_s"], "Config names (configs/<name>.py), MCTF configs.")
flags.DEFINE_list("topologies", ["v5e:2x2"], "TPU slices (or cpu:N).")
flags.DEFINE_list("programs", ["eval"], "eval: the forwards; train: the bare train steps.")
flags.DEFINE_integer("batch_per_chip", 256, "Images per chip in the forwards.", lower_bound=1)
flags.DEFINE_integer("train_batch_per_chip", 128, "Images per chip in the train steps.",
                     lower_bound=1)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "model.dtype and param_dtype.")
flags.DEFINE_string("json", None, "Write every figure to this JSON file.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("plain", "fused", "steps free")


def load(name: str, dtype: str):
  """configs/<name>.py in `dtype` (compute and parameters), the student alone (no
  teacher: the bare steps have none), no dropout or stochastic depth (the steps-free
  forward has none), the forward at the config's r."""
  config = mctf_jax.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  config.model.dtype = config.model.param_dtype = dtype
  for rate in ("drop_path_rate", "dropout_rate", "performer_dropout_rate"):
    if rate in config.model:
      config.model[rate] = 0.0
  config.fusion.teacher_r_max = 0.0
  config.eval.r_values = ()
  return config


def train_forward(model, kind: str):
  """forward(variables, images) -> logits of the plain, fused or steps-free program as a
  train step runs it (``train=True``: the fused tokens left in the layout the backward
  pass prefers, which inference programs keep token-major; no dropout at rate 0)."""
  if kind == "steps free":
    return lean_steps_free(model)
  program = model.with_fusion(r=0) if kind == "plain" else model
  return lambda variables, images: program.apply(variables, images, train=True)


def lean_steps_free(model):
  """The steps-free forward in its leaner form on a TPU (the probabilities sliced)."""
  return steps_free_forward(model, slice_probs=True)


def compile_forwards(config, tgt: aot.Target, per_chip: int) -> dict:
  """The three evaluation steps (eval.py's, the steps-free one around its forward) at
  per_chip images."""
  config.batch_size = config.eval_batch_size = per_chip * len(tgt.devices)
  r = aot.eval_r_values(config)[0]
  return {"plain": aot.compile_forward(config, tgt, 0, name="forward, plain"),
          "fused": aot.compile_forward(config, tgt, r, name="forward, fused"),
          "steps free": aot.compile_forward(config, tgt, r, name="forward, steps free",
                                            forward_of=lean_steps_free)}


def bare_train_step(forward, learning_rate: float = 1e-3):
  """(params, model state, images, labels) -> (new params, loss): softmax cross-entropy of
  forward's logits and one SGD update."""
  def step(params, model_state, images, labels):
    def loss(p):
      logits = forward({**model_state, "params": p}, images).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    value, grads = jax.value_and_grad(loss)(params)
    return jax.tree.map(lambda p, g: p - learning_rate * g.astype(p.dtype), params,
                        grads), value
  return step


def compile_train_steps(config, tgt: aot.Target, per_chip: int) -> dict:
  """The three bare train steps at per_chip images, parameters donated."""
  config.batch_size = config.eval_batch_size = per_chip * len(tgt.devices)
  mesh = aot.make_mesh(config, tgt)
  model = programs.model_for_mesh(config, mesh).with_fusion(r=aot.eval_r_values(config)[0])
  variables = programs.abstract_variables(model, mesh)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  batch = programs.eval_batch(config, model, mesh)
  args = (params, model_state, batch["image"], batch["label"])
  shardings = jax.tree.map(lambda x: x.sharding, args)
  results = {}
  for kind in KINDS:
    step = jax.jit(bare_train_step(train_forward(model, kind)), in_shardings=shardings,
                   out_shardings=(shardings[0], parallel.replicated(mesh)),
                   donate_argnums=(0,))
    traced = aot.traced_step_flops(step, *args)
    results[kind] = aot.measure(f"train step, {kind}", model.fusion.r,
                                lambda s=step: s.lower(*args), traced, mesh.devices.size, tgt)
  return results


def main(argv):
  cli.begin_script(argv, FLAGS)
  unknown = sorted(set(FLAGS.programs) - {"eval", "train"})
  if unknown:
    cli.fail(f"--programs={','.join(FLAGS.programs)}: unknown {unknown}; expected eval, train")
  rows = []
  for topology, tgt in aot.each_target(FLAGS.topologies):
    for name in FLAGS.configs:
      config = load(name, FLAGS.dtype)
      fusion = mctf_jax.fusion_config(config)
      if not aot.eval_r_values(config)[0]:
        print(f"  {name}: skipped: nothing fuses at its r", flush=True)
        continue
      if fusion.method != "mctf" or fusion.one_step_ahead != "approx":
        print(f"  {name}: skipped: the steps-free program follows MCTF's one-step-ahead "
              f"attention; this config has fusion.method={fusion.method!r}, "
              f"one_step_ahead={fusion.one_step_ahead!r}", flush=True)
        continue
      row = {"config": name, "topology": topology, "device_kind": tgt.device_kind,
             "dtype": FLAGS.dtype}
      t0 = time.time()
      for program, compile_three, per_chip in (
          ("eval", compile_forwards, FLAGS.batch_per_chip),
          ("train", compile_train_steps, FLAGS.train_batch_per_chip)):
        if program not in FLAGS.programs:
          continue
        try:
          three = compile_three(config, tgt, per_chip)
        except MctfError as e:
          print(f"  {name}: {e}", flush=True)
          row[program] = {"error": str(e)}
          continue
        print(f"  {name}: {aot.HEADER}", flush=True)
        for cost in three.values():
          print(f"  {name}: {aot.format_cost(cost)}", flush=True)
        for kind in ("fused", "steps free"):
          print(f"  {name}: {aot.format_ratios(three[kind], three['plain'])}", flush=True)
        row[program] = {"batch_per_chip": per_chip,
                        "programs": {k: c.as_dict() for k, c in three.items()},
                        "fused_ratios": aot.ratios(three["fused"], three["plain"]),
                        "steps_free_ratios": aot.ratios(three["steps free"], three["plain"])}
      row["seconds"] = time.time() - t0
      rows.append(row)
  if FLAGS.json:
    cli.write_json(FLAGS.json, rows)


if __name__ == "__main__":
  app.run(main)
