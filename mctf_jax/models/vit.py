"""big_vision's ViT (``big_vision/models/vit.py``) on the fusion engine: arch 'vit'.

The model big_vision and vision_transformer publish their checkpoints for (AugReg ViTs,
the i1k S/16 baselines, DeiT-3 ports, SigLIP image encoders), with every option those use:

* pooling (``pool_type``): 'tok' (a class token, concatenated after the position
  embedding), 'gap' (mean of the tokens), 'map' (multihead attention pooling with a learned
  probe, SigLIP's), '0' (the first token, no class token), 'none' (no pooling: the
  pre-logits layer and the head apply to every token, and the model's output is one row per
  token, (B, tokens, num_classes): big_vision's 'logits' with pool 'none', as a VLM's image
  encoder uses it, the head projecting into the language model; ``ViT.grid_outputs`` gives
  each patch the row of the token holding it, big_vision's 'logits_2d');
* position embedding (``posemb``): 'learn' (one per patch, none for the class token) or
  'sincos2d' (fixed, MoCo v3's 2-D sin-cos);
* ``rep_size``: a pre-logits Dense + tanh between the pooling and the head (0: none);
* any width, depth, MLP width, heads and patch size, or big_vision's variant names
  ('B/16', 'So400m/14', ...; ``decode_variant``);
* flax's defaults where big_vision relies on them: LayerNorm epsilon 1e-6, GELU in its tanh
  form. Images are expected in [-1, 1] (data.mean = data.std = 0.5 in the configs).

What changes against big_vision, for the fusion: without a class token ('gap', 'map')
nothing is protected (``num_protected`` 0) and the pooling honours the tokens' sizes: the
mean is weighted by size, and the MAP head's attention adds log(size) to its logits (as
proportional attention does in the blocks; sizes are 0 on padding rows, which the pooling
then ignores). With '0' the first token is protected, so that it stays the token pooled.
Without fusion every size is 1 and the outputs are big_vision's.

Parameters are named like timm's ViT (``blocks.3.attn.qkv.weight``, ``attn_pool.latent``;
``mctf_jax.convert.big_vision`` reads big_vision's own names), so the blocks are the
shared ``layers.Block`` and the tools' naming rules apply unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mctf_jax.errors import ConfigError, is_int
from mctf_jax.fusion.scopes import part_scope
from mctf_jax.models import layers
from mctf_jax.models.base import (LAYER_NORM_FLOPS_PER_ELEMENT, Backbone, BackboneConfig,
                                  PatchGrid, check_heads, check_positive_int,
                                  check_positive_numbers, patch_embed_flops)
from mctf_jax.models.registry import register

# big_vision's variant names: (width, depth, mlp_dim, num_heads), Table 2 of "Scaling Vision
# Transformers" and later additions.
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "G-opt": (1536, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}
POOL_TYPES = ("tok", "gap", "map", "0", "none")
POSEMB_TYPES = ("learn", "sincos2d")
# big_vision's defaults where neither the config nor the variant gives a size.
DEFAULT_SIZES = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)


def decode_variant(variant: str) -> dict:
  """The config fields of a big_vision variant name: 'B' -> width, depth, MLP width and
  heads; 'B/16' also the patch size. ConfigError for a name big_vision does not have."""
  known = ", ".join(VARIANTS)
  match = re.fullmatch(r"([A-Za-z0-9-]+)(?:/(\d+))?", variant) if isinstance(variant, str) \
      else None
  if match is None or match.group(1) not in VARIANTS:
    raise ConfigError(f"unknown model.variant {variant!r}: big_vision's variants are {known}, "
                      f"optionally with a patch size ('B/16', 'So400m/14')")
  width, depth, mlp_dim, heads = VARIANTS[match.group(1)]
  out = dict(embed_dim=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
  if match.group(2):
    out["patch_size"] = int(match.group(2))
  return out


def variant_of(embed_dim: int, depth: int) -> str | None:
  """The big_vision variant name of a width and depth, if there is one (for messages)."""
  for name, (width, d, _, _) in VARIANTS.items():
    if (width, d) == (embed_dim, depth):
      return name
  return None


@dataclasses.dataclass(frozen=True)
class ViTConfig(PatchGrid, BackboneConfig):
  """big_vision's ViT. The sizes left None come from ``variant`` (e.g. 'B/16'), else from
  big_vision's defaults (B/16); sizes given explicitly win over the variant's, as keyword
  arguments do in big_vision's ``vit.Model(variant=..., **kw)``. mlp_dim None: 4 x width.
  rep_size: width of the pre-logits layer (0: none; True: the model width)."""
  arch: str = "vit"
  variant: str | None = None
  depth: int | None = None
  patch_size: int | None = None
  embed_dim: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  pool_type: str = "gap"
  posemb: str = "learn"
  rep_size: int = 0
  layer_norm_eps: float = 1e-6

  def __post_init__(self):
    sizes = decode_variant(self.variant) if self.variant is not None else {}
    for name, default in DEFAULT_SIZES.items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, sizes.get(name, default))
    if self.mlp_dim is None:
      embed_dim = self.embed_dim if is_int(self.embed_dim) else 0
      object.__setattr__(self, "mlp_dim", sizes.get("mlp_dim", 4 * embed_dim))
    if self.rep_size is True:
      object.__setattr__(self, "rep_size", self.embed_dim)
    elif self.rep_size is False:
      object.__setattr__(self, "rep_size", 0)
    super().__post_init__()
    for name in ("patch_size", "embed_dim", "num_heads", "mlp_dim"):
      check_positive_int(self, name)
    if self.img_size < self.patch_size:
      raise ConfigError(f"model.img_size={self.img_size} is smaller than "
                        f"model.patch_size={self.patch_size}")
    check_heads(self)
    if self.pool_type not in POOL_TYPES:
      raise ConfigError(f"model.pool_type must be one of {POOL_TYPES}, got {self.pool_type!r}")
    if self.posemb not in POSEMB_TYPES:
      raise ConfigError(f"model.posemb must be one of {POSEMB_TYPES}, got {self.posemb!r}")
    if self.posemb == "sincos2d" and (self.embed_dim % 4 or self.embed_dim < 8):
      raise ConfigError(f"model.posemb='sincos2d' needs model.embed_dim a multiple of 4 and "
                        f">= 8, got {self.embed_dim}")
    if not is_int(self.rep_size) or self.rep_size < 0:
      raise ConfigError(f"model.rep_size must be an int >= 0 (0: no pre-logits layer), got "
                        f"{self.rep_size!r}")
    check_positive_numbers(self, "layer_norm_eps")

  @property
  def num_tokens(self) -> int:
    """Tokens entering the first block: the patches, and the class token with 'tok'."""
    return self.num_patches + (self.pool_type == "tok")

  @property
  def num_protected(self) -> int:
    """The class token ('tok'), the pooled first token ('0'), else none."""
    return 1 if self.pool_type in ("tok", "0") else 0

  @property
  def per_token_outputs(self) -> bool:
    """Pool 'none': an output per token, none per image."""
    return self.pool_type == "none"

  @property
  def pooled_dim(self) -> int:
    """Width of what the head reads: the pre-logits layer's, else the model's."""
    return self.rep_size or self.embed_dim


def posemb_sincos_2d(grid: int, width: int) -> np.ndarray:
  """The fixed 2-D sin-cos position embedding (1, grid * grid, width), float64: per patch
  (row y, column x), [sin(x w), cos(x w), sin(y w), cos(y w)] with the width / 4
  frequencies w_i = 10000 ** -(i / (width / 4 - 1)), patches in row-major order."""
  quarter = width // 4
  omega = 1.0 / 10_000.0 ** (np.arange(quarter, dtype=np.float64) / (quarter - 1))
  y, x = np.divmod(np.arange(grid * grid, dtype=np.float64), grid)
  x_Nxq, y_Nxq = x[:, None] * omega[None], y[:, None] * omega[None]
  pe = np.concatenate([np.sin(x_Nxq), np.cos(x_Nxq), np.sin(y_Nxq), np.cos(y_Nxq)], axis=1)
  return pe[None]


def size_weighted_mean(tokens_BxTxC, size_BxT):
  """The tokens' mean, each weighted by its size (the mean of the patches they hold)."""
  weights = size_BxT.astype(tokens_BxTxC.dtype)[..., None]
  return jnp.sum(tokens_BxTxC * weights, axis=1) / jnp.sum(weights, axis=1)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends to the tokens, then a residual
  MLP (big_vision's MAPHead). The probe's logits get + log(size) of each token, so a token
  holding n patches weighs as n copies (and padding rows, size 0, nothing).

  Parameters as timm's AttentionPoolLatent: latent (the probe), q, kv (keys then values),
  proj, norm, mlp.
  """
  dim: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    dense = dict(kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
                 param_dtype=self.param_dtype)
    self.latent = self.param("latent", nn.initializers.xavier_uniform(), (1, 1, self.dim),
                             self.param_dtype)
    self.q = nn.Dense(self.dim, **dense)
    self.kv = nn.Dense(2 * self.dim, **dense)
    self.proj = nn.Dense(self.dim, **dense)
    self.norm = layers.layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype)
    self.mlp = layers.Mlp(self.mlp_dim, self.dim, 0.0, self.dtype, self.param_dtype,
                          approximate_gelu=True)

  def __call__(self, tokens_BxTxC, size_BxT):
    b, t, c = tokens_BxTxC.shape
    h, d = self.num_heads, c // self.num_heads
    probe_Bx1xC = jnp.broadcast_to(self.latent.astype(tokens_BxTxC.dtype), (b, 1, c))
    q_Bx1xHxd = self.q(probe_Bx1xC).reshape(b, 1, h, d)
    k_BxTxC, v_BxTxC = jnp.split(self.kv(tokens_BxTxC), 2, axis=-1)
    q_Bx1xHxd = q_Bx1xHxd / jnp.sqrt(jnp.asarray(d, q_Bx1xHxd.dtype))
    acc = jnp.promote_types(q_Bx1xHxd.dtype, jnp.float32)
    logits_BxHx1xT = jnp.einsum("bqhd,bkhd->bhqk", q_Bx1xHxd, k_BxTxC.reshape(b, t, h, d),
                                preferred_element_type=acc)
    log_size = jnp.log(size_BxT.astype(acc))
    probs_BxHx1xT = jax.nn.softmax(logits_BxHx1xT + log_size[:, None, None, :], axis=-1)
    out_Bx1xHxd = jnp.einsum("bhqk,bkhd->bqhd", probs_BxHx1xT.astype(v_BxTxC.dtype),
                             v_BxTxC.reshape(b, t, h, d))
    x_Bx1xC = self.proj(out_Bx1xHxd.reshape(b, 1, c))
    x_Bx1xC = x_Bx1xC + self.mlp(self.norm(x_Bx1xC), deterministic=True)
    return x_Bx1xC[:, 0]


@register("vit")
class ViT(Backbone):
  """big_vision's ViT with MCTF (``config``: a ViTConfig)."""
  config_class = ViTConfig
  POS_EMBED = "pos_embed"
  HEAD = "head"
  NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "latent")
  TINY = dict(img_size=32, patch_size=4, embed_dim=16, depth=3, num_heads=2, mlp_dim=32,
              pool_type="map", num_classes=10)

  def setup(self):
    cfg = self.config
    self.fusion.check_depth(cfg.depth)
    dtype, param_dtype = layers.DTYPES[cfg.dtype], layers.DTYPES[cfg.param_dtype]
    c = cfg.embed_dim
    self.patch_embed = layers.PatchEmbed(c, cfg.patch_size, dtype, param_dtype)
    if cfg.posemb == "learn":
      self.pos_embed = self.param("pos_embed", nn.initializers.normal(1 / math.sqrt(c)),
                                  (1, cfg.num_patches, c), param_dtype)
    if cfg.pool_type == "tok":
      self.cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, c), param_dtype)
    self.pos_drop = nn.Dropout(cfg.dropout_rate)
    self.blocks = [layers.Block(c, cfg.num_heads, cfg.mlp_dim, True, None, cfg.layer_norm_eps,
                                cfg.dropout_rate, rate, cfg.dtype, cfg.param_dtype,
                                approximate_gelu=True)
                   for rate in cfg.drop_path_rates]
    self.norm = layers.layer_norm(cfg.layer_norm_eps, dtype, param_dtype)
    if cfg.pool_type == "map":
      self.attn_pool = MAPHead(c, cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_eps, dtype,
                               param_dtype)
    if cfg.rep_size:
      self.pre_logits = nn.Dense(cfg.rep_size, dtype=dtype, param_dtype=param_dtype)
    self.head = nn.Dense(cfg.num_classes, kernel_init=layers.dense_init, dtype=dtype,
                         param_dtype=param_dtype)

  def embed(self, images, deterministic: bool = True):
    self.check_images(images)
    cfg = self.config
    with part_scope("embed"):
      x = self.patch_embed(images)
      if cfg.posemb == "learn":
        x = x + self.pos_embed.astype(x.dtype)
      else:
        x = x + jnp.asarray(posemb_sincos_2d(cfg.grid_size, cfg.embed_dim), x.dtype)
      if cfg.pool_type == "tok":   # after the position embedding, as big_vision
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
      return self.pos_drop(x, deterministic=deterministic)

  def finish(self, x_BxTxC):
    with part_scope("norm"):
      return self.norm(x_BxTxC)

  def pool(self, tokens_BxTxC, size_BxT):
    """The pooled representation (big_vision's 'head_input'), sizes honoured; with pool
    'none' the tokens themselves."""
    pool_type = self.config.pool_type
    if pool_type in ("tok", "0"):
      return tokens_BxTxC[:, 0]
    if pool_type == "gap":
      return size_weighted_mean(tokens_BxTxC, size_BxT)
    if pool_type == "none":
      return tokens_BxTxC
    return self.attn_pool(tokens_BxTxC, size_BxT)

  def features(self, tokens_BxTxC, size_BxT):
    """The pooled representation (what the head's input is made from)."""
    return self.pool(tokens_BxTxC, size_BxT)

  def pre_logits_of(self, tokens_BxTxC, size_BxT):
    """big_vision's 'pre_logits': the pooled representation, through Dense + tanh with
    rep_size."""
    x = self.pool(tokens_BxTxC, size_BxT)
    return jnp.tanh(self.pre_logits(x)) if self.config.rep_size else x

  def classify(self, tokens_BxTxC, size_BxT):
    with part_scope("head"):
      return self.head(self.pre_logits_of(tokens_BxTxC, size_BxT))

  def grid_outputs(self, images, r=None):
    """Pool 'none': each patch's output row, (B, grid, grid, num_classes), the row of the
    token that holds the patch after the fusion (at fusion.r, or r); without fusion the
    model's output in the patches' grid (big_vision's 'logits_2d')."""
    cfg = self.config
    if not cfg.per_token_outputs:
      raise ValueError(f"grid_outputs needs model.pool_type='none' (an output per token), "
                       f"got {cfg.pool_type!r}")
    out = self.encode(images, r=r, trace_source=True)
    per_patch = self.classify(out.tokens_BxTxC, out.size_BxT)
    if out.layer_token_maps:   # patch n takes the row of token_map[n], the token holding it
      token_map_BxN = out.layer_token_maps[-1][1]
      per_patch = jnp.take_along_axis(per_patch, token_map_BxN[..., None], axis=1)
    return per_patch.reshape(per_patch.shape[0], cfg.grid_size, cfg.grid_size, -1)

  # ------------------------------------------------------------------ for the tools

  @classmethod
  def pos_embed_prefix(cls, cfg) -> int:
    """The position embedding covers the patches only (the class token has none)."""
    return 0

  @classmethod
  def describe(cls, cfg) -> str:
    name = f"ViT-{cfg.variant}" if cfg.variant else "ViT"
    return (f"{name} (big_vision; width {cfg.embed_dim}, depth {cfg.depth}, "
            f"{cfg.num_heads} heads, MLP {cfg.mlp_dim}, patch {cfg.patch_size}, "
            f"pool '{cfg.pool_type}', {cfg.img_size}x{cfg.img_size})")

  @classmethod
  def torch_shapes(cls, cfg) -> dict[str, tuple[int, ...]]:
    """Names (timm's, for the parts timm has) and PyTorch-layout shapes of every
    parameter."""
    d, hidden, p = cfg.embed_dim, cfg.mlp_dim, cfg.patch_size
    shapes = {"patch_embed.proj.weight": (d, cfg.in_chans, p, p),
              "patch_embed.proj.bias": (d,)}
    if cfg.posemb == "learn":
      shapes["pos_embed"] = (1, cfg.num_patches, d)
    if cfg.pool_type == "tok":
      shapes["cls_token"] = (1, 1, d)
    for i in range(cfg.depth):
      shapes.update(layers.block_torch_shapes(f"blocks.{i}.", d, hidden, True))
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
    if cfg.pool_type == "map":
      a = "attn_pool."
      shapes.update({
          a + "latent": (1, 1, d),
          a + "q.weight": (d, d), a + "q.bias": (d,),
          a + "kv.weight": (2 * d, d), a + "kv.bias": (2 * d,),
          a + "proj.weight": (d, d), a + "proj.bias": (d,),
          a + "norm.weight": (d,), a + "norm.bias": (d,),
          a + "mlp.fc1.weight": (hidden, d), a + "mlp.fc1.bias": (hidden,),
          a + "mlp.fc2.weight": (d, hidden), a + "mlp.fc2.bias": (d,),
      })
    if cfg.rep_size:
      shapes.update({"pre_logits.weight": (cfg.rep_size, d), "pre_logits.bias": (cfg.rep_size,)})
    shapes.update({"head.weight": (cfg.num_classes, cfg.pooled_dim),
                   "head.bias": (cfg.num_classes,)})
    return shapes

  @classmethod
  def flops_embed(cls, cfg):
    return patch_embed_flops(cfg)

  @classmethod
  def flops_tail(cls, cfg, tokens: int):
    """The final LayerNorm on every token; the MAP head ('map': the probe's query, the
    tokens' keys and values, its attention, projection, LayerNorm and MLP); the pre-logits
    layer; the head. The weighted mean of 'gap' is elementwise work (no FLOPs)."""
    c = cfg.embed_dim
    stages = [("norm", tokens, tokens, (("norm", LAYER_NORM_FLOPS_PER_ELEMENT * tokens * c),))]
    if cfg.pool_type == "map":
      stages.append(("map_head", tokens, 1, (
          ("qkv", c * c + tokens * c * 2 * c), ("scores", tokens * c), ("attend", tokens * c),
          ("proj", c * c), ("norm", LAYER_NORM_FLOPS_PER_ELEMENT * c),
          ("mlp", 2 * c * cfg.mlp_dim))))
    rows = tokens if cfg.per_token_outputs else 1   # pool 'none': the head on every token
    if cfg.rep_size:
      stages.append(("pre_logits", rows, rows, (("head", rows * c * cfg.rep_size),)))
    stages.append(("head", rows, rows, (("head", rows * cfg.pooled_dim * cfg.num_classes),)))
    return tuple(stages)
