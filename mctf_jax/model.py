"""DeiT / ViT with multi-criteria token fusion, in Flax linen.

Parameter names mirror timm's DeiT one to one (``blocks.3.attn.qkv.weight`` is
``params['blocks_3']['attn']['qkv']['kernel']``, transposed), so that checkpoints convert
without a renaming table; see ``mctf_jax.convert``.

State between blocks travels explicitly: each block takes and returns ``TokenState``
(tokens, their sizes, and which token holds each initial patch). The static per-layer
plan (``mctf_jax.schedule``) decides at trace time what each block does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mctf_jax import fusion as F
from mctf_jax import padded as P
from mctf_jax.config import FusionConfig, ModelConfig, normalize_r
from mctf_jax.schedule import LayerPlan, Schedule, compute_schedule

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
           "float64": jnp.float64}

dense_init = nn.initializers.truncated_normal(stddev=0.02)


class TokenState(NamedTuple):
  """What flows from block to block.

  x_BxTxC: the tokens.
  size_BxT: how many initial tokens each token holds; None until the first fusion (all one).
  token_map_BxN: index of the token holding each initial token; None unless traced.
  """
  x_BxTxC: jax.Array
  size_BxT: jax.Array | None = None
  token_map_BxN: jax.Array | None = None


class EncoderOutput(NamedTuple):
  """Result of ``VisionTransformer.encode``.

  tokens_BxTxC: the final tokens after the last LayerNorm (class token first).
  size_BxT: their sizes (float32).
  source_BxTxN: 0/1 map of the initial tokens each final token holds (trace_source only).
  layer_token_maps: for every block that fused, (layer, token_map_BxN) after it
    (trace_source only); token_map[b, n] is the token holding initial token n.
  """
  tokens_BxTxC: jax.Array
  size_BxT: jax.Array
  source_BxTxN: jax.Array | None
  layer_token_maps: tuple[tuple[int, jax.Array], ...]


def _resolve_merge_impl(impl: str) -> str:
  if impl != "auto":
    return impl
  return "matmul" if jax.default_backend() == "tpu" else "scatter"


def _layer_norm(cfg: ModelConfig, dtype, param_dtype) -> nn.LayerNorm:
  # Two-pass variance, as PyTorch computes it (the fast E[x^2] - E[x]^2 loses digits).
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False)


def _drop_path(x, keep, key):
  """Stochastic depth with a run-time keep probability: what
  ``nn.Dropout(1 - keep, broadcast_dims=(1, 2))(x, rng=key)`` computes."""
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jax.lax.select(jnp.broadcast_to(mask, x.shape), x / keep.astype(x.dtype),
                        jnp.zeros_like(x))


def _log_size(size_BxT):
  return None if size_BxT is None else jnp.log(size_BxT)


class QKV(nn.Module):
  """The fused query/key/value projection of timm (one (C, 3C) kernel), in parts.

  One-step-ahead attention needs the queries and keys of the tokens before fusion but the
  values of the tokens after it, so the projection is exposed as ``qk`` and ``v``.
  """
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.kernel = self.param("kernel", dense_init, (self.features, 3 * self.features),
                             self.param_dtype)
    if self.use_bias:
      self.bias = self.param("bias", nn.initializers.zeros, (3 * self.features,),
                             self.param_dtype)

  def _project(self, x, part: slice):
    kernel = self.kernel[:, part].astype(self.dtype)
    y = jnp.einsum("btc,cf->btf", x.astype(self.dtype), kernel)
    if self.use_bias:
      y = y + self.bias[part].astype(self.dtype)
    return y

  def qk(self, x_BxTxC):
    c = self.features
    qk = self._project(x_BxTxC, slice(0, 2 * c))
    return qk[..., :c], qk[..., c:]

  def v(self, x_BxTxC):
    c = self.features
    return self._project(x_BxTxC, slice(2 * c, 3 * c))

  def __call__(self, x_BxTxC):
    q, k = self.qk(x_BxTxC)
    return q, k, self.v(x_BxTxC)


class Attention(nn.Module):
  """Multi-head self-attention as two named steps: probabilities, then the values."""
  dim: int
  num_heads: int
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.qkv = QKV(self.dim, self.qkv_bias, self.dtype, self.param_dtype)
    self.proj = nn.Dense(self.dim, kernel_init=dense_init, dtype=self.dtype,
                         param_dtype=self.param_dtype)
    self.proj_drop = nn.Dropout(self.dropout_rate)

  def _heads(self, x_BxTxC):
    """(B, T, C) -> (B, H, T, d): head-major, the layout CPU/GPU/TPU matmuls want."""
    b, t, _ = x_BxTxC.shape
    return x_BxTxC.reshape(b, t, self.num_heads, self.dim // self.num_heads).transpose(0, 2, 1, 3)

  def probs(self, h_BxTxC, log_size_BxT=None):
    """Attention probabilities (B, H, T, T) from queries and keys, in float32 at least.

    log_size_BxT: proportional attention; log(size) of each key is added to the logits.
    """
    q, k = self.qkv.qk(h_BxTxC)
    # The scale goes on the queries (T x d multiplies) rather than on the (T x T) logits:
    # XLA:CPU materialises a scalar broadcast to the logits' shape when blocks share that
    # shape (~9% of DeiT-T's forward). Exact where d is a power of 4 (2^-3 for DeiT's 64).
    scale = (self.dim // self.num_heads) ** -0.5
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bhqd,bhkd->bhqk", self._heads(q * jnp.asarray(scale, q.dtype)),
                        self._heads(k), preferred_element_type=acc)
    if log_size_BxT is not None:
      logits = logits + log_size_BxT[:, None, None, :].astype(logits.dtype)
    return jax.nn.softmax(logits, axis=-1)

  def values(self, h_BxTxC):
    """Values split into heads: (B, H, T, d)."""
    return self._heads(self.qkv.v(h_BxTxC))

  def output(self, out_BxTxHxd, deterministic: bool):
    """Concatenates the heads and projects."""
    b, t = out_BxTxHxd.shape[:2]
    y = self.proj(out_BxTxHxd.reshape(b, t, self.dim))
    return self.proj_drop(y, deterministic=deterministic)

  def attend(self, probs_BxHxTxT, v_BxHxTxd):
    """The attention output, token-major: (B, T, H, d)."""
    return F.attend(probs_BxHxTxT, v_BxHxTxd)


class Mlp(nn.Module):
  hidden: int
  dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = nn.Dense(self.hidden, kernel_init=dense_init, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(self.dim, kernel_init=dense_init, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc2")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Block(nn.Module):
  """A pre-norm transformer block that may fuse tokens, as its LayerPlan says."""
  model: ModelConfig
  fusion: FusionConfig
  drop_path_rate: float = 0.0

  def setup(self):
    cfg = self.model
    dtype, param_dtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    norm = lambda: _layer_norm(cfg, dtype, param_dtype)
    self.norm1 = norm()
    self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias, cfg.dropout_rate, dtype,
                          param_dtype)
    self.norm2 = norm()
    self.mlp = Mlp(cfg.mlp_dim, cfg.embed_dim, cfg.dropout_rate, dtype, param_dtype)
    # Stochastic depth: one keep/drop per example (mask broadcast over tokens, channels).
    self.drop_path = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2))

  def _fuse(self, state: TokenState, metric_BxTxC, probs_BxHxTxT, plan: LayerPlan):
    """One fusion step. Returns the new state and what the attention merge needs."""
    fz = self.fusion
    impl = _resolve_merge_impl(fz.merge_impl)
    batch, tokens = state.x_BxTxC.shape[:2]
    received_BxT = F.attention_received(probs_BxHxTxT)
    scores = F.matching_scores(metric_BxTxC, attn_received_BxT=received_BxT,
                               size_BxT=state.size_BxT, tau_sim=fz.tau_sim,
                               tau_info=fz.tau_info, tau_size=fz.tau_size)
    fusion = F.bipartite_matching(scores, r_ab=plan.r_ab, r_ba=plan.r_ba,
                                  bidirectional=fz.bidirectional)
    size_BxT = state.size_BxT
    if size_BxT is None:
      size_BxT = jnp.ones((batch, tokens), jnp.promote_types(state.x_BxTxC.dtype, jnp.float32))
    x, size, weights, norm = F.fuse_tokens(state.x_BxTxC, size_BxT, fusion, pooling=fz.pooling,
                                           attn_received_BxT=received_BxT, impl=impl)
    token_map = state.token_map_BxN
    if token_map is not None:
      token_map = F.update_token_map(token_map, fusion.dest_BxT)
    return TokenState(x, size, token_map), (fusion, weights, norm, impl)

  def _attn_size(self, state: TokenState):
    return _log_size(state.size_BxT) if self.fusion.prop_attn else None

  def __call__(self, state: TokenState, plan: LayerPlan, deterministic: bool = True):
    return self._run(state, plan.fuses, lambda *a: self._fuse(*a, plan), self._attn_size,
                     deterministic)

  def _run(self, state: TokenState, fuses: bool, fuse, attn_bias, deterministic: bool,
           drop_path=None):
    """The block: fuse(state, metric, probs) -> (state, merge info) fuses the tokens and
    attn_bias(state) gives the additive key bias of the attention (or None).
    drop_path(y, i): stochastic depth of the i-th residual branch (0: attention, 1: MLP),
    instead of the block's own (``_scan_blocks`` gives one with a run-time rate)."""
    mode = self.fusion.one_step_ahead if fuses else None
    x = state.x_BxTxC
    h = self.norm1(x)
    probs = self.attn.probs(h, attn_bias(state))

    if mode == "approx":
      # Fuse with this block's attention, then reuse that attention, merged.
      state, (fusion, weights, norm, impl) = fuse(state, x, probs)
      v = self.attn.values(self.norm1(state.x_BxTxC))
      out = F.merged_attention_output(probs, v, fusion, weights, norm, impl=impl)
    elif mode == "precise":
      # Fuse with this block's attention (no gradient), recompute it on the fused tokens.
      state, _ = fuse(state, x, jax.lax.stop_gradient(probs))
      h = self.norm1(state.x_BxTxC)
      out = self.attn.attend(self.attn.probs(h, attn_bias(state)), self.attn.values(h))
    else:
      out = self.attn.attend(probs, self.attn.values(h))

    drop = drop_path or (lambda y, _: self.drop_path(y, deterministic))
    x = state.x_BxTxC + drop(self.attn.output(out, deterministic), 0)
    x = x + drop(self.mlp(self.norm2(x), deterministic), 1)
    state = state._replace(x_BxTxC=x)

    if mode == "off":
      # An ordinary block; its output is fused with its attention map.
      state, _ = fuse(state, x, probs)
    return state

  # ------------------------------------------------------------------ padded shapes

  def _attn_bias(self, size_BxT):
    """Proportional attention, or (without it) a mask: padding keys (size 0) get -inf."""
    if self.fusion.prop_attn:
      return jnp.log(size_BxT)
    return jnp.where(size_BxT > 0, 0.0, -jnp.inf).astype(size_BxT.dtype)

  def _fuse_padded(self, state: TokenState, metric_BxTxC, probs_BxHxTxT, splits,
                   width_out: int, fusion_width: int, max_moved: int):
    fz = self.fusion
    impl = _resolve_merge_impl(fz.merge_impl)
    width_in = state.x_BxTxC.shape[1]
    valid_BxT = state.size_BxT > 0
    received_BxT = P.attention_received(probs_BxHxTxT, valid_BxT)
    valid_wide = P.pad_tokens(valid_BxT, fusion_width, False)
    scores = F.matching_scores(P.pad_tokens(metric_BxTxC, fusion_width),
                               attn_received_BxT=P.pad_tokens(received_BxT, fusion_width, 1),
                               size_BxT=P.pad_tokens(state.size_BxT, fusion_width, 1),
                               tau_sim=fz.tau_sim, tau_info=fz.tau_info,
                               tau_size=fz.tau_size, valid_BxT=valid_wide)
    fusion, valid_BxO = P.bipartite_matching(
        scores, valid_wide, splits[..., 0], splits[..., 1], num_in=width_in, num_out=width_out,
        max_moved=max_moved, bidirectional=fz.bidirectional)
    x, size, weights, norm = F.fuse_tokens(state.x_BxTxC, state.size_BxT, fusion,
                                           pooling=fz.pooling, attn_received_BxT=received_BxT,
                                           impl=impl)
    x = jnp.where(valid_BxO[..., None], x, 0)
    size = jnp.where(valid_BxO, size, 0)
    return TokenState(x, size, None), (fusion, weights, norm, impl)

  def padded(self, state: TokenState, fuses: bool, splits, width_out: int, fusion_width: int,
             max_moved: int, deterministic: bool = True, drop_path=None):
    """The block on a padded token array (``mctf_jax.padded``): state.size_BxT is 0 on the
    padding; splits = (r_ab, r_ba), runtime int32 scalars, or (B, 2) for counts per
    example, used when `fuses`; the fused tokens leave in an array of width_out rows. Max
    pooling is not supported."""
    if fuses and self.fusion.pooling == "max":
      raise ValueError("padded blocks do not support pooling='max'")
    fuse = lambda *a: self._fuse_padded(*a, splits, width_out, fusion_width, max_moved)
    return self._run(state, fuses, fuse, lambda s: self._attn_bias(s.size_BxT), deterministic,
                     drop_path)


