"""The block driver: one pre-norm transformer block through MCTF's one-step-ahead modes.

``run_block(block, state, step)`` runs any block that offers the protocol below, with the
fusion `step` (``ExactStep`` or ``PaddedStep``) of that block. The block is a bound Flax
module of the backbone's own; the driver only calls these members:

    block.norm1(x_BxTxC) -> h_BxTxC                  the attention branch's norm
    block.attention_probs(h_BxTxC, bias_BxT) -> probs_BxHxTxT
        softmax(q k^T * scale + bias on the keys), float32 at least; bias is None or an
        additive key bias (log size for proportional attention, -inf on padding)
    block.attention_values(h_BxTxC) -> v_BxHxTxd    the values, head-major
    block.attention_probs_and_keys(h_BxTxC, bias_BxT) -> (probs_BxHxTxT, k_BxHxTxd)
        the probabilities and the keys they came from, head-major (only
        fusion.method 'tome' and 'pitome' call it, instead of attention_probs: their metric)
    block.attention_output(out_BxTxHxd, deterministic) -> y_BxTxC
        the heads joined and projected (and the projection's dropout)
    block.norm2(x_BxTxC) -> h_BxTxC                  the MLP branch's norm
    block.mlp(h_BxTxC, deterministic) -> y_BxTxC
    block.residual(x_BxTxC, y_BxTxC, branch) -> x_BxTxC
        adds a branch (0: attention, 1: MLP) to the residual stream: x + y, or scaled
        (LV-ViT: x + y / skip_lam)
    block.drop_path(y_BxTxC, deterministic) -> y_BxTxC
        stochastic depth of a branch: a submodule that drops whole examples with the
        block's rate ``block.drop_path_rate``, drawing its key with ``make_rng('dropout')``
        once per call (``nn.Dropout(rate, broadcast_dims=(1, 2))``); the scanned stack
        reproduces these keys (``stack.scan_blocks``)

The three modes (``fusion.one_step_ahead``) on a block that fuses:

* 'approx' (MCTF): attention probabilities of the unfused tokens; fuse with them; the
  fused tokens attend with the merged map (``merge.merged_attention_output``);
* 'precise': fuse with the attention (no gradient through the criterion), then attend
  afresh on the fused tokens;
* 'off': an ordinary block, then its output is fused with that block's attention.

With ``fusion.method='tome'`` a fusing block is ToMe's: the attention on the unfused
tokens, then the fusion with the attention's keys averaged over heads as the metric, then
the MLP on the fused tokens. ``fusion.method='pitome'`` runs the same block with PiToMe's
matching (``fusion.pitome``).

Every protocol call runs in a ``vit_<part>`` named scope (``scopes.PARTS``), so profiles
split any backbone's time by part.
"""

from __future__ import annotations

from typing import Callable

import jax

from mctf_jax.fusion.merge import attend, merged_attention_output
from mctf_jax.fusion.scopes import fusion_scope, part_scope
from mctf_jax.fusion.steps import TokenState


def run_block(block, state: TokenState, step, deterministic: bool = True,
              drop_path: Callable | None = None) -> TokenState:
  """Runs `block` (see the protocol above) on `state`, fusing as `step` says.

  drop_path(y, branch): stochastic depth of the branch's output instead of the block's
  own ``block.drop_path`` (``stack.scan_blocks`` gives one with a run-time rate).
  """
  mode = None
  if step.fuses:
    # PiToMe merges where ToMe does, on the same metric (its matching differs: steps.py).
    mode = "tome" if step.config.method in ("tome", "pitome") else step.config.one_step_ahead
  x = state.x_BxTxC

  def probs_of(h, size):
    with part_scope("qk_softmax"):
      return block.attention_probs(h, step.key_bias(size))

  def values_of(h):
    with part_scope("values"):
      return block.attention_values(h)

  def norm1(x):
    with part_scope("norm"):
      return block.norm1(x)

  h = norm1(x)
  if mode == "tome":
    with part_scope("qk_softmax"):
      probs, keys = _probs_and_keys(block)(h, step.key_bias(state.size_BxT))
  else:
    probs = probs_of(h, state.size_BxT)
  if mode == "approx":
    # Fuse with this block's attention, then reuse that attention, merged.
    state, merge = step(state, x, probs)
    v = values_of(norm1(state.x_BxTxC))
    out = merged_attention_output(probs, v, merge.matching, merge.weights_BxT, merge.norm_BxO,
                                  impl=merge.impl)
  elif mode == "precise":
    # Fuse with this block's attention (no gradient), recompute it on the fused tokens.
    state, _ = step(state, x, jax.lax.stop_gradient(probs))
    h = norm1(state.x_BxTxC)
    out = attend(probs_of(h, state.size_BxT), values_of(h))
  else:
    out = attend(probs, values_of(h))

  drop = drop_path or (lambda y, _: block.drop_path(y, deterministic))
  with part_scope("proj"):
    y = block.attention_output(out, deterministic)
  x = block.residual(state.x_BxTxC, drop(y, 0), 0)
  if mode == "tome":
    # ToMe: fuse between the attention and the MLP, by the keys' similarity.
    with fusion_scope("scores"):
      metric = keys.mean(axis=1)
    state, _ = step(state._replace(x_BxTxC=x), metric, None)
    x = state.x_BxTxC
  with part_scope("norm"):
    h = block.norm2(x)
  with part_scope("mlp"):
    y = block.mlp(h, deterministic)
  x = block.residual(x, drop(y, 1), 1)
  state = state._replace(x_BxTxC=x)

  if mode == "off":
    # An ordinary block; its output is fused with its attention map.
    state, _ = step(state, x, probs)
  return state


def _probs_and_keys(block):
  method = getattr(block, "attention_probs_and_keys", None)
  if method is None:
    raise TypeError(f"{type(block).__name__} has no attention_probs_and_keys(h, bias), which "
                    f"fusion.method 'tome' and 'pitome' need (their metric is the keys)")
  return method
