"""Two small backbones that exist for the tests, each a file's worth of what a user would
write for a ViT of their own (``--config.model.arch=toy_backbones:GapViT``):

* ``GapViT``: no class token (``num_protected`` 0), a convolutional stem with BatchNorm
  (model state in a 'batch_stats' collection), residual branches scaled as LV-ViT scales
  them (x + f(x) / skip_lam), features and logits from the size-weighted mean of the
  tokens;
* ``DistilledViT``: DeiT with a distillation token (``num_protected`` 2), logits the mean
  of the class and distillation heads, as timm's distilled DeiT evaluates.

They run the contract tests of tests/test_backbones.py beside the registered backbones.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mctf_jax.fusion.scopes import part_scope
from mctf_jax.models import layers
from mctf_jax.models.base import (LAYER_NORM_FLOPS_PER_ELEMENT, Backbone, BackboneConfig,
                                  check_positive_int)
from mctf_jax.models.deit import DeiT, DeiTConfig


@dataclasses.dataclass(frozen=True)
class GapViTConfig(BackboneConfig):
  arch: str = "toy_backbones:GapViT"
  img_size: int = 16
  patch_size: int = 4          # the stem: a stride-2 conv, then patches of patch_size / 2
  embed_dim: int = 16
  num_heads: int = 2
  mlp_ratio: float = 3.0
  skip_lam: float = 2.0
  depth: int = 4

  def __post_init__(self):
    super().__post_init__()
    for name in ("patch_size", "embed_dim", "num_heads"):
      check_positive_int(self, name)

  @property
  def num_tokens(self) -> int:
    return (self.img_size // self.patch_size) ** 2

  @property
  def num_protected(self) -> int:
    return 0

  @property
  def mlp_dim(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)


class ScaledBlock(layers.Block):
  """timm's block with LV-ViT's residual: x + branch / skip_lam."""
  skip_lam: float = 1.0

  def residual(self, x_BxTxC, y_BxTxC, branch: int):
    return x_BxTxC + y_BxTxC / self.skip_lam


def _mean_by_size(tokens_BxTxC, size_BxT):
  weights = size_BxT.astype(tokens_BxTxC.dtype)[..., None]
  return jnp.sum(tokens_BxTxC * weights, axis=1) / jnp.sum(weights, axis=1)


class GapViT(Backbone):
  config_class = GapViTConfig
  HEAD = "head"
  NO_WEIGHT_DECAY = ("pos_embed",)
  TINY = dict(img_size=32, patch_size=4, embed_dim=16, num_heads=2, depth=3, num_classes=10)

  def setup(self):
    cfg = self.config
    self.fusion.check_depth(cfg.depth)
    dtype, param_dtype = layers.DTYPES[cfg.dtype], layers.DTYPES[cfg.param_dtype]
    half = cfg.patch_size // 2
    self.stem_conv = nn.Conv(cfg.embed_dim // 2, (3, 3), strides=(2, 2), padding=1,
                             use_bias=False, dtype=dtype, param_dtype=param_dtype)
    self.stem_norm = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype,
                                  param_dtype=param_dtype)
    self.patch_embed = layers.PatchEmbed(cfg.embed_dim, half, dtype, param_dtype)
    self.pos_embed = self.param("pos_embed", layers.dense_init,
                                (1, cfg.num_tokens, cfg.embed_dim), param_dtype)
    rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    self.blocks = [ScaledBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, False, None, 1e-6,
                               cfg.dropout_rate, rate, cfg.dtype, cfg.param_dtype,
                               skip_lam=cfg.skip_lam) for rate in rates]
    self.norm = layers.layer_norm(1e-6, dtype, param_dtype)
    self.head = nn.Dense(cfg.num_classes, dtype=dtype, param_dtype=param_dtype)

  def embed(self, images, deterministic: bool = True):
    self.check_images(images)
    with part_scope("embed"):
      x = self.stem_conv(images)
      x = nn.relu(self.stem_norm(x, use_running_average=deterministic))
      return self.patch_embed(x) + self.pos_embed.astype(x.dtype)

  def finish(self, x_BxTxC):
    with part_scope("norm"):
      return self.norm(x_BxTxC)

  def features(self, tokens_BxTxC, size_BxT):
    return _mean_by_size(tokens_BxTxC, size_BxT)

  def classify(self, tokens_BxTxC, size_BxT):
    with part_scope("head"):
      return self.head(_mean_by_size(tokens_BxTxC, size_BxT))

  @classmethod
  def torch_shapes(cls, cfg):
    d, hidden, half = cfg.embed_dim, cfg.mlp_dim, cfg.patch_size // 2
    shapes = {"stem_conv.weight": (d // 2, cfg.in_chans, 3, 3),
              "stem_norm.weight": (d // 2,), "stem_norm.bias": (d // 2,),
              "stem_norm.running_mean": (d // 2,), "stem_norm.running_var": (d // 2,),
              "patch_embed.proj.weight": (d, d // 2, half, half), "patch_embed.proj.bias": (d,),
              "pos_embed": (1, cfg.num_tokens, d)}
    for i in range(cfg.depth):
      b = f"blocks.{i}."
      shapes.update({
          b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
          b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
          b + "norm2.weight": (d,), b + "norm2.bias": (d,),
          b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
          b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
    shapes.update({"norm.weight": (d,), "norm.bias": (d,),
                   "head.weight": (cfg.num_classes, d), "head.bias": (cfg.num_classes,)})
    return shapes

  @classmethod
  def flops_embed(cls, cfg):
    d, half = cfg.embed_dim, cfg.patch_size // 2
    positions = (cfg.img_size // 2) ** 2
    conv = positions * (d // 2) * cfg.in_chans * 9
    patches = cfg.num_tokens * d * (d // 2) * half * half
    return ("patch_embed", positions, cfg.num_tokens, (("patch_embed", conv + patches),))

  @classmethod
  def flops_tail(cls, cfg, tokens: int):
    return (("norm", tokens, tokens,
             (("norm", LAYER_NORM_FLOPS_PER_ELEMENT * tokens * cfg.embed_dim),)),
            ("head", 1, 1, (("head", cfg.embed_dim * cfg.num_classes),)))


@dataclasses.dataclass(frozen=True)
class DistilledViTConfig(DeiTConfig):
  arch: str = "toy_backbones:DistilledViT"

  @property
  def num_tokens(self) -> int:
    return self.num_patches + 2

  @property
  def num_protected(self) -> int:
    return 2   # the class and the distillation token


class DistilledViT(DeiT):
  config_class = DistilledViTConfig
  NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "dist_token")
  TINY = dict(img_size=32, patch_size=4, embed_dim=16, num_heads=2, depth=3, num_classes=10)

  def setup(self):
    super().setup()
    cfg = self.config
    param_dtype = layers.DTYPES[cfg.param_dtype]
    self.dist_token = self.param("dist_token", layers.dense_init, (1, 1, cfg.embed_dim),
                                 param_dtype)
    self.head_dist = nn.Dense(cfg.num_classes, kernel_init=layers.dense_init,
                              dtype=layers.DTYPES[cfg.dtype], param_dtype=param_dtype)

  def embed(self, images, deterministic: bool = True):
    self.check_images(images)
    with part_scope("embed"):
      x = self.patch_embed(images)
      b, c = x.shape[0], x.shape[-1]
      prefix = [jnp.broadcast_to(t.astype(x.dtype), (b, 1, c))
                for t in (self.cls_token, self.dist_token)]
      return jnp.concatenate(prefix + [x], axis=1) + self.pos_embed.astype(x.dtype)

  def classify(self, tokens_BxTxC, size_BxT=None):
    with part_scope("head"):
      return (self.head(tokens_BxTxC[:, 0]) + self.head_dist(tokens_BxTxC[:, 1])) / 2

  @classmethod
  def torch_shapes(cls, cfg):
    shapes = super().torch_shapes(cfg)
    d = cfg.embed_dim
    shapes.update({"dist_token": (1, 1, d), "head_dist.weight": (cfg.num_classes, d),
                   "head_dist.bias": (cfg.num_classes,)})
    return shapes

  @classmethod
  def flops_tail(cls, cfg, tokens: int):
    norm, head = super().flops_tail(cfg, tokens)
    return (norm, ("head", 2, 2, (("head", 2 * cfg.embed_dim * cfg.num_classes),)))
