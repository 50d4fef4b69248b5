"""A small backbone that exists for the tests, a file's worth of what a user would write for
a ViT of their own (``--config.model.arch=toy_backbones:DistilledViT``): DeiT with a
distillation token (``num_protected`` 2), logits the mean of the class and distillation
heads, as timm's distilled DeiT evaluates. It runs the contract tests of
tests/test_backbones.py that bear on its two protected tokens, beside the registered
backbones; so does ``RegistersViT``, DeiT with LayerScale and register tokens.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mctf_jax.fusion.scopes import part_scope
from mctf_jax.models import layers
from mctf_jax.models.deit import DeiT, DeiTConfig


@dataclasses.dataclass(frozen=True)
class DistilledViTConfig(DeiTConfig):
  arch: str = "toy_backbones:DistilledViT"

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


@dataclasses.dataclass(frozen=True)
class RegistersViTConfig(DeiTConfig):
  arch: str = "toy_backbones:RegistersViT"


class RegistersViT(DeiT):
  """DeiT with timm's later options all on: LayerScale, the position embedding on the
  patches only, and two register tokens (three protected tokens), as DINOv2 with registers
  is built; the contract tests run it beside the distilled one."""
  config_class = RegistersViTConfig
  TINY = dict(img_size=32, patch_size=4, embed_dim=16, num_heads=2, depth=3, num_classes=10,
              init_values=0.5, no_embed_class=True, reg_tokens=2)
