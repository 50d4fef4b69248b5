r"""FLOPs of DeiT with MCTF, counted as the paper counts them (fvcore), from the schedule.

    python -m mctf_jax.tools.flops --config=configs/deit_s.py            # 2.602 GFLOPs
    python -m mctf_jax.tools.flops --config=configs/deit_s.py --config.fusion.r=8 --verbose
    python -m mctf_jax.tools.flops --config=configs/deit_s.py --xla      # + XLA's own count

The official code reports fvcore's ``FlopCountAnalysis(model, (1, 3, 224, 224)).total()``.
fvcore's convention, followed here:

* one multiply-add is one FLOP, and only these ops are counted: matmul / linear / bmm /
  einsum (m*k*n for an (m, k) @ (k, n) product; a linear layer's bias is free), the patch
  convolution (out_positions * C_out * C_in * kh * kw) and LayerNorm (5 per element, with
  its affine parameters);
* softmax, GELU, additions, scaling, norms, powers, gathers, scatters, sorts: zero.

The count is analytic: the static schedule gives the tokens entering and leaving every
block, and each block is costed as the *official* code executes it (models/SA/MHSA.py,
models/modules/blocks.py, utils/mctf.py):

* an ordinary block: norm1, qkv (C -> 3C), q @ k^T, attn @ v, proj, norm2, fc1, fc2;
* one-step-ahead 'approx' (the paper's MCTF): norm1 and the q, k half of the qkv matmul
  (x @ W[:, :2C]) on the T unfused tokens, q @ k^T on them; the bipartite matching's
  similarity ``a @ b.transpose(-1, -2)`` on the L2-normalised metric (the block input,
  ceil(T/2) x C x floor(T/2)); then norm1 again and the v third (x @ W[:, 2C:]) on the
  O = T - r fused tokens, the merged (O, O) attention map @ v, proj, norm2 and the MLP on O.
  ``merge_wavg`` merges tokens and the attention map by gathers and scatter_reduce, which
  fvcore does not count;
* 'precise': as 'approx' up to the matching, then a whole attention (qkv, q @ k^T,
  attn @ v, proj) and the MLP on the fused tokens;
* 'off' (ToMe-like): an ordinary block on T tokens, then the matching matmul on its output;
* the similarity matmul is absent when tau_sim = 0 (the official code then uses ones);
* ``fusion.method='tome'``, as fvcore counts ToMe's own code (facebookresearch/ToMe's timm
  patch): an ordinary attention on the T tokens, the matching ``a @ b^T`` on the keys
  averaged over heads (C / heads wide), then norm2 and the MLP on the O fused tokens;
* a block that fuses no token (fusion off, or too few tokens left for r) is an ordinary
  block. The official code does execute more in a listed block whose r comes out 0: the q, k
  attention for the matching, before ``mctf`` returns unmerged tokens; but that attention
  is then unused and fvcore's traced graph drops it, so the official numbers (and these)
  count an ordinary block.

Checked against fvcore 0.1.5 run on the official code (commit 2004da0, timm layers as
there): equal to the FLOP in every setting of ``tests/test_flops.py`` (each one-step-ahead
mode and pooling, tau_sim = 0, one-directional matching, ratio r, an r_eval override, 384 px,
DeiT-T/S/B).

``count_flops(..., implementation='mctf_jax')`` costs what this port executes instead.
It differs in one place: for the averaging poolings, 'approx' computes the fused tokens'
attention as pool_rows(attn @ v[dest]), a (T, T) @ (T, d) product per head rather than the
official (O, O) one (same result, no scatter of the map); and the 'matmul' merge (TPU)
adds products with the (T, O) 0/1 matrix of destinations.

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

The count is backbone-agnostic: the backbone gives the FLOPs of its embedding and of what
follows the blocks (``Backbone.flops_embed``, ``flops_tail``) and the sizes of its blocks
(embed_dim, mlp_dim, num_heads); the blocks are costed here from the schedule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from mctf_jax import models
from mctf_jax.config import fusion_config, model_config
from mctf_jax.errors import ConfigError
from mctf_jax.fusion.config import FusionConfig
from mctf_jax.fusion.schedule import LayerPlan, Schedule, compute_schedule
from mctf_jax.fusion.steps import resolve_merge_impl
from mctf_jax.models.base import LAYER_NORM_FLOPS_PER_ELEMENT
from mctf_jax.tools.cli import fail, write_json

IMPLEMENTATIONS = ("official", "mctf_jax")

# Op names in a breakdown. 'norm' is LayerNorm (fvcore's 5 per element); the rest are
# multiply-adds of matrix products.
MATMUL_OPS = ("patch_embed", "qkv", "scores", "attend", "proj", "mlp", "matching", "merge",
              "head")
OPS = MATMUL_OPS + ("norm",)


@dataclasses.dataclass(frozen=True)
class LayerFlops:
  """FLOPs of one stage of the forward pass (per image), split by op.

  name: 'patch_embed', 'block 3', 'norm' (the final LayerNorm) or 'head'.
  tokens_in / tokens_out: tokens entering and leaving it; r: tokens it fuses away.
  ops: (op, FLOPs) pairs with op in OPS, zero entries left out.
  """
  name: str
  tokens_in: int
  tokens_out: int
  r: int = 0
  ops: tuple[tuple[str, int], ...] = ()

  @property
  def flops(self) -> int:
    return sum(n for _, n in self.ops)

  def op(self, name: str) -> int:
    return sum(n for op, n in self.ops if op == name)


@dataclasses.dataclass(frozen=True)
class FlopReport:
  """FLOPs of one image under the fvcore convention (one multiply-add = one FLOP)."""
  stages: tuple[LayerFlops, ...]
  schedule: Schedule
  implementation: str = "official"
  img_size: int = 224

  @property
  def total(self) -> int:
    return sum(s.flops for s in self.stages)

  @property
  def gflops(self) -> float:
    return self.total / 1e9

  @property
  def matmul(self) -> int:
    """Multiply-adds of the matrix products and the convolution (LayerNorm left out)."""
    return sum(n for s in self.stages for op, n in s.ops if op in MATMUL_OPS)

  def by_op(self) -> dict[str, int]:
    out = {op: 0 for op in OPS}
    for s in self.stages:
      for op, n in s.ops:
        out[op] += n
    return {op: n for op, n in out.items() if n}

  def table(self) -> str:
    """Per-stage table: tokens in/out, r, MFLOPs by kind of op, and GFLOPs."""
    head = (f"{'stage':<12s} {'tokens':>10s} {'r':>4s} {'attention':>10s} {'mlp':>8s} "
            f"{'matching':>9s} {'norm':>7s} {'other':>7s} {'GFLOPs':>8s}")
    lines = ["MFLOPs per image (attention: qkv, q @ k^T, attn @ v, proj and merges; other: "
             "patch embedding, head)", head, "-" * len(head)]
    for s in self.stages:
      attn = sum(s.op(o) for o in ("qkv", "scores", "attend", "proj", "merge"))
      other = s.op("patch_embed") + s.op("head")
      tokens = (f"{s.tokens_in}->{s.tokens_out}" if s.tokens_in != s.tokens_out
                else str(s.tokens_in))
      lines.append(f"{s.name:<12s} {tokens:>10s} {s.r or '':>4} {attn / 1e6:10.2f} "
                   f"{s.op('mlp') / 1e6:8.2f} {s.op('matching') / 1e6:9.3f} "
                   f"{s.op('norm') / 1e6:7.3f} {other / 1e6:7.2f} {s.flops / 1e9:8.4f}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<12s} {self.gflops:{len(head) - 13}.4f}")
    return "\n".join(lines)

  def to_dict(self) -> dict:
    return {
        "gflops": self.gflops, "flops": self.total, "implementation": self.implementation,
        "convention": "fvcore (1 multiply-add = 1 FLOP; matmul, conv, LayerNorm)",
        "img_size": self.img_size, "r": self.schedule.r,
        "tokens_per_layer": list(self.schedule.tokens_per_layer),
        "by_op": self.by_op(),
        "stages": [{"name": s.name, "tokens_in": s.tokens_in, "tokens_out": s.tokens_out,
                    "r": s.r, "flops": s.flops, "ops": dict(s.ops)} for s in self.stages],
    }

  def __str__(self) -> str:
    return f"{self.gflops:.3f} GFLOPs ({self.schedule.tokens_in} -> " \
           f"{self.schedule.tokens_out} tokens, r={self.schedule.r!r})"


# ----------------------------------------------------------------------------- counting


def _attention(m, q: int, k: int) -> int:
  """q @ k^T (or attn @ v) over all heads: H * q * k * d."""
  return q * k * m.embed_dim  # H * d = C


def _norm(m, tokens: int) -> int:
  return LAYER_NORM_FLOPS_PER_ELEMENT * tokens * m.embed_dim


def _matching(m, fusion: FusionConfig, tokens: int) -> int:
  """The similarity a @ b^T between the even and the odd tokens: a C-wide metric (the
  block's tokens), or ToMe's, the keys averaged over heads (C / heads wide)."""
  if fusion.method == "tome":
    return (tokens + 1) // 2 * (tokens // 2) * (m.embed_dim // m.num_heads)
  return (tokens + 1) // 2 * (tokens // 2) * m.embed_dim if fusion.tau_sim else 0


def _merge_onehot(m, fusion: FusionConfig, plan: LayerPlan, attend_width: int,
                  one_step_ahead: bool) -> int:
  """The products with the (T, O) 0/1 matrix of the destinations in this port's 'matmul'
  merges of one fusion step (``fusion.merge``): the tokens' weighted average, and with
  one-step-ahead attention the values brought back to the unfused tokens and the rows'
  average; for max pooling, the sizes and the attention map's key columns."""
  t, o, c = plan.tokens_in, plan.tokens_out, m.embed_dim
  if fusion.pooling == "max":
    return t * o + (t * o * attend_width if one_step_ahead else 0)
  return t * o * c + (t * o * (c + attend_width) if one_step_ahead else 0)


def _plain_block(m, t: int) -> list[tuple[str, int]]:
  c = m.embed_dim
  return [("norm", 2 * _norm(m, t)), ("qkv", t * c * 3 * c),
          ("scores", _attention(m, t, t)), ("attend", _attention(m, t, t)),
          ("proj", t * c * c), ("mlp", 2 * t * c * m.mlp_dim)]


def _block(m, fusion: FusionConfig, plan: LayerPlan, implementation: str,
           merge_impl: str) -> list[tuple[str, int]]:
  c, t, o = m.embed_dim, plan.tokens_in, plan.tokens_out
  mode = fusion.one_step_ahead
  if not plan.fuses:
    return _plain_block(m, t)
  matching = ("matching", _matching(m, fusion, t))
  merge = []
  if implementation == "mctf_jax" and merge_impl == "matmul":
    attend_width = c if fusion.pooling != "max" else m.num_heads * t
    merge = [("merge", _merge_onehot(m, fusion, plan, attend_width,
                                     mode == "approx" and fusion.method == "mctf"))]
  if fusion.method == "tome":
    # The attention on T tokens, the matching on its keys, the MLP on the O fused tokens.
    return [("norm", _norm(m, t)), ("qkv", t * c * 3 * c), ("scores", _attention(m, t, t)),
            ("attend", _attention(m, t, t)), ("proj", t * c * c), matching,
            ("norm", _norm(m, o)), ("mlp", 2 * o * c * m.mlp_dim)] + merge
  if mode == "off":
    return _plain_block(m, t) + [matching] + merge
  ops = [("norm", _norm(m, t)), ("qkv", t * c * 2 * c), ("scores", _attention(m, t, t)),
         matching]
  if mode == "approx":
    # v of the fused tokens, merged attention @ v.
    port_full = implementation == "mctf_jax" and fusion.pooling != "max"
    attend = _attention(m, t, t) if port_full else _attention(m, o, o)
    ops += [("norm", _norm(m, o)), ("qkv", o * c * c), ("attend", attend)]
  else:  # precise: the whole attention again, on the fused tokens
    ops += [("norm", _norm(m, o)), ("qkv", o * c * 3 * c), ("scores", _attention(m, o, o)),
            ("attend", _attention(m, o, o))]
  ops += [("proj", o * c * c), ("norm", _norm(m, o)), ("mlp", 2 * o * c * m.mlp_dim)]
  return ops + merge


def _merged(ops: list[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
  out: dict[str, int] = {}
  for op, n in ops:
    out[op] = out.get(op, 0) + n
  return tuple((op, n) for op, n in out.items() if n)


def count_flops(model_cfg: Any, fusion_cfg: Any = None, r: int | float | None = None, *,
                implementation: str = "official", merge_impl: str | None = None) -> FlopReport:
  """FLOPs of one image, per stage, as fvcore counts the official code.

  model_cfg: a backbone config (e.g. DeiTConfig), or a whole config (ConfigDict with .model
    and .fusion).
  fusion_cfg: a FusionConfig or a config; None takes model_cfg's fusion section (no fusion
    for a bare backbone config).
  r: evaluate at this r (a count or a ratio) instead of fusion.r; 0 is plain DeiT.
  implementation: 'official' (what the reference executes; its reported numbers) or
    'mctf_jax' (what this port executes; see the module docstring).
  merge_impl: for 'mctf_jax', the merge implementation ('scatter' or 'matmul'); default:
    the fusion config's, with 'auto' resolved for the current JAX backend.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  m = model_config(model_cfg)
  fusion = fusion_config(model_cfg if fusion_cfg is None else fusion_cfg)
  if merge_impl is None:
    merge_impl = fusion.merge_impl
    if implementation == "mctf_jax" and merge_impl == "auto":
      merge_impl = resolve_merge_impl(merge_impl)
  if r is None and fusion.has_budget:
    fusion = apply_budget(m, fusion)
  backbone = models.get(m.arch)
  schedule = compute_schedule(fusion, num_tokens=m.num_tokens, depth=m.depth,
                              num_protected=m.num_protected, r=r)
  name, tokens_in, tokens_out, ops = backbone.flops_embed(m)
  stages = [LayerFlops(name, tokens_in, tokens_out, 0, ops)]
  for plan in schedule.layers:
    ops = _block(m, fusion, plan, implementation, merge_impl)
    stages.append(LayerFlops(f"block {plan.layer}", plan.tokens_in, plan.tokens_out, plan.r,
                             _merged(ops)))
  for name, tokens_in, tokens_out, ops in backbone.flops_tail(m, schedule.tokens_out):
    stages.append(LayerFlops(name, tokens_in, tokens_out, 0, ops))
  return FlopReport(tuple(stages), schedule, implementation, m.img_size)


def model_flops(model, r: int | float | None = None, **kwargs) -> FlopReport:
  """count_flops for a backbone module (its model and fusion settings)."""
  return count_flops(model.config, model.fusion, r, **kwargs)


# ----------------------------------------------------------------------------- budget

# A budget over ratios searches r on this grid.
RATIO_STEP = 0.001
# A choice names the r just over its budget when that r is within this fraction of it (a
# budget rounded from a published figure: the paper's 2.60 GFLOPs are r=16's 2.602).
NEAR_ABOVE = 0.01


@dataclasses.dataclass(frozen=True)
class BudgetChoice:
  """The r a FLOP budget picks: the largest FLOPs at or below the budget (the least fusion
  among equals), with FLOPs per image as fvcore counts the official code."""
  r: int | float
  flops: int
  unfused: int
  budget: float
  # The r that comes closest from above and its FLOPs (None if none is above the budget).
  above: tuple[int | float, int] | None = None

  def __str__(self) -> str:
    text = (f"FLOP budget {self.budget / 1e9:.3f} GFLOPs ({self.budget / self.unfused:.1%} "
            f"of the unfused {self.unfused / 1e9:.3f}): r={self.r!r}, "
            f"{self.flops / 1e9:.3f} GFLOPs ({self.flops / self.unfused:.1%})")
    if self.above is not None and self.above[1] <= self.budget * (1 + NEAR_ABOVE):
      r, flops = self.above
      text += (f"; r={r!r} is {flops / self.budget - 1:.2%} over the budget, at "
               f"{flops / 1e9:.3f} GFLOPs")
    return text


def _kind(r):
  """A representative of r's kind (count or ratio), so that the cache holds one entry."""
  return 0.5 if isinstance(r, float) else 0


def _budget_candidates(m, fusion: FusionConfig) -> list:
  """The r values a budget chooses among, in increasing order: counts 0..tokens (no count
  above removes more), or ratios on the RATIO_STEP grid when fusion.r is a ratio."""
  if isinstance(fusion.r, float):
    steps = round(1 / RATIO_STEP)
    return [0] + [round(i * RATIO_STEP, 6) for i in range(1, steps)]
  return list(range(m.num_tokens + 1))


@functools.lru_cache(maxsize=256)
def _costs(m, fusion: FusionConfig) -> tuple[int, tuple[tuple[int | float, int], ...]]:
  """The unfused FLOPs and (r, FLOPs) of every candidate r (cached: configs are hashable)."""
  unfused = count_flops(m, fusion, r=0).total
  return unfused, tuple((r, count_flops(m, fusion, r=r).total)
                        for r in _budget_candidates(m, fusion))


def budget_choice(model_cfg: Any, fusion_cfg: Any = None) -> BudgetChoice:
  """The r that meets the config's FLOP budget (fusion.target_gflops or target_fraction)
  as closely as possible from below; ConfigError naming the reachable range if no r does.

  Computed from the static schedule (analytic, no tracing). The r is of fusion.r's kind:
  a token count (ToMe's inflection applies to it), or a ratio if fusion.r is one
  (MCTF-Fast), on a grid of RATIO_STEP.
  """
  m = model_config(model_cfg)
  fusion = fusion_config(model_cfg if fusion_cfg is None else fusion_cfg)
  if not fusion.has_budget:
    raise ConfigError("no FLOP budget: set fusion.target_gflops or fusion.target_fraction")
  fusion.check_depth(m.depth)
  unfused, costs = _costs(m, dataclasses.replace(fusion, target_gflops=0.0,
                                                  target_fraction=0.0, r=_kind(fusion.r)))
  if fusion.target_gflops:
    budget, asked = fusion.target_gflops * 1e9, f"fusion.target_gflops={fusion.target_gflops!r}"
  else:
    budget = fusion.target_fraction * unfused
    asked = (f"fusion.target_fraction={fusion.target_fraction!r} "
             f"({budget / 1e9:.4g} GFLOPs)")
  best = above = None
  for r, flops in costs:
    if flops <= budget and (best is None or flops > best[1]):
      best = (r, flops)
    if flops > budget and (above is None or flops < above[1]):
      above = (r, flops)
  if best is None:
    r_min, least = min(costs, key=lambda c: (c[1], c[0]))
    raise ConfigError(
        f"{asked} cannot be met: {models.get(m.arch).describe(m)} with fusion on blocks "
        f"{list(fusion.layers)} runs at {least / 1e9:.4g} GFLOPs (r={r_min!r}) to "
        f"{unfused / 1e9:.4g} GFLOPs (no fusion); set a budget in that range"
        + (", or fuse more blocks (fusion.layers)" if len(fusion.layers) < m.depth else ""))
  return BudgetChoice(best[0], best[1], unfused, budget, above)


def apply_budget(model_cfg: Any, fusion_cfg: FusionConfig) -> FusionConfig:
  """fusion_cfg with r chosen by its FLOP budget and the budget cleared (unchanged
  without one), so that the model's later r changes (``Backbone.with_fusion``) hold."""
  if not fusion_cfg.has_budget:
    return fusion_cfg
  return dataclasses.replace(fusion_cfg, r=budget_choice(model_cfg, fusion_cfg).r,
                             target_gflops=0.0, target_fraction=0.0)


# ----------------------------------------------------------------------------- XLA


def xla_cost(model, batch_size: int = 1, r: int | float | None = None) -> dict[str, float]:
  """XLA's cost analysis of the jitted forward pass (logits) on the default backend.

  Compiled from abstract shapes (no weights are materialised). Returns XLA's 'flops'
  (2 per multiply-add, plus elementwise ops), 'transcendentals' and 'bytes accessed', for
  the whole batch.
  """
  import jax
  import jax.numpy as jnp

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
  from jax.extend import core as jex_core
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
  import jax
  import jax.numpy as jnp

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
  from absl import app, flags
  from ml_collections import config_flags

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
    from mctf_jax.config import ConfigError, normalize_r
    config = FLAGS.config
    try:
      r = None
      if FLAGS.r is not None:
        try:
          r = float(FLAGS.r)
        except ValueError:
          raise ConfigError(f"--r must be a number (a token count or a ratio < 1), got "
                            f"{FLAGS.r!r}")
        r = normalize_r(r, "--r")
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
      how = ("ToMe" if fusion.method == "tome"
             else f"MCTF (one-step-ahead {fusion.one_step_ahead})")
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
      import jax
      import mctf_jax
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
