"""The fusion schedule: how many tokens every block sees and removes, fixed before tracing.

Everything MCTF decides from shapes alone (r at each layer, its split between the two
matching directions, the token counts) is computed here once, in plain Python, so that
every array shape inside ``jit`` is static. A backbone's ``schedule()`` calls
``compute_schedule`` with its token count, depth and protected tokens; print the result to
see it::

    >>> print(mctf_jax.create_model(config).schedule())
"""

from __future__ import annotations

import dataclasses
import math

from mctf_jax.errors import ConfigError, is_int
from mctf_jax.fusion.config import FusionConfig, normalize_r, pitome_margins

# The reference never fuses below this many tokens.
MIN_TOKENS = 10


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """One block of the schedule.

  Attributes:
    layer: 0-based block index.
    tokens_in: tokens entering the block.
    r: tokens this block removes (0: an ordinary block).
    r_ab: tokens of set A (even positions) merged into set B.
    r_ba: tokens of set B (odd positions) merged into the unmerged A tokens.
    margin: method 'pitome': the block's energy margin (None otherwise).
    protect: method 'pitome': whether the block protects its low-energy tokens (the second
      half of the blocks) or matches all of them (the first half).
  """
  layer: int
  tokens_in: int
  r: int = 0
  r_ab: int = 0
  r_ba: int = 0
  margin: float | None = None
  protect: bool = False

  @property
  def tokens_out(self) -> int:
    return self.tokens_in - self.r

  @property
  def fuses(self) -> bool:
    return self.r > 0


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The per-layer plan of a model at one r; hashable, so it can key compiled functions.

  num_protected: the leading tokens that are never merged (class and distillation tokens).
  """
  layers: tuple[LayerPlan, ...]
  r: int | float | tuple[int, ...] = 0
  num_protected: int = 1

  @property
  def tokens_in(self) -> int:
    return self.layers[0].tokens_in

  @property
  def tokens_out(self) -> int:
    return self.layers[-1].tokens_out

  @property
  def fuses(self) -> bool:
    return any(plan.fuses for plan in self.layers)

  @property
  def tokens_per_layer(self) -> tuple[int, ...]:
    """Tokens entering each block, then the tokens leaving the last one."""
    return tuple(p.tokens_in for p in self.layers) + (self.tokens_out,)

  def unfused_prefix(self) -> int:
    """How many leading blocks fuse nothing."""
    return next((p.layer for p in self.layers if p.fuses), len(self.layers))

  def __str__(self) -> str:
    lines = [f"fusion schedule (r={self.r!r}): {self.tokens_in} -> {self.tokens_out} tokens",
             "  layer  tokens_in    r  (A->B, B->A)  tokens_out"]
    pitome = any(p.margin is not None for p in self.layers)
    if pitome:
      lines[1] = "  layer  tokens_in    r  margin  matching  tokens_out"
    for p in self.layers:
      if pitome:
        how = ("protects" if p.protect else "all") if p.fuses else ""
        margin = f"{p.margin:6.3f}" if p.fuses else ""
        lines.append(f"  {p.layer:5d}  {p.tokens_in:9d}  {p.r:3d}  {margin:>6s}  {how:>8s}  "
                     f"{p.tokens_out:10d}")
        continue
      split = f"({p.r_ab:3d}, {p.r_ba:3d})" if p.fuses else "          "
      lines.append(f"  {p.layer:5d}  {p.tokens_in:9d}  {p.r:3d}  {split:>12s}  "
                   f"{p.tokens_out:10d}")
    return "\n".join(lines)


def effective_r(r: int | float, tokens: int, num_protected: int = 1) -> int:
  """Tokens one fused layer removes from `tokens` tokens, as the reference computes it.

  A ratio r < 1 becomes int((tokens - protected) * r); never fuse below MIN_TOKENS tokens;
  never more than half of the unprotected tokens (bipartite matching merges each token of
  one half at most once).
  """
  if tokens - r < MIN_TOKENS:
    r = tokens - MIN_TOKENS
  if r < 1:
    r = int((tokens - num_protected) * r)
  r = min(int(r), (tokens - num_protected) // 2)
  # The reference breaks on a negative r (fewer than MIN_TOKENS tokens); it means no fusion.
  return max(r, 0)


def tome_r(r: int, tokens: int, num_protected: int = 1) -> int:
  """Tokens one ToMe block removes from `tokens` tokens: r, at most half of the
  unprotected tokens (ToMe has no lower bound on the token count)."""
  return max(min(int(r), (tokens - num_protected) // 2), 0)


def pitome_r(keep_ratio: float, tokens: int) -> int:
  """Tokens one PiToMe block merges away from `tokens` unprotected tokens, as its code
  computes it: floor(T - T * ratio) in double precision (not T * (1 - ratio), which is one
  less for some T); a keep ratio of 0 or 1 merges none."""
  if keep_ratio in (0, 1):
    return 0
  return max(math.floor(tokens - tokens * keep_ratio), 0)


def per_block_r(r, depth: int, inflection: float = 0.0) -> list:
  """The r of each of `depth` blocks before the token-count limits, as ToMe's ``parse_r``
  reads its forms: a per-block list (zeros beyond its end), or a count with an inflection
  (``fusion.inflection``), or the same r (count or ratio) everywhere."""
  if isinstance(r, tuple):
    if len(r) > depth:
      raise ConfigError(f"fusion.r lists {len(r)} per-block counts {list(r)!r} for a model "
                        f"of {depth} blocks")
    return list(r) + [0] * (depth - len(r))
  if not inflection:
    return [r] * depth
  low = int(r * (1.0 - inflection))
  step = (2 * r - 2 * low) / max(depth - 1, 1)
  return [int(low + step * layer) for layer in range(depth)]


def compute_schedule(fusion: FusionConfig, *, num_tokens: int, depth: int,
                     num_protected: int = 1, r=None) -> Schedule:
  """The schedule of a stack of `depth` blocks entered by `num_tokens` tokens, the first
  `num_protected` of which are never merged, under `fusion`, at fusion.r or at the r given
  (``fusion.inflection`` applies to either)."""
  r = fusion.r if r is None else normalize_r(r, "r", fusion.method)
  if not is_int(num_protected) or not 0 <= num_protected < num_tokens:
    raise ConfigError(f"num_protected={num_protected!r}: expected an int in "
                      f"[0, {num_tokens}) (the leading tokens never merged)")
  fusion.check_depth(depth)
  if fusion.inflection and not is_int(r):
    raise ConfigError(f"fusion.inflection={fusion.inflection!r} needs a token count r, "
                      f"got r={r!r}")
  if fusion.method == "pitome":
    return _pitome_schedule(fusion, r, num_tokens, depth, num_protected)
  block_r = per_block_r(r, depth, fusion.inflection)
  tokens = num_tokens
  plans = []
  for layer in range(depth):
    if layer in fusion.layers and block_r[layer] != 0:
      if fusion.method == "tome":
        n = tome_r(block_r[layer], tokens, num_protected)
      else:
        n = effective_r(block_r[layer], tokens, num_protected)
      if fusion.bidirectional:
        r_ab, r_ba = n // 2, n - n // 2
      else:
        r_ab, r_ba = n, 0
      plan = LayerPlan(layer, tokens, n, r_ab, r_ba)
    else:
      plan = LayerPlan(layer, tokens)
    plans.append(plan)
    tokens = plan.tokens_out
  return Schedule(tuple(plans), r, num_protected)


def pitome_block(fusion: FusionConfig, layer: int, depth: int) -> tuple[float, bool]:
  """(margin, protect) of PiToMe's block `layer` of `depth`: its energy margin, and whether
  it protects the low-energy tokens (the blocks after the first ceil(L/2))."""
  return pitome_margins(fusion.pitome_margin, depth)[layer], layer >= (depth + 1) // 2


def _pitome_schedule(fusion: FusionConfig, r, num_tokens: int, depth: int,
                     num_protected: int) -> Schedule:
  """PiToMe's schedule: block l keeps the fraction r (or r[l]) of its unprotected tokens,
  with the margin of ``pitome_margins``; the first ceil(L/2) blocks match all their
  tokens, the others protect the low-energy ones (its DeiT patch). A block whose count
  comes out 0 is an ordinary one."""
  if isinstance(r, tuple) and len(r) > depth:
    raise ConfigError(f"fusion.r lists {len(r)} per-block keep ratios {list(r)!r} for a model "
                      f"of {depth} blocks")
  ratios = list(r) + [1] * (depth - len(r)) if isinstance(r, tuple) else [r] * depth
  tokens = num_tokens
  plans = []
  for layer in range(depth):
    n = pitome_r(ratios[layer], tokens - num_protected) if layer in fusion.layers else 0
    if n:
      margin, protect = pitome_block(fusion, layer, depth)
      plan = LayerPlan(layer, tokens, n, n, 0, margin=margin, protect=protect)
    else:
      plan = LayerPlan(layer, tokens)
    plans.append(plan)
    tokens = plan.tokens_out
  return Schedule(tuple(plans), r, num_protected)