class VisionTransformer(nn.Module):
  """DeiT / ViT with MCTF.

  ``model.apply({'params': p}, images, train=False)`` -> logits (B, num_classes), with
  images NHWC floats of the configured size. With ``train=True, teacher_r=r'`` (a static
  Python number), it also runs the teacher path (same weights, r' tokens per fused layer)
  and returns a dict: ``student_logits``, ``teacher_logits`` and ``consistency``, the
  per-example mean squared difference between the final class tokens (the teacher's
  without gradient), before the confidence mask of ``mctf_jax.losses``.
  """
  model: ModelConfig
  fusion: FusionConfig

  def setup(self):
    cfg = self.model
    self.fusion.check_depth(cfg.depth)
    dtype, param_dtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    self.patch_embed = PatchEmbed(cfg.embed_dim, cfg.patch_size, dtype, param_dtype)
    self.cls_token = self.param("cls_token", dense_init, (1, 1, cfg.embed_dim), param_dtype)
    self.pos_embed = self.param("pos_embed", dense_init, (1, cfg.num_tokens, cfg.embed_dim),
                                param_dtype)
    self.pos_drop = nn.Dropout(cfg.dropout_rate)
    rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    self.blocks = [Block(cfg, self.fusion, rate) for rate in rates]
    self.norm = _layer_norm(cfg, dtype, param_dtype)
    self.head = nn.Dense(cfg.num_classes, kernel_init=dense_init, dtype=dtype,
                         param_dtype=param_dtype)

  # ------------------------------------------------------------------ static helpers

  def schedule(self, r=None) -> Schedule:
    """The fusion schedule at fusion.r, or at the r given (a count or a ratio)."""
    return compute_schedule(self.model, self.fusion, r)

  def with_fusion(self, **changes) -> "VisionTransformer":
    """The same model (same parameters) with other fusion settings, e.g. ``r=8``."""
    return self.clone(fusion=dataclasses.replace(self.fusion, **changes))

  # ------------------------------------------------------------------ forward

  def _check_images(self, images):
    cfg = self.model
    expected = (cfg.img_size, cfg.img_size, cfg.in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"images must be NHWC of shape (batch, {cfg.img_size}, {cfg.img_size}, "
                       f"{cfg.in_chans}) for this config (img_size={cfg.img_size}, "
                       f"in_chans={cfg.in_chans}), got shape {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be floating point (normalised pixels), got dtype "
                       f"{images.dtype}; convert uint8 images with the input pipeline's "
                       f"normalisation first")

  def embed(self, images, deterministic: bool = True):
    self._check_images(images)
    x = self.patch_embed(images)
    b = x.shape[0]
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)
    return self.pos_drop(x, deterministic=deterministic)

  def run_blocks(self, x_BxTxC, schedule: Schedule, *, deterministic: bool = True,
                 trace_source: bool | None = None, start: int = 0) -> EncoderOutput:
    """The blocks as `schedule` says, then the final norm.

    start: the first block to run, x being the tokens that enter it (from ``run_unfused``);
    the blocks before it must not fuse in `schedule`. The train step runs those blocks once
    for the student and the teacher path.
    """
    _check_unfused(schedule, start)
    trace = self.fusion.trace_source if trace_source is None else trace_source
    batch, tokens = x_BxTxC.shape[:2]
    token_map = (jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
                 if trace else None)
    state = TokenState(x_BxTxC, None, token_map)
    layer_maps = []
    for block, plan in zip(self.blocks[start:], schedule.layers[start:]):
      state = block(state, plan, deterministic)
      if trace and plan.fuses:
        layer_maps.append((plan.layer, state.token_map_BxN))
    tokens_out = self.norm(state.x_BxTxC)
    size = state.size_BxT
    if size is None:
      size = jnp.ones(tokens_out.shape[:2], jnp.promote_types(tokens_out.dtype, jnp.float32))
    source = (F.source_map(state.token_map_BxN, tokens_out.shape[1], size.dtype)
              if trace else None)
    return EncoderOutput(tokens_out, size, source, tuple(layer_maps))

  def run_blocks_padded(self, x_BxTxC, layout: P.PaddedLayout, splits_Lx2, *,
                        max_moved: int, deterministic: bool = True, start: int = 0,
                        first: jax.Array | None = None, scan: bool | None = None
                        ) -> EncoderOutput:
    """``run_blocks`` on padded arrays of the widths in `layout` (``mctf_jax.padded``).

    splits_Lx2: (depth, 2) int32, the (r_ab, r_ba) of each block (or (depth, B, 2), per
    example), a runtime value: paths with the same layout share one program whatever they
    merge. max_moved: a static bound
    on r_ab + r_ba. first: `start` as a runtime int32 scalar (see the loop below; the train
    step passes one XLA cannot fold). scan (default: fusion.train_scan_blocks): run each
    stretch of alike blocks (``P.alike_runs``) as one ``lax.scan`` (``_scan_blocks``).
    Returns the final tokens at the last width of the layout, padding included (its sizes
    are 0); the class token comes first, as always.
    """
    batch, tokens = x_BxTxC.shape[:2]
    if layout.depth != len(self.blocks) or layout.widths[start] != tokens:
      raise ValueError(f"layout {layout} does not fit {len(self.blocks)} blocks with "
                       f"{tokens} tokens entering block {start}")
    scan = self.fusion.train_scan_blocks if scan is None else scan
    fusion_width = self.model.num_tokens
    size = jnp.ones((batch, tokens), jnp.promote_types(x_BxTxC.dtype, jnp.float32))
    state = TokenState(x_BxTxC, size, None)
    # Block l reads the first row of its own copy of the table, rotated by one row per
    # block with a permutation computed at run time from `first`. Had it read row l, or
    # row first + l, XLA would fold that offset into the matching kernels as a constant
    # and every block would compile its own; so, when `first` is a value XLA cannot fold
    # (the train step derives it from the step number), the fusing blocks of one width
    # run the very same kernels.
    depth = layout.depth
    first = jnp.asarray(start if first is None else first, jnp.int32)
    rows = jnp.arange(depth, dtype=jnp.int32)
    table = jnp.take(jnp.asarray(splits_Lx2, jnp.int32), (rows + first) % depth, axis=0)
    runs = (P.alike_runs(layout, start) if scan and not self.is_initializing()
            else [(layer, layer + 1) for layer in range(start, depth)])
    for a, b in runs:
      if b - a == 1:
        state = self.blocks[a].padded(state, layout.fuses[a], table[0], layout.widths[a + 1],
                                      fusion_width, max_moved, deterministic)
      else:
        state = self._scan_blocks(state, a, b, layout.fuses[a], table[:b - a], fusion_width,
                                  max_moved, deterministic)
      table = jnp.take(table, (rows + first - start + b - a) % depth, axis=0)
    return EncoderOutput(self.norm(state.x_BxTxC), state.size_BxT, None, ())

  def _scan_blocks(self, state: TokenState, a: int, b: int, fuses: bool, splits_Nx2,
                   fusion_width: int, max_moved: int, deterministic: bool) -> TokenState:
    """Blocks a .. b-1, alike on padded arrays (same widths in and out, all fusing or none),
    as one ``lax.scan`` over their stacked parameters: XLA compiles one block where the
    loop runs b - a. The results equal those of the blocks one by one, stochastic depth
    included (same keys, its rate a run-time value); dropout (not in the DeiT recipe)
    draws from other keys than the unrolled blocks."""
    params = self.variables["params"]
    stacked = jax.tree.map(lambda *p: jnp.stack(p),
                           *[params[f"blocks_{layer}"] for layer in range(a, b)])
    keep = keys = block_keys = None   # deterministic: no per-block randomness to scan over
    if not deterministic:
      # In the dtype nn.Dropout draws its mask in (float64 with jax_enable_x64).
      keep = jnp.asarray([1.0 - block.drop_path_rate for block in self.blocks[a:b]],
                         jnp.result_type(float))
      # The keys the blocks' own drop-path modules would draw (two calls each), and one
      # per block for its dropout layers.
      keys = jnp.stack([jnp.stack([block.drop_path.make_rng("dropout") for _ in range(2)])
                        for block in self.blocks[a:b]])
      block_keys = jnp.stack([block.make_rng("dropout") for block in self.blocks[a:b]])
    block = Block(self.model, self.fusion, 0.0, parent=None)
    width = state.x_BxTxC.shape[1]

    def body(state, xs):
      params_l, splits_l, keep_l, keys_l, key_l = xs
      drop_path = None
      rngs = {}
      if not deterministic:
        drop_path = lambda y, i: _drop_path(y, keep_l, keys_l[i])
        rngs = {"dropout": key_l}
      state = block.apply({"params": params_l}, state, fuses, splits_l, width, fusion_width,
                          max_moved, deterministic, drop_path, method=Block.padded, rngs=rngs)
      return state, None

    state, _ = jax.lax.scan(body, state, (stacked, splits_Nx2, keep, keys, block_keys))
    return state

  def run_unfused(self, x_BxTxC, stop: int, *, deterministic: bool = True):
    """Blocks 0 .. stop-1 as ordinary blocks: the tokens entering block `stop`."""
    state = TokenState(x_BxTxC, None, None)
    for layer, block in enumerate(self.blocks[:stop]):
      state = block(state, LayerPlan(layer, x_BxTxC.shape[1]), deterministic)
    return state.x_BxTxC

  def classify(self, tokens_BxTxC):
    """Logits from the class token of the final (normalised) tokens."""
    return self.head(tokens_BxTxC[:, 0])

  def encode(self, images, *, train: bool = False, r=None,
             trace_source: bool | None = None) -> EncoderOutput:
    """Final tokens, sizes and (optionally) sources of `images`, at fusion.r or r."""
    x = self.embed(images, deterministic=not train)
    return self.run_blocks(x, self.schedule(r), deterministic=not train,
                           trace_source=trace_source)

  def __call__(self, images, *, train: bool = False, teacher_r=None):
    deterministic = not train
    x = self.embed(images, deterministic)
    student = self.run_blocks(x, self.schedule(), deterministic=deterministic)
    student_logits = self.classify(student.tokens_BxTxC)
    if teacher_r is None:
      return student_logits
    if not train:
      raise ValueError("teacher_r is for training (train=True); evaluation runs the student "
                       "path only")
    teacher_r = normalize_r(teacher_r, "teacher_r")
    teacher = self.run_blocks(x, self.schedule(teacher_r), deterministic=deterministic,
                              trace_source=False)
    return {
        "student_logits": student_logits,
        "teacher_logits": self.classify(teacher.tokens_BxTxC),
        "consistency": consistency(student.tokens_BxTxC, teacher.tokens_BxTxC),
    }


def _check_unfused(schedule: Schedule, stop: int):
  fused = [p.layer for p in schedule.layers[:stop] if p.fuses]
  if fused:
    raise ValueError(f"cannot start at block {stop}: this schedule fuses at block(s) {fused} "
                     f"before it")


def consistency(student_BxTxC, teacher_BxTxC):
  """Per-example mean squared difference of the final class tokens, the teacher's held fixed."""
  teacher_cls = jax.lax.stop_gradient(teacher_BxTxC[:, 0])
  acc = jnp.promote_types(teacher_cls.dtype, jnp.float32)
  diff = teacher_cls.astype(acc) - student_BxTxC[:, 0].astype(acc)
  return jnp.mean(jnp.square(diff), axis=-1)


class PatchEmbed(nn.Module):
  """Non-overlapping patches, projected by a strided convolution (timm's PatchEmbed)."""
  embed_dim: int
  patch_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_BxHxWxC):
    x = nn.Conv(self.embed_dim, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype,
                param_dtype=self.param_dtype, name="proj")(images_BxHxWxC)
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)
