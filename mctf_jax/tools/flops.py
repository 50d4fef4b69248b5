r"""FLOPs of DeiT with MCTF, counted as the paper counts them (fvcore), from the schedule.

    python -m mctf_jax.tools.flops --config=configs/deit_s.py            # 2.602 GFLOPs
    python -m mctf_jax.tools.flops --config=configs/deit_s.py --config.fusion.r=8 --verbose
    python -m mctf_jax.tools.flops --config=configs/deit_s.py --xla      # + XLA's own count

The count itself (fvcore's convention, each block costed as the official code executes
it, and the budget choice) is ``mctf_jax.cost``; this module prints it and checks it
against what JAX traces and XLA compiles.

Cross-checks against JAX/XLA. ``traced_matmul_flops(model)`` reads every dot_general and
convolution off the jaxpr of the forward pass; it equals the 'mctf_jax' count's matmul part
exactly (tested for every one-step-ahead mode, pooling and merge implementation).
``xla_cost(model)`` is XLA's ``compile().cost_analysis()``, whose 'flops' differ from
fvcore's by convention, not by error:

* XLA counts a multiply-add as 2 FLOPs (fvcore: 1);
* XLA also counts every elementwise op and reduction at one per element: biases and
  residual adds, the attention scaling and softmax (max, subtract, sum, divide), GELU's
  erf arithmetic, LayerNorm's actual mean/variance/scale ops (instead of fvcore's flat 5 per
  element), the fusion's score arithmetic and rank comparisons; it counts exponentials,
  erf and rsqrt apart, as 'transcendentals' (DeiT-S: 6.43 M, softmax's and GELU's).

So ``2 * traced <= xla_flops <= (1 + e) * 2 * traced`` with e the elementwise share, a few
percent for DeiT-T/S and more for small test models, whose matrices are small (the tests
allow e < 8% and < 25%; measured values in docs/speed.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.extend import core as jex_core
from ml_collections import config_flags

import mctf_jax
from mctf_jax import models
from mctf_jax.config import fusion_config, model_config, normalize_r
from mctf_jax.errors import ConfigError
from mctf_jax.cost import (IMPLEMENTATIONS, MATMUL_OPS, OPS, BudgetChoice, FlopReport,
                           LayerFlops, apply_budget, budget_choice, count_flops, model_flops)
from mctf_jax.tools.cli import fail, write_json

__all__ = ["IMPLEMENTATIONS", "MATMUL_OPS", "OPS", "BudgetChoice", "FlopReport", "LayerFlops",
           "apply_budget", "budget_choice", "count_flops", "model_flops", "jaxpr_macs",
           "traced_matmul_flops", "xla_cost", "main"]

# ----------------------------------------------------------------------------- XLA


def xla_cost(model, batch_size: int = 1, r: int | float | None = None) -> dict[str, float]:
  """XLA's cost analysis of the jitted forward pass (logits) on the default backend.

  Compiled from abstract shapes (no weights are materialised). Returns XLA's 'flops'
  (2 per multiply-add, plus elementwise ops), 'transcendentals' and 'bytes accessed', for
  the whole batch.
  """
  if r is not None:
    model = model.with_fusion(r=r)
  images = jax.ShapeDtypeStruct((batch_size,) + tuple(model.config.image_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  fn = jax.jit(lambda v, x: model.apply(v, x))
  cost = fn.lower(variables, images).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0]
  if not cost or "flops" not in cost:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no cost analysis")
  return {k: float(cost[k]) for k in ("flops", "transcendentals", "bytes accessed")
          if k in cost}


def _eqn_macs(eqn) -> int:
  """Multiply-adds of one dot_general or convolution equation (0 for anything else)."""
  name = eqn.primitive.name
  if name == "dot_general":
    (contract_lhs, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract_lhs)
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // out_features
  return 0


def jaxpr_macs(jaxpr) -> int:
  """Multiply-adds of every product in a (closed) jaxpr, inner jaxprs included: a scan's
  body times its length, a cond's costliest branch."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_macs(eqn)
    name = eqn.primitive.name
    if name == "cond":
      total += max(jaxpr_macs(b) for b in eqn.params["branches"])
      continue
    if name == "while":
      raise ValueError("cannot count a while loop's products (unknown trip count)")
    inner = sum(jaxpr_macs(j) for j in jex_core.jaxprs_in_params(eqn.params))
    total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def traced_matmul_flops(model, batch_size: int = 1, r: int | float | None = None) -> int:
  """Multiply-adds of every matrix product and convolution in the traced forward pass.

  Reads them off the jaxpr of ``model.apply`` (dot_general: output size x contracted
  size; conv: output size x kernel size / output features), so it is what this port
  executes, before XLA. It equals ``batch_size * count_flops(..., implementation=
  'mctf_jax', merge_impl=...).matmul`` exactly.
  """
  if r is not None:
    model = model.with_fusion(r=r)
  images = jax.ShapeDtypeStruct((batch_size,) + tuple(model.config.image_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  return jaxpr_macs(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, images))


# ----------------------------------------------------------------------------- CLI


def _describe(config) -> str:
  m = model_config(config)
  return models.get(m.arch).describe(m)


def main(argv=None):
  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_s.py; "
                                  "fields may be overridden: --config.fusion.r=8.")
  flags.DEFINE_string("r", None, "Evaluate at this r (a count, or a ratio < 1) instead of "
                      "config.fusion.r; 0 = no fusion.")
  flags.DEFINE_bool("verbose", False, "Print the per-stage table.")
  flags.DEFINE_enum("implementation", "official", IMPLEMENTATIONS,
                    "Cost what the official PyTorch code executes (its reported numbers), "
                    "or what this port executes.")
  flags.DEFINE_bool("xla", False, "Also compile the model (batch 1) and print XLA's count.")
  flags.DEFINE_string("json", None, "Write the report as JSON to this path.")
  flags.mark_flags_as_required(["config"])

  def run(argv_):
    if len(argv_) > 1:
      fail(f"unexpected arguments {argv_[1:]}; all options are --flags")
    config = FLAGS.config
    try:
      r = None
      if FLAGS.r is not None:
        try:
          r = float(FLAGS.r)
        except ValueError:
          raise ConfigError(f"--r must be a number (a token count or a ratio < 1), got "
                            f"{FLAGS.r!r}")
        r = normalize_r(r, "--r", fusion_config(config).method)
      report = count_flops(config, r=r, implementation=FLAGS.implementation)
      base = count_flops(config, r=0, implementation=FLAGS.implementation)
    except ConfigError as e:
      fail(str(e))
    fusion = fusion_config(config)
    print(f"{_describe(config)}, {FLAGS.implementation} code, fvcore convention "
          f"(1 multiply-add = 1 FLOP)")
    if fusion.has_budget and r is None:
      print(budget_choice(config))
    if report.schedule.fuses:
      how = {"tome": "ToMe", "pitome": "PiToMe (r: keep ratio)"}.get(
          fusion.method, f"MCTF (one-step-ahead {fusion.one_step_ahead})")
      inflection = f", inflection {fusion.inflection!r}" if fusion.inflection else ""
      print(f"{how} r={report.schedule.r!r}{inflection} on blocks {list(fusion.layers)}: "
            f"{report.gflops:.3f} GFLOPs, per block {[p.r for p in report.schedule.layers]}, "
            f"{report.schedule.tokens_in} -> {report.schedule.tokens_out} tokens")
      print(f"without fusion: {base.gflops:.3f} GFLOPs; fused / plain = "
            f"{report.total / base.total:.3f}")
    else:
      print(f"no fusion: {report.gflops:.3f} GFLOPs")
    if FLAGS.verbose:
      print()
      print(report.table())
    out = report.to_dict()
    if FLAGS.xla:
      model = mctf_jax.create_model(config)
      traced = traced_matmul_flops(model, 1, r)
      cost = xla_cost(model, 1, r)
      print(f"XLA ({jax.default_backend()}, batch 1): {cost['flops'] / 1e9:.3f} GFLOPs "
            f"(2 per multiply-add + elementwise ops), "
            f"{cost.get('transcendentals', 0) / 1e6:.2f} M transcendentals")
      print(f"  this port's traced matmuls: {traced / 1e9:.3f} G multiply-adds; "
            f"XLA / (2 x traced) = {cost['flops'] / (2 * traced):.3f}; "
            f"XLA / (2 x fvcore count) = {cost['flops'] / (2 * report.total):.3f}")
      out["xla"] = dict(cost, backend=jax.default_backend(), traced_matmul=traced)
    if FLAGS.json:
      write_json(FLAGS.json, out)

  app.run(run, argv=argv)


if __name__ == "__main__":
  main()
