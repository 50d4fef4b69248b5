"""One block's fusion step, at exact shapes or on padded arrays.

A step bundles what the block driver needs to fuse one block's tokens: the additive key
bias of its attention (proportional attention, or the mask of the padding) and the fusion
itself, scores -> matching -> merge, returning the new ``TokenState`` and what the
one-step-ahead attention reuses (``Merge``). ``ExactStep`` merges a static number of
tokens (a ``LayerPlan``); ``PaddedStep`` merges runtime counts on padded arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mctf_jax.fusion.config import FusionConfig
from mctf_jax.fusion.matching import Matching, bipartite_matching, bipartite_matching_padded
from mctf_jax.fusion.merge import fuse_tokens, update_token_map
from mctf_jax.fusion.padded import pad_tokens
from mctf_jax.fusion.pitome import pitome_matching, pitome_matching_padded
from mctf_jax.fusion.schedule import LayerPlan
from mctf_jax.fusion.scores import attention_received, matching_scores, similarity_scores


class TokenState(NamedTuple):
  """What flows from block to block.

  x_BxTxC: the tokens.
  size_BxT: how many initial tokens each token holds; None until the first fusion (all one).
    On padded arrays it is never None, and 0 on the padding.
  token_map_BxN: index of the token holding each initial token; None unless traced.
  """
  x_BxTxC: jax.Array
  size_BxT: jax.Array | None = None
  token_map_BxN: jax.Array | None = None


class Merge(NamedTuple):
  """What a fusion step hands to the one-step-ahead attention: the matching, the pooling
  weights and normalisers (None for max pooling) and the merge implementation."""
  matching: Matching
  weights_BxT: jax.Array | None
  norm_BxO: jax.Array | None
  impl: str


def resolve_merge_impl(impl: str, platform: str | None = None) -> str:
  """'auto' -> 'matmul' on TPU (one-hot products for the MXU), 'scatter' elsewhere.

  platform: the devices the program is for ('cpu', 'gpu', 'tpu'); default: JAX's default
  backend, which is the host's when a TPU program is compiled ahead of time on a CPU host
  (``training.programs.model_for_mesh`` passes the mesh's platform).
  """
  if impl != "auto":
    return impl
  platform = jax.default_backend() if platform is None else platform
  return "matmul" if platform == "tpu" else "scatter"


def _scores(config: FusionConfig, metric_BxTxC, received_BxT, size_BxT, num_protected: int,
            valid_BxT=None):
  if config.method == "tome":
    return similarity_scores(metric_BxTxC, num_protected=num_protected, valid_BxT=valid_BxT)
  return matching_scores(metric_BxTxC, attn_received_BxT=received_BxT, size_BxT=size_BxT,
                         tau_sim=config.tau_sim, tau_info=config.tau_info,
                         tau_size=config.tau_size, num_protected=num_protected,
                         valid_BxT=valid_BxT)


@dataclasses.dataclass(frozen=True)
class ExactStep:
  """The fusion of one block at exact shapes, as its LayerPlan says (r = 0: no fusion).

  token_major: keep the fused tokens token-major in memory ('matmul' merges;
  ``merge.keep_token_major``), for inference programs.
  """
  config: FusionConfig
  plan: LayerPlan
  num_protected: int = 1
  token_major: bool = False

  @property
  def fuses(self) -> bool:
    return self.plan.fuses

  def key_bias(self, size_BxT):
    """Proportional attention: log(size) on the keys, once there are sizes."""
    if self.config.prop_attn and size_BxT is not None:
      return jnp.log(size_BxT)
    return None

  def __call__(self, state: TokenState, metric_BxTxC, probs_BxHxTxT) -> tuple[TokenState, Merge]:
    cfg, plan = self.config, self.plan
    impl = resolve_merge_impl(cfg.merge_impl)
    batch, tokens = state.x_BxTxC.shape[:2]
    received_BxT = None
    if probs_BxHxTxT is not None:
      # From the probabilities as they come (float32 at least): a copy rounded to a 16-bit
      # compute dtype would be one more (T, T) map per fusing block in a train step.
      received_BxT = attention_received(probs_BxHxTxT)
    if cfg.method == "pitome":
      match = pitome_matching(metric_BxTxC, r=plan.r, margin=plan.margin, protect=plan.protect,
                              num_protected=self.num_protected)
    else:
      scores = _scores(cfg, metric_BxTxC, received_BxT, state.size_BxT, self.num_protected)
      match = bipartite_matching(scores, r_ab=plan.r_ab, r_ba=plan.r_ba,
                                 bidirectional=cfg.bidirectional,
                                 num_protected=self.num_protected)
    size_BxT = state.size_BxT
    if size_BxT is None:
      size_BxT = jnp.ones((batch, tokens), jnp.promote_types(state.x_BxTxC.dtype, jnp.float32))
    x, size, weights, norm = fuse_tokens(state.x_BxTxC, size_BxT, match, pooling=cfg.pooling,
                                         attn_received_BxT=received_BxT, impl=impl,
                                         token_major=self.token_major)
    token_map = state.token_map_BxN
    if token_map is not None:
      token_map = update_token_map(token_map, match.dest_BxT)
    return TokenState(x, size, token_map), Merge(match, weights, norm, impl)


@dataclasses.dataclass(frozen=True, eq=False)
class PaddedStep:
  """The fusion of one block on padded arrays (``mctf_jax.fusion.padded``).

  fuses: whether the block fuses. splits: (r_ab, r_ba) as runtime int32 scalars, shape (2,),
  or (B, 2) for counts per example. width_out: the width of the array the fused tokens
  leave in. fusion_width: the width every matching runs at. max_moved: a static bound on
  r_ab + r_ba. The state's sizes are 0 on the padding. Max pooling is not supported.
  margin, protect: method 'pitome': the block's energy margin and kind
  (``schedule.pitome_block``).
  """
  config: FusionConfig
  fuses: bool
  splits: Any
  width_out: int
  fusion_width: int
  max_moved: int
  num_protected: int = 1
  margin: float | None = None
  protect: bool = False

  def __post_init__(self):
    if self.fuses and self.config.pooling == "max":
      raise ValueError("padded blocks do not support pooling='max'")
    if self.fuses and self.config.method == "pitome" and self.margin is None:
      raise ValueError("a padded PiToMe block needs its margin (schedule.pitome_block)")

  def key_bias(self, size_BxT):
    """Proportional attention, or (without it) a mask: padding keys (size 0) get -inf."""
    if self.config.prop_attn:
      return jnp.log(size_BxT)
    return jnp.where(size_BxT > 0, 0.0, -jnp.inf).astype(size_BxT.dtype)

  def __call__(self, state: TokenState, metric_BxTxC, probs_BxHxTxT) -> tuple[TokenState, Merge]:
    cfg, wide = self.config, self.fusion_width
    impl = resolve_merge_impl(cfg.merge_impl)
    width_in = state.x_BxTxC.shape[1]
    valid_BxT = state.size_BxT > 0
    received_BxT = None
    if probs_BxHxTxT is not None:
      received_BxT = attention_received(probs_BxHxTxT, valid_BxT)
    valid_wide = pad_tokens(valid_BxT, wide, False)
    if cfg.method == "pitome":
      match, valid_BxO = pitome_matching_padded(
          pad_tokens(metric_BxTxC, wide), valid_wide, self.splits[..., 0], margin=self.margin,
          protect=self.protect, num_in=width_in, num_out=self.width_out,
          max_moved=self.max_moved, num_protected=self.num_protected)
    else:
      received_wide = None if received_BxT is None else pad_tokens(received_BxT, wide, 1)
      scores = _scores(cfg, pad_tokens(metric_BxTxC, wide), received_wide,
                       pad_tokens(state.size_BxT, wide, 1), self.num_protected, valid_wide)
      match, valid_BxO = bipartite_matching_padded(
          scores, valid_wide, self.splits[..., 0], self.splits[..., 1], num_in=width_in,
          num_out=self.width_out, max_moved=self.max_moved, bidirectional=cfg.bidirectional,
          num_protected=self.num_protected)
    x, size, weights, norm = fuse_tokens(state.x_BxTxC, state.size_BxT, match,
                                         pooling=cfg.pooling, attn_received_BxT=received_BxT,
                                         impl=impl)
    x = jnp.where(valid_BxO[..., None], x, 0)
    size = jnp.where(valid_BxO, size, 0)
    return TokenState(x, size, None), Merge(match, weights, norm, impl)
