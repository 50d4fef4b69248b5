"""DeiT / ViT (timm's VisionTransformer, as the official MCTF code uses it).

Patch embedding by a strided convolution, a class token, a learned position embedding,
pre-norm blocks (``layers.Block``), a final LayerNorm and a linear head on the class
token. Parameter names mirror timm's one to one, so DeiT and MCTF checkpoints convert
without a renaming table (``mctf_jax.convert``).

timm's options for the ViTs that followed are fields of the config: ``init_values``
(LayerScale on every residual branch: DeiT III, CaiT-style, DINOv2), ``no_embed_class``
(the position embedding on the patches only, the class token joining after it: DeiT III)
and ``reg_tokens`` (register tokens after the class token, "Vision Transformers Need
Registers"; timm's DINOv2 with registers). The class token and the registers are the
protected tokens, never fused. Official releases' names are read as timm's
(``rename_state_dict``): DeiT III's ``blocks.N.gamma_1`` / ``gamma_2``, DINOv2's
``register_tokens``.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn

from mctf_jax.errors import ConfigError, is_int
from mctf_jax.fusion.scopes import part_scope
from mctf_jax.models import layers
from mctf_jax.models.base import (LAYER_NORM_FLOPS_PER_ELEMENT, ClassTokenSizes,
                                  BackboneConfig, ClassTokenBackbone, PatchGrid, check_bools,
                                  check_heads, check_positive_int, check_positive_numbers,
                                  patch_embed_flops)
from mctf_jax.models.registry import register


@dataclasses.dataclass(frozen=True)
class DeiTConfig(ClassTokenSizes, PatchGrid, BackboneConfig):
  """A DeiT / ViT: patch embedding, class token, learned position embedding, pre-norm
  blocks, final norm, head on the class token."""
  arch: str = "deit"
  patch_size: int = 16
  embed_dim: int = 384
  num_heads: int = 6
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6
  init_values: float | None = None
  no_embed_class: bool = False
  reg_tokens: int = 0

  def __post_init__(self):
    super().__post_init__()
    for name in ("patch_size", "embed_dim", "num_heads"):
      check_positive_int(self, name)
    if self.img_size % self.patch_size:
      raise ConfigError(f"model.img_size={self.img_size} is not divisible by "
                        f"model.patch_size={self.patch_size}; choose sizes with "
                        f"img_size % patch_size == 0")
    check_heads(self)
    check_positive_numbers(self, "mlp_ratio", "layer_norm_eps")
    if self.init_values is not None:
      check_positive_numbers(self, "init_values")
    check_bools(self, "qkv_bias", "no_embed_class")
    if not is_int(self.reg_tokens) or self.reg_tokens < 0:
      raise ConfigError(f"model.reg_tokens must be an int >= 0 (register tokens), got "
                        f"{self.reg_tokens!r}")

  @property
  def num_protected(self) -> int:
    """The class token and the registers."""
    return 1 + self.reg_tokens

  @property
  def num_tokens(self) -> int:
    return self.num_patches + self.num_protected

  @property
  def pos_embed_len(self) -> int:
    """Entries of the position embedding: the patches', and the prefix tokens' unless
    no_embed_class."""
    return self.num_patches + (0 if self.no_embed_class else self.num_protected)


@register("deit")
class DeiT(ClassTokenBackbone):
  """DeiT / ViT with MCTF (``config``: a DeiTConfig)."""
  config_class = DeiTConfig
  POS_EMBED = "pos_embed"
  HEAD = "head"
  NO_WEIGHT_DECAY = ("pos_embed", "cls_token")
  TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=10)

  def setup(self):
    cfg = self.config
    self.fusion.check_depth(cfg.depth)
    dtype, param_dtype = layers.DTYPES[cfg.dtype], layers.DTYPES[cfg.param_dtype]
    self.patch_embed = layers.PatchEmbed(cfg.embed_dim, cfg.patch_size, dtype, param_dtype)
    self.cls_token = self.param("cls_token", layers.dense_init, (1, 1, cfg.embed_dim),
                                param_dtype)
    if cfg.reg_tokens:
      self.reg_token = self.param("reg_token", layers.dense_init,
                                  (1, cfg.reg_tokens, cfg.embed_dim), param_dtype)
    self.pos_embed = self.param("pos_embed", layers.dense_init,
                                (1, cfg.pos_embed_len, cfg.embed_dim), param_dtype)
    self.pos_drop = nn.Dropout(cfg.dropout_rate)
    self.blocks = [layers.Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.qkv_bias,
                                None, cfg.layer_norm_eps, cfg.dropout_rate, rate, cfg.dtype,
                                cfg.param_dtype, init_values=cfg.init_values)
                   for rate in cfg.drop_path_rates]
    self.norm = layers.layer_norm(cfg.layer_norm_eps, dtype, param_dtype)
    self.head = nn.Dense(cfg.num_classes, kernel_init=layers.dense_init, dtype=dtype,
                         param_dtype=param_dtype)

  def embed(self, images, deterministic: bool = True):
    self.check_images(images)
    with part_scope("embed"):
      cfg = self.config
      return self.with_class_token(self.patch_embed(images), self.pos_embed, deterministic,
                                   self.reg_token if cfg.reg_tokens else None,
                                   embed_prefix=not cfg.no_embed_class)

  # ------------------------------------------------------------------ for the tools

  @classmethod
  def describe(cls, cfg) -> str:
    extras = "".join([", LayerScale" if cfg.init_values is not None else "",
                      f", {cfg.reg_tokens} registers" if cfg.reg_tokens else ""])
    return (f"DeiT (width {cfg.embed_dim}, depth {cfg.depth}, {cfg.img_size}x{cfg.img_size}, "
            f"patch {cfg.patch_size}{extras})")

  @classmethod
  def pos_embed_prefix(cls, cfg) -> int:
    return 0 if cfg.no_embed_class else cfg.num_protected

  @classmethod
  def rename_state_dict(cls, cfg, state: dict) -> dict:
    """Official releases' names as timm's: DeiT III's LayerScale factors
    ``blocks.N.gamma_1`` / ``gamma_2`` as ``blocks.N.ls1.gamma`` / ``ls2.gamma``; DINOv2's
    ``register_tokens`` as ``reg_token``, its ``mask_token`` (masked-image pretraining)
    left out. (DINOv2's position embedding, which has an entry for the class token, is
    folded into it by the converter with no_embed_class.)"""
    out = {}
    for name, value in state.items():
      if name == "mask_token":
        continue
      name = "reg_token" if name == "register_tokens" else name
      out[re.sub(r"^(blocks\.\d+\.)gamma_([12])$", r"\1ls\2.gamma", name)] = value
    return out

  @classmethod
  def torch_shapes(cls, cfg) -> dict[str, tuple[int, ...]]:
    """timm's names and shapes of every parameter."""
    d, hidden, p = cfg.embed_dim, cfg.mlp_dim, cfg.patch_size
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, cfg.pos_embed_len, d),
        "patch_embed.proj.weight": (d, cfg.in_chans, p, p),
        "patch_embed.proj.bias": (d,),
    }
    if cfg.reg_tokens:
      shapes["reg_token"] = (1, cfg.reg_tokens, d)
    for i in range(cfg.depth):
      shapes.update(layers.block_torch_shapes(f"blocks.{i}.", d, hidden, cfg.qkv_bias,
                                              layer_scale=cfg.init_values is not None))
    shapes.update({"norm.weight": (d,), "norm.bias": (d,),
                   "head.weight": (cfg.num_classes, d), "head.bias": (cfg.num_classes,)})
    return shapes

  @classmethod
  def flops_embed(cls, cfg):
    return patch_embed_flops(cfg)

  @classmethod
  def flops_tail(cls, cfg, tokens: int):
    """The final LayerNorm on every token, the head on the class token."""
    return (("norm", tokens, tokens,
             (("norm", LAYER_NORM_FLOPS_PER_ELEMENT * tokens * cfg.embed_dim),)),
            ("head", 1, 1, (("head", cfg.embed_dim * cfg.num_classes),)))
