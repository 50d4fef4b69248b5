"""The stack driver: a backbone's blocks run as a schedule or a padded layout says.

* ``run_unfused``: the leading blocks as ordinary blocks (the train step runs the blocks
  that no path fuses once, for the student and the teacher);
* ``run_exact``: blocks at exact token counts, fusing as a ``Schedule`` says;
* ``run_padded``: blocks on padded arrays of the widths of a ``PaddedLayout``, with the
  merge counts as a runtime table; runs of alike blocks go through ``scan_blocks``, one
  ``lax.scan`` over their stacked parameters, built from the backbone's own block.

`blocks` is the backbone's sequence of bound block modules (the protocol of
``fusion.block``). Blocks hold only parameters (no state such as BatchNorm statistics).

remat_policy (``model.remat_policy``, a name in ``REMAT_POLICIES``): each block runs under
``jax.checkpoint`` with that policy (Flax's lifted ``nn.remat`` on a bound block, the scan's
body in ``scan_blocks``), so the backward pass recomputes what the policy does not save
instead of holding every block's activations; the results are the same.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mctf_jax.errors import ConfigError
from mctf_jax.fusion.block import run_block
from mctf_jax.fusion.config import FusionConfig
from mctf_jax.fusion.padded import PaddedLayout, alike_runs
from mctf_jax.fusion.schedule import LayerPlan, Schedule, pitome_block
from mctf_jax.fusion.steps import ExactStep, PaddedStep, TokenState


# Rematerialisation of each block, by name (big_vision's ViT offers the same choice): what
# jax.checkpoint saves for the backward pass ('none': no remat, everything is kept).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,        # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,         # keep the matmuls' outputs
    # keep the weight matmuls' outputs, recompute the attention's (big_vision's usual one)
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(name, field: str = "model.remat_policy") -> None:
  """ConfigError unless `name` is one of ``REMAT_POLICIES``."""
  if not isinstance(name, str) or name not in REMAT_POLICIES:
    raise ConfigError(f"{field} must be one of {tuple(REMAT_POLICIES)}, got {name!r}")


def _remat_policy(name: str):
  check_remat_policy(name, "remat_policy")
  return REMAT_POLICIES[name]


def _run_block(block, state: TokenState, step, deterministic: bool,
               remat_policy: str) -> TokenState:
  """``run_block``, under Flax's lifted ``nn.remat`` unless remat_policy is 'none'. The
  step and `deterministic` are closed over (static values; a PaddedStep's runtime splits
  become inputs of the checkpoint); the lifted transform carries the block's random
  streams through, so stochastic depth draws the keys it draws without remat."""
  policy = _remat_policy(remat_policy)
  if policy is None:
    return run_block(block, state, step, deterministic)

  def rematted(module, state):
    return run_block(module, state, step, deterministic)
  return nn.remat(rematted, policy=policy)(block, state)


def check_unfused(schedule: Schedule, stop: int) -> None:
  """ValueError unless blocks 0 .. stop-1 fuse nothing in `schedule`."""
  fused = [p.layer for p in schedule.layers[:stop] if p.fuses]
  if fused:
    raise ValueError(f"cannot start at block {stop}: this schedule fuses at block(s) {fused} "
                     f"before it")


def run_unfused(blocks, x_BxTxC, stop: int, config: FusionConfig, *,
                deterministic: bool = True, remat_policy: str = "none") -> jax.Array:
  """Blocks 0 .. stop-1 as ordinary blocks: the tokens entering block `stop`."""
  state = TokenState(x_BxTxC, None, None)
  for layer, block in enumerate(blocks[:stop]):
    state = _run_block(block, state, ExactStep(config, LayerPlan(layer, x_BxTxC.shape[1])),
                       deterministic, remat_policy)
  return state.x_BxTxC


def run_exact(blocks, x_BxTxC, schedule: Schedule, config: FusionConfig, *,
              deterministic: bool = True, trace_source: bool = False, start: int = 0,
              remat_policy: str = "none"):
  """Blocks start .. depth-1 as `schedule` says, x being the tokens entering block `start`
  (the blocks before it must not fuse). Returns (TokenState, layer_token_maps): for every
  block that fused, (layer, token_map_BxN) after it (trace_source only)."""
  check_unfused(schedule, start)
  batch, tokens = x_BxTxC.shape[:2]
  token_map = (jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
               if trace_source else None)
  state = TokenState(x_BxTxC, None, token_map)
  layer_maps = []
  for block, plan in zip(blocks[start:], schedule.layers[start:]):
    # Inference programs keep the fused tokens token-major (steps.ExactStep).
    step = ExactStep(config, plan, schedule.num_protected, token_major=deterministic)
    state = _run_block(block, state, step, deterministic, remat_policy)
    if trace_source and plan.fuses:
      layer_maps.append((plan.layer, state.token_map_BxN))
  return state, tuple(layer_maps)


def run_padded(blocks, x_BxTxC, layout: PaddedLayout, splits_Lx2, config: FusionConfig, *,
               num_protected: int, max_moved: int, fusion_width: int,
               deterministic: bool = True, start: int = 0, first: jax.Array | None = None,
               scan: bool = True, remat_policy: str = "none") -> TokenState:
  """Blocks start .. depth-1 on padded arrays of the widths in `layout`.

  splits_Lx2: (depth, 2) int32, the (r_ab, r_ba) of each block (or (depth, B, 2), per
  example), a runtime value: paths with the same layout share one program whatever they
  merge. max_moved: a static bound on r_ab + r_ba. fusion_width: the width every matching
  runs at (the input's token count). first: `start` as a runtime int32 scalar (see below;
  the train step passes one XLA cannot fold). scan: run each stretch of alike blocks
  (``padded.alike_runs``) as one ``lax.scan`` (``scan_blocks``). remat_policy: see the
  module's docstring.
  Returns the state after the last block, at the last width of the layout, padding
  included (its sizes are 0); the protected tokens come first, as always.
  """
  batch, tokens = x_BxTxC.shape[:2]
  depth = len(blocks)
  if layout.depth != depth or layout.widths[start] != tokens:
    raise ValueError(f"layout {layout} does not fit {depth} blocks with "
                     f"{tokens} tokens entering block {start}")
  size = jnp.ones((batch, tokens), jnp.promote_types(x_BxTxC.dtype, jnp.float32))
  state = TokenState(x_BxTxC, size, None)
  # Block l reads the first row of its own copy of the table, rotated by one row per
  # block with a permutation computed at run time from `first`. Had it read row l, or
  # row first + l, XLA would fold that offset into the matching kernels as a constant
  # and every block would compile its own; so, when `first` is a value XLA cannot fold
  # (the train step derives it from the step number), the fusing blocks of one width
  # run the very same kernels.
  first = jnp.asarray(start if first is None else first, jnp.int32)
  rows = jnp.arange(depth, dtype=jnp.int32)
  table = jnp.take(jnp.asarray(splits_Lx2, jnp.int32), (rows + first) % depth, axis=0)
  # PiToMe's blocks differ in their margins and kinds: none are alike.
  runs = (alike_runs(layout, start) if scan and config.method != "pitome"
          else [(layer, layer + 1) for layer in range(start, depth)])
  for a, b in runs:
    steps = dict(config=config, fuses=layout.fuses[a], width_out=layout.widths[a + 1],
                 fusion_width=fusion_width, max_moved=max_moved, num_protected=num_protected)
    if config.method == "pitome" and layout.fuses[a]:
      steps["margin"], steps["protect"] = pitome_block(config, a, depth)
    if b - a == 1:
      state = _run_block(blocks[a], state, PaddedStep(splits=table[0], **steps), deterministic,
                         remat_policy)
    else:
      state = scan_blocks(blocks[a:b], state, table[:b - a], deterministic=deterministic,
                          remat_policy=remat_policy, **steps)
    table = jnp.take(table, (rows + first - start + b - a) % depth, axis=0)
  return state


def stochastic_depth(y, keep, key):
  """Stochastic depth with a run-time keep probability: what
  ``nn.Dropout(1 - keep, broadcast_dims=(1, 2))(y, rng=key)`` computes."""
  mask = jax.random.bernoulli(key, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
  return jax.lax.select(jnp.broadcast_to(mask, y.shape), y / keep.astype(y.dtype),
                        jnp.zeros_like(y))


def _scanned_block(module, state, step, deterministic, drop_path):
  return run_block(module, state, step, deterministic, drop_path)


def scan_blocks(blocks, state: TokenState, splits_Nx2, *, deterministic: bool = True,
                remat_policy: str = "none", **step_fields) -> TokenState:
  """Alike blocks (same class and settings, same widths in and out, all fusing or none)
  as one ``lax.scan`` over their stacked parameters: XLA compiles one block where the loop
  runs len(blocks). The results equal those of the blocks one by one, stochastic depth
  included (the same keys, its rate a run-time value); dropout (not in the DeiT recipe)
  draws from other keys than the unrolled blocks. remat_policy: the scan's body (one
  block) runs under ``jax.checkpoint`` with that policy. step_fields: ``PaddedStep``'s
  fields but the splits."""
  template = blocks[0]
  _check_alike(blocks)
  policy = _remat_policy(remat_policy)
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *[b.variables["params"] for b in blocks])
  keep = keys = block_keys = None   # deterministic: no per-block randomness to scan over
  if not deterministic:
    # In the dtype nn.Dropout draws its mask in (float64 with jax_enable_x64).
    keep = jnp.asarray([1.0 - b.drop_path_rate for b in blocks], jnp.result_type(float))
    # The keys the blocks' own drop-path modules would draw (two calls each), and one
    # per block for its dropout layers.
    keys = jnp.stack([jnp.stack([b.drop_path.make_rng("dropout") for _ in range(2)])
                      for b in blocks])
    block_keys = jnp.stack([b.make_rng("dropout") for b in blocks])
  unbound = template.clone(parent=None)
  width = state.x_BxTxC.shape[1]
  if step_fields.get("width_out", width) != width:
    raise ValueError(f"scanned blocks must keep the array width ({width}), got "
                     f"{step_fields['width_out']}")

  def body(state, xs):
    params_l, splits_l, keep_l, keys_l, key_l = xs
    drop_path, rngs = None, {}
    if not deterministic:
      drop_path = lambda y, i: stochastic_depth(y, keep_l, keys_l[i])
      rngs = {"dropout": key_l}
    step = PaddedStep(splits=splits_l, **step_fields)
    state = unbound.apply({"params": params_l}, state, step, deterministic, drop_path,
                          method=_scanned_block, rngs=rngs)
    return state, None

  if policy is not None:
    # Inside a scan, the loop already keeps XLA from merging the recomputation with the
    # forward pass: no need for prevent_cse's barriers (jax.checkpoint's advice).
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  state, _ = jax.lax.scan(body, state, (stacked, splits_Nx2, keep, keys, block_keys))
  return state


_NOT_COMPARED = ("parent", "name", "drop_path_rate")


def _check_alike(blocks) -> None:
  """ValueError unless `blocks` are one class with the same settings (but their names and
  stochastic-depth rates): one compiled block must stand for them all."""
  first = blocks[0]
  for block in blocks[1:]:
    same = type(block) is type(first) and all(
        getattr(block, f.name) == getattr(first, f.name)
        for f in dataclasses.fields(first) if f.name not in _NOT_COMPARED and f.init)
    if not same:
      raise ValueError(f"blocks {first.name} and {block.name} differ in more than their "
                       f"stochastic-depth rate; they cannot run as one scanned block")
