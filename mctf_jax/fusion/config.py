"""The fusion settings: ``FusionConfig``, a validated, hashable dataclass.

The ml_collections ``config.fusion`` section is turned into one of these once (see
``mctf_jax.config.fusion_config``), every field checked, so that the modules and the
drivers get immutable settings and a bad value fails before tracing, naming the field.
"""

from __future__ import annotations

import dataclasses
import math

from mctf_jax.errors import ConfigError, is_int, is_number

ONE_STEP_AHEAD_MODES = ("off", "approx", "precise")
POOLING_MODES = ("size", "attn", "max", "mean")
MERGE_IMPLS = ("auto", "scatter", "matmul")

# ToMe (Bolya et al. 2023) as MCTF with the informativeness and size criteria, the
# bidirectional matching and the one-step-ahead attention switched off.
TOME_PRESET = dict(one_step_ahead="off", tau_sim=1.0, tau_info=0.0, tau_size=0.0,
                   bidirectional=False, pooling="size", prop_attn=True, teacher_r_max=0.0)


def normalize_r(r, name: str = "fusion.r") -> int | float:
  """Checks an r and returns it as an int count or a float ratio in (0, 1).

  r >= 1 is a number of tokens removed per fused layer and must be a whole number
  (16 or 16.0); 0 < r < 1 is a ratio of the tokens (MCTF-Fast's 0.35); 0 disables fusion.
  """
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

  r: tokens removed at each fused layer (int) or a ratio of the tokens (0 < r < 1).
  layers: 0-based indices of the blocks that fuse.
  one_step_ahead: 'approx' (merge the attention map and reuse it), 'precise' (recompute the
    attention on the fused tokens) or 'off' (fuse the block's output).
  pooling: how tokens are averaged: 'size' (size-weighted), 'attn' (attention- and size-
    weighted), 'max' or 'mean'.
  merge_impl: how merges are computed: 'scatter' (gather + segment sums, best on CPU/GPU),
    'matmul' (one-hot matrix products, best on TPU) or 'auto' (chosen from the backend).
    The results agree to rounding.
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
  train_scan_blocks: in the train step's padded paths, run each stretch of alike blocks
    (same array width in and out, all fusing or none: at full width, the teacher's fused
    blocks) as one ``lax.scan`` over stacked parameters, so that XLA compiles and
    schedules one block instead of each. The results are the same (stochastic depth too;
    dropout, if on, draws other keys). False unrolls them.
  """
  r: int | float = 16
  layers: tuple[int, ...] = ()
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

  def __post_init__(self):
    object.__setattr__(self, "r", normalize_r(self.r, "fusion.r"))
    object.__setattr__(self, "teacher_r_max",
                       normalize_r(self.teacher_r_max, "fusion.teacher_r_max"))
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

  @classmethod
  def tome(cls, r: int | float = 13, layers=(), **changes) -> "FusionConfig":
    """ToMe as a special case of MCTF: similarity only, one-directional, no one-step-ahead."""
    return cls(r=r, layers=layers, **{**TOME_PRESET, **changes})

  def check_depth(self, depth: int) -> None:
    out_of_range = [l for l in self.layers if not 0 <= l < depth]
    if out_of_range:
      raise ConfigError(f"fusion.layers {list(out_of_range)} out of range: the model has "
                        f"{depth} blocks, so valid indices are 0..{depth - 1}")
