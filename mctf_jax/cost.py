r"""FLOPs of a ViT with token fusion, counted as the paper counts them (fvcore), from the
static schedule, and the r a FLOP budget picks (``fusion.target_gflops``,
``target_fraction``). The command line and the cross-checks against the traced program
and XLA are ``mctf_jax.tools.flops``.

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
* ``fusion.method='pitome'``, as fvcore would count PiToMe's code (hchautran/PiToMe's DeiT
  patch): ToMe's block, with the similarity of every unprotected token to every other
  (``k @ k^T``, U x U on the C / heads wide keys, U = T minus the class token) in place of
  ToMe's a @ b^T; its energies, sorts and selections are not products;
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

The count is backbone-agnostic: the backbone gives the FLOPs of its embedding and of what
follows the blocks (``Backbone.flops_embed``, ``flops_tail``) and the sizes of its blocks
(embed_dim, mlp_dim, num_heads); the blocks are costed here from the schedule.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from mctf_jax import models
from mctf_jax.config import fusion_config, model_config
from mctf_jax.errors import ConfigError
from mctf_jax.fusion.config import FusionConfig
from mctf_jax.fusion.schedule import LayerPlan, Schedule, compute_schedule
from mctf_jax.fusion.steps import resolve_merge_impl
from mctf_jax.models.base import LAYER_NORM_FLOPS_PER_ELEMENT

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
  block's tokens), or ToMe's, the keys averaged over heads (C / heads wide); PiToMe's is
  every unprotected token's to every other, on the same keys."""
  if fusion.method == "tome":
    return (tokens + 1) // 2 * (tokens // 2) * (m.embed_dim // m.num_heads)
  if fusion.method == "pitome":
    unprotected = tokens - m.num_protected
    return unprotected * unprotected * (m.embed_dim // m.num_heads)
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
  if fusion.method in ("tome", "pitome"):
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
  """A representative of r's kind (count or ratio; for PiToMe any keep ratio is of its
  kind), so that the cache holds one entry."""
  return 0.5 if isinstance(r, float) else 0


def _budget_candidates(m, fusion: FusionConfig) -> list:
  """The r values a budget chooses among, from the least fusion to the most: counts
  0..tokens (no count above removes more), or ratios on the RATIO_STEP grid when fusion.r
  is a ratio; for PiToMe, 0 (no fusion), then keep ratios from 1 - RATIO_STEP down to 0.5."""
  if fusion.method == "pitome":
    steps = round(0.5 / RATIO_STEP)
    return [0] + [round(1 - i * RATIO_STEP, 6) for i in range(1, steps + 1)]
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
  choice = budget_choice(model_cfg, fusion_cfg)
  return dataclasses.replace(fusion_cfg, r=choice.r, target_gflops=0.0, target_fraction=0.0,
                             budget_choice=choice)
