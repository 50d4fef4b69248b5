"""The fusion settings: ``FusionConfig``, a validated, hashable dataclass.

The ml_collections ``config.fusion`` section is turned into one of these once (see
``mctf_jax.config.fusion_config``), every field checked, so that the modules and the
drivers get immutable settings and a bad value fails before tracing, naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mctf_jax.errors import ConfigError, is_int, is_number

METHODS = ("mctf", "tome", "pitome")
ONE_STEP_AHEAD_MODES = ("off", "approx", "precise")
POOLING_MODES = ("size", "attn", "max", "mean")
MERGE_IMPLS = ("auto", "scatter", "matmul")

# The paper's "ToMe-like" ablation: MCTF's code path with the informativeness and size
# criteria, the bidirectional matching and the one-step-ahead attention switched off.
TOME_LIKE_PRESET = dict(one_step_ahead="off", tau_sim=1.0, tau_info=0.0, tau_size=0.0,
                        bidirectional=False, pooling="size", prop_attn=True, teacher_r_max=0.0)

# method='tome' merges as ToMe (Bolya et al. 2023) does; these MCTF fields then have no
# effect and must keep the values that describe what ToMe does.
TOME_FIXED = dict(one_step_ahead="off", tau_sim=1.0, tau_info=0.0, tau_size=0.0,
                  bidirectional=False, pooling="size")


# method='pitome' merges as PiToMe (Tran et al. 2024) does: between the attention and the
# MLP, size-weighted, one-directional, no proportional attention; these MCTF fields keep
# the values that say so.
PITOME_FIXED = dict(one_step_ahead="off", tau_sim=1.0, tau_info=0.0, tau_size=0.0,
                    bidirectional=False, pooling="size", prop_attn=False)
# PiToMe's own DeiT setting: every block keeps this fraction of its tokens, and block l of
# L has the energy margin m - m l / L with this m.
PITOME_KEEP_RATIO = 0.925
PITOME_MARGIN = 0.75


def normalize_keep_ratio(r, name: str = "fusion.r") -> int | float | tuple:
  """Checks PiToMe's r, the fraction of its tokens each block keeps (PiToMe's `ratio`).

  A value in [0.5, 1) keeps that fraction: a block of T unprotected tokens merges
  floor(T - T * r) of them. 0 (the plain model) and 1 merge nothing. A list or tuple gives
  each block its own fraction (the blocks beyond its end keep everything). PiToMe cannot
  run below 0.5: its protected blocks take 2 r' candidates out of T tokens.
  """
  if isinstance(r, (list, tuple)):
    return tuple(normalize_keep_ratio(v, f"{name}[{i}]") for i, v in enumerate(r))
  if not is_number(r) or (isinstance(r, float) and not math.isfinite(r)):
    raise ConfigError(f"{name} must be PiToMe's keep ratio, a number in [0.5, 1] (0: no "
                      f"fusion), got {r!r}")
  if r == 0 or r == 1:
    return int(r)
  if not 0.5 <= r < 1:
    raise ConfigError(f"{name}={r!r}: with fusion.method='pitome' r is the fraction of the "
                      f"tokens each block keeps (PiToMe's ratio), in [0.5, 1]; 0 or 1 for "
                      f"no fusion")
  return float(r)


def pitome_margins(margin, depth: int) -> tuple[float, ...]:
  """The energy margin of each of `depth` blocks: a number m gives PiToMe's schedule
  m - m l / L (as its DeiT patch computes it), a sequence one margin per block."""
  if isinstance(margin, tuple):
    if len(margin) != depth:
      raise ConfigError(f"fusion.pitome_margin lists {len(margin)} per-block margins "
                        f"{list(margin)!r} for a model of {depth} blocks")
    return margin
  return tuple(margin - margin * layer / depth for layer in range(depth))


def normalize_r(r, name: str = "fusion.r",
                method: str = "mctf") -> int | float | tuple[int, ...]:
  """Checks an r and returns it as an int count, a float ratio in (0, 1) or a tuple of
  per-block counts; for method 'pitome', a keep ratio (``normalize_keep_ratio``).

  r >= 1 is a number of tokens removed per fused layer and must be a whole number
  (16 or 16.0); 0 < r < 1 is a ratio of the tokens (MCTF-Fast's 0.35); 0 disables fusion.
  A list or tuple gives each block its own count (ToMe's list form: entry l for block l,
  the blocks beyond its end remove none).
  """
  if method == "pitome":
    return normalize_keep_ratio(r, name)
  if isinstance(r, (list, tuple)):
    counts = tuple(normalize_r(v, f"{name}[{i}]") for i, v in enumerate(r))
    ratios = [v for v in counts if isinstance(v, float)]
    if ratios:
      raise ConfigError(f"{name}={list(r)!r}: a per-block list holds token counts (whole "
                        f"numbers >= 0), not ratios such as {ratios[0]!r}")
    return counts
  if not is_number(r):
    raise ConfigError(f"{name} must be a number (a token count >= 0 or a ratio in (0, 1)), "
                      f"got {r!r} of type {type(r).__name__}")
  if isinstance(r, float) and not math.isfinite(r):
    raise ConfigError(f"{name} must be finite, got {r!r}")
  if r < 0:
    raise ConfigError(f"{name} must be >= 0 (tokens removed per fused layer), got {r!r}")
  if r >= 1:
    if r != int(r):
      raise ConfigError(f"{name}={r!r}: a value >= 1 is a token count and must be a whole "
                        f"number; use a value in (0, 1) for a ratio of the tokens")
    return int(r)
  if r == 0:
    return 0
  return float(r)


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  """Multi-criteria token fusion (MCTF); see REFERENCE.md for what each field does.

  method: 'mctf' (multi-criteria fusion, the one-step-ahead modes below) or 'tome' (ToMe
    itself: every fusing block merges between its attention and its MLP, by the
    similarity of the attention's keys averaged over heads, one-directional, size-weighted;
    the fields in ``TOME_FIXED`` then keep ToMe's values).
  r: tokens removed at each fused layer (int), a ratio of the tokens (0 < r < 1), or a
    per-block list of counts (ToMe's list form; a positive entry needs its block in
    `layers`).
  inflection: ToMe's decreasing schedule, its ``(r, inflection)`` form: block l of D removes
    int(a + (b - a) * l / (D - 1)) with a = int(r * (1 - inflection)), b = 2 r - a, so
    that the counts still total about D * r; 0 is a constant r (needs an int r).
  layers: 0-based indices of the blocks that fuse.
  one_step_ahead: 'approx' (merge the attention map and reuse it), 'precise' (recompute the
    attention on the fused tokens) or 'off' (fuse the block's output).
  pooling: how tokens are averaged: 'size' (size-weighted), 'attn' (attention- and size-
    weighted), 'max' or 'mean'.
  merge_impl: how merges are computed: 'scatter' (gather + segment sums, best on CPU/GPU),
    'matmul' (products with the 0/1 matrix of destinations, no gather or scatter: for TPUs)
    or 'auto' (chosen for the devices the program runs on). The results agree to rounding.
  train_token_step: how the train step shapes the teacher's token arrays
    (``mctf_jax.fusion.padded``). None (default): every r' runs at the full input width,
    padding standing in for the merged tokens, so one compiled program serves every r' > 0
    (the merge counts are runtime values). k > 0: widths on a grid of step k (more
    programs, less padding). 0: one program per r' at exact token counts. The student,
    and evaluation, always run at exact counts.
  teacher_group_size: the train step draws its own r' for each group of this many
    consecutive examples of the global batch, as the official code draws one per GPU (its
    recipe: 8 GPUs x 128 images, so 128 reproduces it). 0, or a batch no larger than it:
    one r' for the whole batch. Several groups need the padded teacher
    (train_token_step None or > 0).
  target_gflops: a FLOP budget (GFLOPs per image, counted as fvcore counts the official
    code: ``mctf_jax.cost``) that picks r instead of the r given: the r, of the
    kind fusion.r is (a count; a ratio if fusion.r is one), whose FLOPs come closest to
    the budget from below (``mctf_jax.cost.apply_budget``; ``create_model`` applies
    it). 0: no budget.
  target_fraction: the same budget as a fraction in (0, 1] of the unfused model's FLOPs.
  teacher_r_max: the consistency teacher's largest r' (see REFERENCE.md); 0: no teacher.
    For method 'pitome' the least keep ratio the teacher draws, in [0.5, 1) (its r' are 0,
    i.e. no fusion, and 0.99, 0.98, ... down to it).
  pitome_margin: method 'pitome': the energy margin, a number m for PiToMe's schedule
    m - m l / L over the L blocks (its DeiT setting: 0.75), or one margin per block, each
    in [-1, 1] (a cosine similarity's range).
  train_scan_blocks: in the train step's padded paths, run each stretch of alike blocks
    (same array width in and out, all fusing or none: at full width, the teacher's fused
    blocks) as one ``lax.scan`` over stacked parameters, so that XLA compiles and
    schedules one block instead of each. The results are the same (stochastic depth too;
    dropout, if on, draws other keys). False unrolls them.
  """
  r: int | float | tuple[int, ...] = 16
  layers: tuple[int, ...] = ()
  method: str = "mctf"
  inflection: float = 0.0
  prop_attn: bool = True
  one_step_ahead: str = "approx"
  tau_sim: float = 1.0
  tau_info: float = 20.0
  tau_size: float = 40.0
  bidirectional: bool = True
  pooling: str = "attn"
  trace_source: bool = False
  teacher_r_max: int | float = 0
  merge_impl: str = "auto"
  train_token_step: int | None = None
  teacher_group_size: int = 0
  train_scan_blocks: bool = True
  target_gflops: float = 0.0
  target_fraction: float = 0.0
  pitome_margin: float | tuple[float, ...] = PITOME_MARGIN
  # How a FLOP budget chose r (mctf_jax.cost.BudgetChoice), kept by create_model; not a
  # setting (neither compared nor hashed), and dropped when a change may move the FLOPs.
  budget_choice: Any = dataclasses.field(default=None, compare=False, repr=False,
                                         metadata={"internal": True})

  # Fields whose change leaves the FLOPs, and so a budget choice, as they were.
  FLOP_NEUTRAL = ("merge_impl", "trace_source", "train_token_step", "train_scan_blocks",
                  "teacher_r_max", "teacher_group_size", "budget_choice")

  def with_changes(self, **changes) -> "FusionConfig":
    """dataclasses.replace, dropping the budget choice unless every change is FLOP-neutral."""
    if any(name not in self.FLOP_NEUTRAL for name in changes):
      changes.setdefault("budget_choice", None)
    return dataclasses.replace(self, **changes)

  def __post_init__(self):
    object.__setattr__(self, "r", normalize_r(self.r, "fusion.r", self.method))
    object.__setattr__(self, "teacher_r_max",
                       normalize_r(self.teacher_r_max, "fusion.teacher_r_max", self.method))
    layers = self.layers
    if is_int(layers):
      layers = (layers,)
    try:
      layers = tuple(layers)
    except TypeError:
      raise ConfigError(f"fusion.layers must be a sequence of block indices, got {layers!r}")
    bad = [l for l in layers if not is_int(l)]
    if bad:
      raise ConfigError(f"fusion.layers must hold integer block indices, got {bad!r} "
                        f"in {layers!r}")
    repeated = sorted({l for l in layers if layers.count(l) > 1})
    if repeated:
      raise ConfigError(f"fusion.layers lists block(s) {repeated} more than once: {layers!r}")
    object.__setattr__(self, "layers", tuple(sorted(layers)))
    if isinstance(self.r, tuple):
      merges = (lambda n: n not in (0, 1)) if self.method == "pitome" else bool
      outside = [l for l, n in enumerate(self.r) if merges(n) and l not in layers]
      if outside:
        raise ConfigError(f"fusion.r={list(self.r)!r} removes tokens at block(s) {outside}, "
                          f"which fusion.layers={list(self.layers)!r} does not list")
    if isinstance(self.teacher_r_max, tuple):
      raise ConfigError(f"fusion.teacher_r_max must be a count or a ratio, got "
                        f"{list(self.teacher_r_max)!r}")
    inflection = self.inflection
    if not is_number(inflection) or not math.isfinite(inflection):
      raise ConfigError(f"fusion.inflection must be a finite number (0: constant r), "
                        f"got {inflection!r}")
    if inflection and not is_int(self.r):
      raise ConfigError(f"fusion.inflection={inflection!r} makes a decreasing schedule from a "
                        f"token count r; fusion.r={self.r!r} is not one")
    if self.method not in METHODS:
      raise ConfigError(f"fusion.method must be one of {METHODS}, got {self.method!r}")
    if self.one_step_ahead not in ONE_STEP_AHEAD_MODES:
      raise ConfigError(f"fusion.one_step_ahead must be one of {ONE_STEP_AHEAD_MODES}, "
                        f"got {self.one_step_ahead!r}")
    if self.pooling not in POOLING_MODES:
      raise ConfigError(f"fusion.pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
    if self.merge_impl not in MERGE_IMPLS:
      raise ConfigError(f"fusion.merge_impl must be one of {MERGE_IMPLS}, "
                        f"got {self.merge_impl!r}")
    for name in ("tau_sim", "tau_info", "tau_size"):
      value = getattr(self, name)
      if not is_number(value) or value < 0 or not math.isfinite(value):
        raise ConfigError(f"fusion.{name} must be a finite number >= 0 (0 switches the "
                          f"criterion off), got {value!r}")
    step = self.train_token_step
    if step is not None and (not is_int(step) or step < 0):
      raise ConfigError(f"fusion.train_token_step must be None (full width), 0 (exact token "
                        f"counts) or a grid step > 0, got {step!r}")
    group = self.teacher_group_size
    if not is_int(group) or group < 0:
      raise ConfigError(f"fusion.teacher_group_size must be an integer >= 0 (0: one r' for "
                        f"the whole batch), got {group!r}")
    for name in ("prop_attn", "bidirectional", "trace_source", "train_scan_blocks"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"fusion.{name} must be True or False, got {getattr(self, name)!r}")
    for name in ("target_gflops", "target_fraction"):
      value = getattr(self, name)
      if not is_number(value) or value < 0 or not math.isfinite(value):
        raise ConfigError(f"fusion.{name} must be a finite number >= 0 (0: no FLOP budget), "
                          f"got {value!r}")
    if self.target_fraction > 1:
      raise ConfigError(f"fusion.target_fraction={self.target_fraction!r} is a fraction of the "
                        f"unfused model's FLOPs: expected a value in (0, 1]")
    if self.target_gflops and self.target_fraction:
      raise ConfigError(f"fusion.target_gflops={self.target_gflops!r} and "
                        f"fusion.target_fraction={self.target_fraction!r} both set a FLOP "
                        f"budget; set one of them (the other 0)")
    if self.has_budget and isinstance(self.r, tuple):
      raise ConfigError(f"a FLOP budget (fusion.target_gflops / target_fraction) chooses one "
                        f"r for every fused block; fusion.r={list(self.r)!r} is a per-block "
                        f"list: give a count or a ratio")
    if self.method == "tome":
      if isinstance(self.r, float):
        raise ConfigError(f"fusion.method='tome' takes token counts (ToMe's r), not the "
                          f"ratio fusion.r={self.r!r}")
      other = {k: getattr(self, k) for k, v in TOME_FIXED.items() if getattr(self, k) != v}
      if other:
        raise ConfigError(
            f"fusion.method='tome' merges as ToMe does, so these MCTF fields have no effect "
            f"and must read {TOME_FIXED}; got {other}")

    margin = self.pitome_margin
    if isinstance(margin, list):
      margin = tuple(margin)
    values = margin if isinstance(margin, tuple) else (margin,)
    if not values or any(not is_number(m) or not math.isfinite(m) or not -1 <= m <= 1
                         for m in values):
      raise ConfigError(f"fusion.pitome_margin must be a number in [-1, 1] (PiToMe's schedule "
                        f"m - m l / L) or one such margin per block, got {self.pitome_margin!r}")
    object.__setattr__(self, "pitome_margin", tuple(float(m) for m in margin)
                       if isinstance(margin, tuple) else float(margin))
    if self.method == "pitome":
      other = {k: getattr(self, k) for k, v in PITOME_FIXED.items() if getattr(self, k) != v}
      if other:
        raise ConfigError(
            f"fusion.method='pitome' merges as PiToMe does, so these MCTF fields have no "
            f"effect and must read {PITOME_FIXED}; got {other}")
      if self.inflection:
        raise ConfigError(f"fusion.inflection={self.inflection!r} shapes ToMe's and MCTF's "
                          f"token counts; fusion.method='pitome' takes a keep ratio per block")

  @classmethod
  def pitome(cls, r: float | tuple = PITOME_KEEP_RATIO, layers=(), **changes) -> "FusionConfig":
    """PiToMe itself (method 'pitome'), keeping the fraction r of the tokens in `layers`."""
    return cls(r=r, layers=layers, **{**PITOME_FIXED, "method": "pitome",
                                      "teacher_r_max": 0, **changes})

  @classmethod
  def tome(cls, r: int | tuple[int, ...] = 13, layers=(), **changes) -> "FusionConfig":
    """ToMe itself (method 'tome') at r on `layers`."""
    return cls(r=r, layers=layers, **{**TOME_FIXED, "method": "tome", "prop_attn": True,
                                      "teacher_r_max": 0, **changes})

  @classmethod
  def tome_like(cls, r: int | float = 13, layers=(), **changes) -> "FusionConfig":
    """The paper's ToMe-like ablation: MCTF's code path with similarity only,
    one-directional, no one-step-ahead attention."""
    return cls(r=r, layers=layers, **{**TOME_LIKE_PRESET, **changes})

  @property
  def has_budget(self) -> bool:
    """Whether a FLOP budget (target_gflops or target_fraction) picks r."""
    return bool(self.target_gflops or self.target_fraction)

  def check_depth(self, depth: int) -> None:
    out_of_range = [l for l in self.layers if not 0 <= l < depth]
    if out_of_range:
      raise ConfigError(f"fusion.layers {list(out_of_range)} out of range: the model has "
                        f"{depth} blocks, so valid indices are 0..{depth - 1}")
