"""T2T-ViT (Yuan et al., ICCV 2021; github yitu-opensource/T2T-ViT) on the fusion engine:
arch 't2t_vit'.

The Tokens-to-Token module makes the tokens: three soft splits (overlapping patches,
unfolded as ``torch.nn.Unfold`` orders them: channel-major, C x kh x kw with the channel
slowest; 7x7 stride 4 pad 2, then 3x3 stride 2 pad 1 twice), between which a one-head
token transformer re-structures the tokens (``tokens_type``):

* 'performer' (T2T-ViT-14/19/24): Performer attention with positive random features
  exp(w x - |x|^2 / 2) / sqrt(m) of a fixed (m, token_dim) matrix ``w`` (m = token_dim / 2),
  computed in float32 at least (the official ``x.float()``), eps 1e-8 in the normaliser,
  dropout 0.1 on its two branches in training;
* 'transformer' (T2T-ViT_t-14/19/24): softmax attention of one head of width token_dim,
  its logits scaled by (input width) ** -0.5;

in both the residual of the attention is the values (``v + proj(attn)``: the input has
another width), then a residual MLP of width token_dim. The last split is projected to
embed_dim. Then a class token, the fixed 1-D sinusoid position embedding, pre-norm blocks
without qkv bias (``layers.Block``), a final LayerNorm and the head on the class token.
Every LayerNorm is PyTorch's default (eps 1e-5).

The attention scale of the blocks (``qk_scale``) is the official constructor's: None for
head_dim ** -0.5. The released checkpoints need embed_dim ** -0.5 (the official
``t2t_vit_14(pretrained=True)`` sets ``qk_scale=384 ** -0.5``), which the configs
(configs/t2t_vit.py) give as ``qk_scale='embed_dim'``. The token transformer of the T2T
module always uses its own scale, as the official one (it is not given qk_scale).

Fixed tensors. The official model holds the Performer's ``w`` and the sinusoid
``pos_embed`` as parameters with ``requires_grad=False``: stored in its state dict, never
trained. Here they live in the 'constants' collection, not in 'params', so that the
optimizer never sees them (no update, no weight decay, no EMA) while they still travel with
the model's state: initialised by ``init`` (``w`` random orthogonal rows scaled by
sqrt(m), as the official init; ``pos_embed`` the sinusoid), converted from and to PyTorch
checkpoints under their official names, saved and restored with the model state by the
train step and the checkpoints (``mctf_jax.training.train_step``, ``model_state``). They
are read in the embedding only, as the base class asks of model state.

Parameter names are the official ones (``tokens_to_token.attention1.kqv.weight``,
``blocks.3.attn.qkv.weight``, ...); the Performer's ``mlp.0`` / ``mlp.2`` are the Flax
modules ``mlp_0`` / ``mlp_2``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mctf_jax.errors import CheckpointError, ConfigError, is_number
from mctf_jax.fusion.scopes import part_scope
from mctf_jax.models import layers
from mctf_jax.models.base import (LAYER_NORM_FLOPS_PER_ELEMENT, ClassTokenSizes,
                                  BackboneConfig, ClassTokenBackbone, check_bools,
                                  check_heads, check_positive_int, check_positive_numbers)
from mctf_jax.models.registry import register

TOKENS_TYPES = ("performer", "transformer")
QK_SCALE_NAMES = ("head_dim", "embed_dim")
# The collection of the fixed tensors (the Performer's w, the sinusoid position embedding).
CONSTANTS = "constants"
# The soft splits: (kernel, stride, padding); their strides multiply to 16.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
PATCH_STRIDE = 16
PERFORMER_KERNEL_RATIO = 0.5
PERFORMER_EPS = 1e-8
LAYER_NORM_EPS = 1e-5   # torch.nn.LayerNorm's default, used throughout the official model


@dataclasses.dataclass(frozen=True)
class T2TViTConfig(ClassTokenSizes, BackboneConfig):
  """T2T-ViT: the Tokens-to-Token module (``tokens_type`` 'performer' or 'transformer',
  width ``token_dim``), class token, fixed sinusoid position embedding, pre-norm blocks
  (no qkv bias by default), final norm, head on the class token. The defaults are
  T2T-ViT-14's sizes with the official constructor's qk_scale (None: head_dim ** -0.5).

  qk_scale: the blocks' attention scale: a number, None or 'head_dim' for
    head_dim ** -0.5, or 'embed_dim' for embed_dim ** -0.5 (the released checkpoints').
  performer_dropout_rate: the dropout of the Performer's attention and MLP branches in
    training (fixed at 0.1 in the official Token_performer).
  """
  arch: str = "t2t_vit"
  tokens_type: str = "performer"
  token_dim: int = 64
  embed_dim: int = 384
  depth: int = 14
  num_heads: int = 6
  mlp_ratio: float = 3.0
  qkv_bias: bool = False
  qk_scale: Any = None
  performer_dropout_rate: float = 0.1

  def __post_init__(self):
    super().__post_init__()
    for name in ("token_dim", "embed_dim", "num_heads"):
      check_positive_int(self, name)
    if self.img_size % PATCH_STRIDE:
      raise ConfigError(f"model.img_size={self.img_size} is not divisible by "
                        f"{PATCH_STRIDE}: T2T-ViT's soft splits (strides 4, 2, 2) need "
                        f"img_size % {PATCH_STRIDE} == 0 (e.g. 224, 384)")
    if self.tokens_type not in TOKENS_TYPES:
      raise ConfigError(f"model.tokens_type must be one of {TOKENS_TYPES}, got "
                        f"{self.tokens_type!r}")
    if self.tokens_type == "performer" and self.token_dim < 2:
      raise ConfigError(f"model.token_dim={self.token_dim}: the Performer needs >= 2 "
                        f"(its token_dim / 2 random features)")
    check_heads(self)
    check_positive_numbers(self, "mlp_ratio")
    check_bools(self, "qkv_bias")
    rate = self.performer_dropout_rate
    if not is_number(rate) or not 0 <= rate < 1:
      raise ConfigError(f"model.performer_dropout_rate must be in [0, 1), got {rate!r}")
    _ = self.attn_scale   # raises for a bad qk_scale

  @property
  def attn_scale(self) -> float:
    """The blocks' attention scale (``qk_scale`` resolved)."""
    value = self.qk_scale
    if value is None or value == "head_dim":
      return (self.embed_dim // self.num_heads) ** -0.5
    if value == "embed_dim":
      return self.embed_dim ** -0.5
    if isinstance(value, str):   # a number given on the command line to a str field
      try:
        value = float(value)
      except ValueError:
        value = None
    if not is_number(value) or not value > 0:
      raise ConfigError(f"model.qk_scale must be a number > 0, None, 'head_dim' "
                        f"(head_dim ** -0.5) or 'embed_dim' (embed_dim ** -0.5, the released "
                        f"checkpoints'), got {self.qk_scale!r}")
    return float(value)

  @property
  def grid_sizes(self) -> tuple[int, int, int]:
    """Tokens per side after each soft split (img_size / 4, / 8, / 16)."""
    return (self.img_size // 4, self.img_size // 8, self.img_size // 16)

  @property
  def split_dims(self) -> tuple[int, int, int]:
    """Widths of the soft splits' tokens: in_chans x 7 x 7, then token_dim x 3 x 3 twice."""
    return (self.in_chans * 49, self.token_dim * 9, self.token_dim * 9)

  @property
  def num_patches(self) -> int:
    return self.grid_sizes[-1] ** 2

  @property
  def num_features(self) -> int:
    """The Performer's random features m (token_dim * 0.5)."""
    return int(self.token_dim * PERFORMER_KERNEL_RATIO)


def sinusoid_encoding(num_positions: int, width: int) -> np.ndarray:
  """The official fixed 1-D position embedding (1, num_positions, width), float64: for
  position p and channel j, p / 10000 ** (2 * (j // 2) / width), sin on the even channels
  and cos on the odd ones."""
  position = np.arange(num_positions, dtype=np.float64)[:, None]
  channel = np.arange(width)
  angle = position / np.power(10000.0, 2 * (channel // 2) / width)[None]
  table = np.where(channel % 2 == 0, np.sin(angle), np.cos(angle))
  return table[None]


def soft_split(x_BxHxWxC, kernel: int, stride: int, padding: int):
  """``torch.nn.Unfold`` on NHWC images: (B, oh * ow, C * kernel * kernel), the output
  positions row-major and each patch channel-major (index c * k * k + i * k + j for
  channel c at patch row i, column j). One gather of fixed indices, no matrix product (it
  compiles ~10x faster than the k * k strided slices, and its gradient is one scatter)."""
  b, h, w, c = x_BxHxWxC.shape
  oh = (h + 2 * padding - kernel) // stride + 1
  ow = (w + 2 * padding - kernel) // stride + 1
  x = jnp.pad(x_BxHxWxC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = np.arange(oh)[:, None, None, None] * stride + np.arange(kernel)[None, None, :, None]
  cols = np.arange(ow)[None, :, None, None] * stride + np.arange(kernel)[None, None, None, :]
  index_LxK = (rows * (w + 2 * padding) + cols).reshape(oh * ow, kernel * kernel)
  patches_BxLxKxC = x.reshape(b, -1, c)[:, index_LxK]
  return patches_BxLxKxC.transpose(0, 1, 3, 2).reshape(b, oh * ow, c * kernel * kernel)


class TokenPerformer(nn.Module):
  """The official Token_performer: one-head Performer attention of width ``dim`` (with
  the values as its residual), then a residual MLP. Its random-feature matrix ``w`` is in
  the 'constants' collection."""
  dim: int
  num_features: int
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    dense = dict(kernel_init=layers.dense_init, dtype=self.dtype, param_dtype=self.param_dtype)
    self.norm1 = layers.layer_norm(LAYER_NORM_EPS, self.dtype, self.param_dtype)
    self.kqv = nn.Dense(3 * self.dim, **dense)
    self.proj = nn.Dense(self.dim, **dense)
    self.norm2 = layers.layer_norm(LAYER_NORM_EPS, self.dtype, self.param_dtype)
    self.mlp_0 = nn.Dense(self.dim, **dense)
    self.mlp_2 = nn.Dense(self.dim, **dense)
    self.drop = nn.Dropout(self.dropout_rate)
    m = self.num_features
    self.w = self.variable(CONSTANTS, "w", lambda: nn.initializers.orthogonal(math.sqrt(m))(
        self.make_rng("params"), (m, self.dim), self.param_dtype))

  def features(self, x_BxTxD):
    """Positive random features exp(w x - |x|^2 / 2) / sqrt(m): (B, T, m)."""
    half_sq_BxTx1 = jnp.sum(x_BxTxD * x_BxTxD, axis=-1, keepdims=True) / 2
    wx_BxTxM = jnp.einsum("btd,md->btm", x_BxTxD, self.w.value.astype(x_BxTxD.dtype))
    return jnp.exp(wx_BxTxM - half_sq_BxTx1) / math.sqrt(self.num_features)

  def __call__(self, x_BxTxC, deterministic: bool = True):
    h = self.norm1(x_BxTxC)
    k, q, v = jnp.split(self.kqv(h), 3, axis=-1)
    acc = jnp.promote_types(v.dtype, jnp.float32)   # the official x.float()
    kp_BxTxM, qp_BxTxM = self.features(k.astype(acc)), self.features(q.astype(acc))
    norm_BxT = jnp.einsum("btm,bm->bt", qp_BxTxM, jnp.sum(kp_BxTxM, axis=1))
    kptv_BxDxM = jnp.einsum("btd,btm->bdm", v.astype(acc), kp_BxTxM)
    y_BxTxD = (jnp.einsum("btm,bdm->btd", qp_BxTxM, kptv_BxDxM)
               / (norm_BxT[..., None] + PERFORMER_EPS))
    x = v + self.drop(self.proj(y_BxTxD.astype(self.dtype)), deterministic=deterministic)
    y = self.mlp_2(nn.gelu(self.mlp_0(self.norm2(x)), approximate=False))
    return x + self.drop(y, deterministic=deterministic)


class TokenAttention(nn.Module):
  """The official token transformer's attention: one head of width ``dim`` on inputs of
  another width, logits scaled by (input width) ** -0.5, the values as its residual."""
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    dense = dict(kernel_init=layers.dense_init, dtype=self.dtype, param_dtype=self.param_dtype)
    self.qkv = nn.Dense(3 * self.dim, use_bias=False, **dense)
    self.proj = nn.Dense(self.dim, **dense)

  def __call__(self, h_BxTxC):
    q, k, v = jnp.split(self.qkv(h_BxTxC), 3, axis=-1)
    scale = h_BxTxC.shape[-1] ** -0.5
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits_BxTxT = jnp.einsum("bqd,bkd->bqk", q * jnp.asarray(scale, q.dtype), k,
                              preferred_element_type=acc)
    probs_BxTxT = nn.softmax(logits_BxTxT, axis=-1)
    out_BxTxD = jnp.einsum("bqk,bkd->bqd", probs_BxTxT.astype(v.dtype), v)
    return v + self.proj(out_BxTxD)


class TokenTransformer(nn.Module):
  """The official Token_transformer: ``TokenAttention`` then a residual MLP of width dim."""
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.norm1 = layers.layer_norm(LAYER_NORM_EPS, self.dtype, self.param_dtype)
    self.attn = TokenAttention(self.dim, self.dtype, self.param_dtype)
    self.norm2 = layers.layer_norm(LAYER_NORM_EPS, self.dtype, self.param_dtype)
    self.mlp = layers.Mlp(self.dim, self.dim, 0.0, self.dtype, self.param_dtype)

  def __call__(self, x_BxTxC, deterministic: bool = True):
    x = self.attn(self.norm1(x_BxTxC))
    return x + self.mlp(self.norm2(x), deterministic=deterministic)


class TokensToToken(nn.Module):
  """Soft split, token transformer, soft split, token transformer, soft split, projection
  to embed_dim: images (B, H, W, C) -> tokens (B, (H / 16) * (W / 16), embed_dim)."""
  config: Any

  def setup(self):
    cfg = self.config
    dtype, param_dtype = layers.DTYPES[cfg.dtype], layers.DTYPES[cfg.param_dtype]
    if cfg.tokens_type == "performer":
      make = lambda: TokenPerformer(cfg.token_dim, cfg.num_features,  # noqa: E731
                                    cfg.performer_dropout_rate, dtype, param_dtype)
    else:
      make = lambda: TokenTransformer(cfg.token_dim, dtype, param_dtype)  # noqa: E731
    self.attention1 = make()
    self.attention2 = make()
    self.project = nn.Dense(cfg.embed_dim, kernel_init=layers.dense_init, dtype=dtype,
                            param_dtype=param_dtype)

  def __call__(self, images_BxHxWxC, deterministic: bool = True):
    x = images_BxHxWxC
    for split, attention in zip(SOFT_SPLITS, (self.attention1, self.attention2, None)):
      tokens_BxTxD = soft_split(x, *split)
      if attention is None:
        return self.project(tokens_BxTxD)
      tokens_BxTxD = attention(tokens_BxTxD, deterministic)
      b, t, d = tokens_BxTxD.shape
      side = math.isqrt(t)
      x = tokens_BxTxD.reshape(b, side, side, d)


@register("t2t_vit")
class T2TViT(ClassTokenBackbone):
  """T2T-ViT with MCTF (``config``: a T2TViTConfig)."""
  config_class = T2TViTConfig
  POS_EMBED = "pos_embed"
  HEAD = "head"
  NO_WEIGHT_DECAY = ("cls_token",)   # the official no_weight_decay (pos_embed is fixed)
  # 64x64 images: 16 patches and the class token.
  TINY = dict(img_size=64, token_dim=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)

  def setup(self):
    cfg = self.config
    self.fusion.check_depth(cfg.depth)
    dtype, param_dtype = layers.DTYPES[cfg.dtype], layers.DTYPES[cfg.param_dtype]
    self.tokens_to_token = TokensToToken(cfg)
    self.cls_token = self.param("cls_token", layers.dense_init, (1, 1, cfg.embed_dim),
                                param_dtype)
    self.pos_embed = self.variable(CONSTANTS, "pos_embed", lambda: jnp.asarray(
        sinusoid_encoding(cfg.num_tokens, cfg.embed_dim), param_dtype))
    self.pos_drop = nn.Dropout(cfg.dropout_rate)
    self.blocks = [layers.Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.qkv_bias,
                                cfg.attn_scale, LAYER_NORM_EPS, cfg.dropout_rate, rate,
                                cfg.dtype, cfg.param_dtype)
                   for rate in cfg.drop_path_rates]
    self.norm = layers.layer_norm(LAYER_NORM_EPS, dtype, param_dtype)
    self.head = nn.Dense(cfg.num_classes, kernel_init=layers.dense_init, dtype=dtype,
                         param_dtype=param_dtype)

  def embed(self, images, deterministic: bool = True):
    self.check_images(images)
    with part_scope("embed"):
      x = self.tokens_to_token(images.astype(layers.DTYPES[self.config.dtype]), deterministic)
      return self.with_class_token(x, self.pos_embed.value, deterministic)

  # ------------------------------------------------------------------ for the tools

  @classmethod
  def describe(cls, cfg) -> str:
    name = "T2T-ViT" if cfg.tokens_type == "performer" else "T2T-ViT_t"
    return (f"{name}-{cfg.depth} ({cfg.tokens_type} T2T module, token_dim {cfg.token_dim}; "
            f"width {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, "
            f"qk_scale {cfg.attn_scale:.4g}, {cfg.img_size}x{cfg.img_size})")

  @classmethod
  def torch_shapes(cls, cfg) -> dict[str, tuple[int, ...]]:
    """The official names and shapes of every parameter, ``w`` and ``pos_embed`` included."""
    c, d, hidden = cfg.embed_dim, cfg.token_dim, cfg.mlp_dim
    shapes = {"cls_token": (1, 1, c), "pos_embed": (1, cfg.num_tokens, c)}
    for i, dim in enumerate(cfg.split_dims[:2], 1):
      a = f"tokens_to_token.attention{i}."
      if cfg.tokens_type == "performer":
        shapes.update({
            a + "w": (cfg.num_features, d),
            a + "kqv.weight": (3 * d, dim), a + "kqv.bias": (3 * d,),
            a + "proj.weight": (d, d), a + "proj.bias": (d,),
            a + "norm1.weight": (dim,), a + "norm1.bias": (dim,),
            a + "norm2.weight": (d,), a + "norm2.bias": (d,),
            a + "mlp.0.weight": (d, d), a + "mlp.0.bias": (d,),
            a + "mlp.2.weight": (d, d), a + "mlp.2.bias": (d,)})
      else:
        shapes.update(layers.block_torch_shapes(a, d, d, False, dim_in=dim))
    shapes.update({"tokens_to_token.project.weight": (c, cfg.split_dims[2]),
                   "tokens_to_token.project.bias": (c,)})
    for i in range(cfg.depth):
      shapes.update(layers.block_torch_shapes(f"blocks.{i}.", c, hidden, cfg.qkv_bias))
    shapes.update({"norm.weight": (c,), "norm.bias": (c,),
                   "head.weight": (cfg.num_classes, c), "head.bias": (cfg.num_classes,)})
    return shapes

  @classmethod
  def check_state_dict(cls, cfg, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """One line instead of the list of every mismatch when `source` is plainly another
    model: another backbone (no Tokens-to-Token weights), the other T2T module, or another
    width, depth or token_dim."""
    if not any(name.startswith("tokens_to_token.") for name in shapes):
      names = ", ".join(sorted(shapes)[:6]) + (", ..." if len(shapes) > 6 else "")
      raise CheckpointError(f"{source} is not a T2T-ViT checkpoint: none of its "
                            f"{len(shapes)} arrays ({names}) is a weight of the "
                            f"Tokens-to-Token module (tokens_to_token.*)")
    kinds = {"performer": "tokens_to_token.attention1.kqv.weight",
             "transformer": "tokens_to_token.attention1.attn.qkv.weight"}
    for kind, name in kinds.items():
      if name in shapes and kind != cfg.tokens_type:
        raise CheckpointError(f"{source} is a T2T-ViT with the {kind} Tokens-to-Token "
                              f"module ({name}), the config's is {cfg.tokens_type!r}: set "
                              f"model.tokens_type={kind!r}")
    width = shapes.get("cls_token", (None,))[-1]
    depth = len({name.split(".")[1] for name in shapes if name.startswith("blocks.")})
    project = shapes.get("tokens_to_token.project.weight")
    token_dim = project[1] // 9 if project and len(project) == 2 else None
    got = dict(embed_dim=width, depth=depth, token_dim=token_dim)
    differ = {k: v for k, v in got.items() if v and v != getattr(cfg, k)}
    if differ:
      have = ", ".join(f"{k} {v}" for k, v in got.items() if v)
      raise CheckpointError(f"{source} is a T2T-ViT of {have}; the config differs in "
                            f"{', '.join(f'model.{k}={getattr(cfg, k)}' for k in differ)}: "
                            f"choose its variant (configs/t2t_vit.py:14, :19, :24, :t_14, "
                            f"...) or set those fields")

  @staticmethod
  def _is_constant(torch_name: str) -> bool:
    return torch_name == "pos_embed" or (torch_name.startswith("tokens_to_token.")
                                         and torch_name.endswith(".w"))

  @classmethod
  def flax_path(cls, torch_name: str) -> tuple[str, tuple[str, ...]]:
    """timm's rules, with the fixed tensors in 'constants' and the Performer's
    ``mlp.0`` / ``mlp.2`` as ``mlp_0`` / ``mlp_2``."""
    if cls._is_constant(torch_name):
      return CONSTANTS, tuple(torch_name.split("."))
    return super().flax_path(re.sub(r"\.mlp\.(\d+)\.", r".mlp_\1.", torch_name))

  @classmethod
  def torch_name(cls, collection: str, path: tuple[str, ...]) -> str:
    if collection == CONSTANTS:
      return ".".join(path)
    return re.sub(r"\.mlp_(\d+)\.", r".mlp.\1.", super().torch_name(collection, path))

  @classmethod
  def flops_embed(cls, cfg):
    """The Tokens-to-Token module as fvcore counts the official one: the unfolds count
    nothing; per token transformer its LayerNorms, the q/k/v projection, the attention's
    products (Performer: the random features of q and k, the normaliser and the two
    products with the values, each einsum at its multiply-adds), the projection and the
    MLP; then the projection to embed_dim."""
    d, m = cfg.token_dim, cfg.num_features
    ops: dict[str, int] = {}

    def add(op, n):
      ops[op] = ops.get(op, 0) + n
    for side, dim in zip(cfg.grid_sizes[:2], cfg.split_dims[:2]):
      t = side * side
      add("norm", LAYER_NORM_FLOPS_PER_ELEMENT * t * (dim + d))
      add("qkv", t * dim * 3 * d)
      if cfg.tokens_type == "performer":
        add("scores", 2 * t * d * m + t * m)    # features of k and q; the normaliser
        add("attend", 2 * t * d * m)            # k'^T v, then q' (k'^T v)
      else:
        add("scores", t * t * d)
        add("attend", t * t * d)
      add("proj", t * d * d)
      add("mlp", 2 * t * d * d)
    add("patch_embed", cfg.num_patches * cfg.split_dims[2] * cfg.embed_dim)
    first = cfg.grid_sizes[0] ** 2
    return ("tokens_to_token", first, cfg.num_tokens, tuple(ops.items()))

  @classmethod
  def flops_tail(cls, cfg, tokens: int):
    """The final LayerNorm on every token, the head on the class token."""
    return (("norm", tokens, tokens,
             (("norm", LAYER_NORM_FLOPS_PER_ELEMENT * tokens * cfg.embed_dim),)),
            ("head", 1, 1, (("head", cfg.embed_dim * cfg.num_classes),)))
