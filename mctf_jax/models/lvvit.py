"""LV-ViT (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision
Transformers", NeurIPS 2021; github zihangJiang/TokenLabeling) on the fusion engine: arch
'lvvit'.

What the official ``LV_ViT`` computes (``tlt/models/lvvit.py``, ``tlt/models/layers.py``):

* a convolutional stem instead of the patch projection alone (``p_emb='4_2'``): conv 7x7
  stride 2 (padding 3), BatchNorm, ReLU, then twice conv 3x3 (padding 1), BatchNorm, ReLU,
  all ``stem_channels`` wide (64; 128 for LV-ViT-L's ``'4_2_128'``) and without bias, then
  the projection conv with kernel = stride = patch_size / 2 (so patches of patch_size
  pixels);
* a class token, a learned position embedding over the class token and the patches;
* pre-norm blocks without qkv bias whose residual branches are divided by ``skip_lam``
  (x + attn(norm1(x)) / skip_lam, then the same for the MLP), MLP ratio 3, PyTorch's
  LayerNorm epsilon 1e-5;
* the final LayerNorm, and two heads: ``head`` on the class token and ``aux_head`` on every
  patch token (the token-labeling head). At evaluation the model returns
  ``head(cls) + 0.5 * max over the patch tokens of aux_head(tokens)``, as the official
  model in eval mode with ``return_dense=True`` (LV-ViT-T/S/M/L).

With token fusion:

* the class token is protected (``num_protected`` 1);
* the max runs over the tokens left, a fused token counting once (it is one token), and
  padding rows (size 0, the padded teacher of ``fusion.padded``) never win it;
* training uses the class-token logits ``head(cls)`` (``train_logits``), as the official
  model trains without token labeling; ``aux_head`` then gets no gradient, so it is in
  ``EVAL_ONLY`` and the optimizer leaves it as loaded (no weight decay either); for
  another class count the converter sets it to zero, so that the evaluation logits are
  then the class token's;
* ``dense_aux_logits`` gives aux_head's logits at patch resolution, every patch taking the
  logits of the token that holds it (what a token-labeling loss over fused tokens needs).

The stem's BatchNorm statistics live in the 'batch_stats' collection (converted from the
checkpoint's running_mean / running_var, saved with the model). ``train_batch_norm``
picks how training treats them: False (the default) normalises with the running
statistics in training too and leaves them as loaded; True normalises with each batch's
statistics and updates the running ones, as PyTorch's ``model.train()`` (momentum 0.1;
flax updates the running variance with the biased batch variance, PyTorch with the
unbiased one, a factor n / (n - 1) with n = batch x 112 x 112 at 224 px). The default
suits what this package is for, fine-tuning released weights for a few epochs at a small
learning rate: the stem then normalises as it did when the weights were trained and
evaluated, independently of the batch (and of how the batch is split over devices).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mctf_jax.errors import CheckpointError, ConfigError
from mctf_jax.fusion.scopes import part_scope
from mctf_jax.models import layers
from mctf_jax.models.base import (LAYER_NORM_FLOPS_PER_ELEMENT, ClassTokenSizes,
                                  BackboneConfig, ClassTokenBackbone, EncoderOutput,
                                  PatchGrid, check_bools, check_heads, check_positive_int,
                                  check_positive_numbers)
from mctf_jax.models.registry import register

# fvcore counts an inference-mode BatchNorm with affine parameters as 2 FLOPs per element.
BATCH_NORM_FLOPS_PER_ELEMENT = 2
# The stem's convolutions before the projection: (kernel, stride, padding).
STEM_CONVS = ((7, 2, 3), (3, 1, 1), (3, 1, 1))
# The official models: (embed_dim, depth, num_heads, skip_lam, stem_channels).
SIZES = {
    "tiny": (240, 12, 4, 1.0, 64),      # lvvit_t
    "small": (384, 16, 6, 2.0, 64),     # lvvit_s
    "medium": (512, 20, 8, 2.0, 64),    # lvvit_m
    "large": (768, 24, 12, 3.0, 128),   # lvvit_l (p_emb '4_2_128')
}


@dataclasses.dataclass(frozen=True)
class LVViTConfig(ClassTokenSizes, PatchGrid, BackboneConfig):
  """LV-ViT; the defaults are LV-ViT-S at 224 px (``SIZES`` lists the official sizes).

  patch_size: pixels per patch side, even (the stem halves the image, the projection
    takes patches of patch_size / 2). stem_channels: width of the stem's convolutions
    (64: the official p_emb '4_2'; 128: '4_2_128'). skip_lam: the residual branches are
    divided by it. train_batch_norm: see the module docstring.
  """
  arch: str = "lvvit"
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 16
  num_heads: int = 6
  mlp_ratio: float = 3.0
  qkv_bias: bool = False
  skip_lam: float = 2.0
  stem_channels: int = 64
  layer_norm_eps: float = 1e-5
  batch_norm_eps: float = 1e-5
  train_batch_norm: bool = False

  def __post_init__(self):
    super().__post_init__()
    for name in ("patch_size", "embed_dim", "num_heads", "stem_channels"):
      check_positive_int(self, name)
    if self.patch_size % 2:
      raise ConfigError(f"model.patch_size={self.patch_size} is odd: LV-ViT's patch size must "
                        f"be even (its stem halves the image, then takes patches of "
                        f"patch_size / 2)")
    if self.img_size % self.patch_size:
      raise ConfigError(f"model.img_size={self.img_size} is not a multiple of "
                        f"model.patch_size={self.patch_size}: LV-ViT needs whole patches "
                        f"(e.g. img_size={self.img_size // self.patch_size * self.patch_size})")
    check_heads(self)
    check_positive_numbers(self, "mlp_ratio", "skip_lam", "layer_norm_eps", "batch_norm_eps")
    check_bools(self, "qkv_bias", "train_batch_norm")

  @property
  def stem_size(self) -> int:
    """Side of the stem's feature maps (the first convolution's stride 2)."""
    kernel, stride, pad = STEM_CONVS[0]
    return (self.img_size + 2 * pad - kernel) // stride + 1


class ConvStem(nn.Module):
  """LV-ViT's 4-layer patch embedding (official ``PatchEmbed4_2``): three convolutions with
  BatchNorm and ReLU, then the projection; (B, H, W, C_in) -> (B, patches, embed_dim).
  train: normalise with the batch's statistics and update the running ones (else the
  running statistics)."""
  channels: int
  embed_dim: int
  patch_size: int
  batch_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_BxHxWxC, train: bool = False):
    x = images_BxHxWxC
    for i, (kernel, stride, pad) in enumerate(STEM_CONVS, start=1):
      x = nn.Conv(self.channels, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False,
                  kernel_init=nn.initializers.he_normal(), dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"conv{i}")(x)
      # PyTorch's BatchNorm2d: momentum 0.1 (flax's 0.9), a two-pass variance.
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       epsilon=self.batch_norm_eps, dtype=self.dtype,
                       param_dtype=self.param_dtype, use_fast_variance=False,
                       name=f"bn{i}")(x)
      x = nn.relu(x)
    return PatchProjection(self.embed_dim, self.patch_size // 2, self.dtype,
                           self.param_dtype, name="proj")(x)


class PatchProjection(nn.Module):
  """The stem's projection, a convolution with kernel = stride = `patch` (and bias, the
  parameters of ``nn.Conv``), computed as a matmul of the flattened patches:
  (B, H, W, C) -> (B, (H // patch) * (W // patch), features). On the CPU XLA's convolution
  takes ~3.6x as long for this shape (64 input channels, 8x8) as the matmul of the same
  products; rows and columns past the last whole patch are dropped, as a VALID
  convolution drops them."""
  features: int
  patch: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    p = self.patch
    b, h, w, c = x_BxHxWxC.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x_BxHxWxC, kernel, bias, dtype=self.dtype)
    gh, gw = h // p, w // p
    patches = x[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(b, gh * gw, p * p * c) @ kernel.reshape(p * p * c, self.features) + bias


class LVViTBlock(layers.Block):
  """timm's pre-norm block with LV-ViT's residual: x + branch / skip_lam."""
  skip_lam: float = 1.0

  def residual(self, x_BxTxC, y_BxTxC, branch: int):
    return x_BxTxC + y_BxTxC / jnp.asarray(self.skip_lam, y_BxTxC.dtype)


@register("lvvit")
class LVViT(ClassTokenBackbone):
  """LV-ViT with MCTF (``config``: an LVViTConfig)."""
  config_class = LVViTConfig
  POS_EMBED = "pos_embed"
  HEAD = ("head", "aux_head")
  NO_WEIGHT_DECAY = ("pos_embed", "cls_token")
  EVAL_ONLY = ("aux_head",)
  # 32x32 images, patches of 8: 16 patches and the class token. The contract tests train
  # the stem's statistics (train_batch_norm), which they check the train step updates.
  TINY = dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, stem_channels=8,
              num_classes=10, train_batch_norm=True)

  def setup(self):
    cfg = self.config
    self.fusion.check_depth(cfg.depth)
    dtype, param_dtype = layers.DTYPES[cfg.dtype], layers.DTYPES[cfg.param_dtype]
    self.patch_embed = ConvStem(cfg.stem_channels, cfg.embed_dim, cfg.patch_size,
                                cfg.batch_norm_eps, dtype, param_dtype)
    self.cls_token = self.param("cls_token", layers.dense_init, (1, 1, cfg.embed_dim),
                                param_dtype)
    self.pos_embed = self.param("pos_embed", layers.dense_init,
                                (1, cfg.num_tokens, cfg.embed_dim), param_dtype)
    self.pos_drop = nn.Dropout(cfg.dropout_rate)
    self.blocks = [LVViTBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.qkv_bias, None,
                              cfg.layer_norm_eps, cfg.dropout_rate, rate, cfg.dtype,
                              cfg.param_dtype, skip_lam=cfg.skip_lam)
                   for rate in cfg.drop_path_rates]
    self.norm = layers.layer_norm(cfg.layer_norm_eps, dtype, param_dtype)
    dense = dict(kernel_init=layers.dense_init, dtype=dtype, param_dtype=param_dtype)
    self.head = nn.Dense(cfg.num_classes, **dense)
    self.aux_head = nn.Dense(cfg.num_classes, **dense)

  def embed(self, images, deterministic: bool = True):
    self.check_images(images)
    cfg = self.config
    with part_scope("embed"):
      x = self.patch_embed(images, train=cfg.train_batch_norm and not deterministic)
      return self.with_class_token(x, self.pos_embed, deterministic)

  def classify(self, tokens_BxTxC, size_BxT=None):
    """The official evaluation logits: head(cls) + 0.5 * the max over the patch tokens of
    aux_head(tokens); tokens of size 0 (padding) are left out of the max."""
    with part_scope("head"):
      aux_BxTxK = self.aux_head(tokens_BxTxC[:, 1:])
      if size_BxT is not None:
        real_BxT = size_BxT[:, 1:, None] > 0
        aux_BxTxK = jnp.where(real_BxT, aux_BxTxK, jnp.asarray(-jnp.inf, aux_BxTxK.dtype))
      return self.head(tokens_BxTxC[:, 0]) + 0.5 * jnp.max(aux_BxTxK, axis=1)

  def train_logits(self, tokens_BxTxC, size_BxT=None):
    """The class token's logits head(cls), what training's losses read."""
    with part_scope("head"):
      return self.head(tokens_BxTxC[:, 0])

  def patch_logits(self, out: EncoderOutput):
    """aux_head's logits at patch resolution, (B, num_patches, num_classes), patches in
    row-major order: each patch the logits of the token holding it. `out`: ``encode``'s
    output with trace_source (its token maps; without fusion there are none)."""
    aux_BxTxK = self.aux_head(out.tokens_BxTxC)
    if not out.layer_token_maps:
      if out.tokens_BxTxC.shape[1] != self.config.num_tokens:
        raise ValueError("patch_logits needs encode(..., trace_source=True) when tokens fuse")
      return aux_BxTxK[:, 1:]
    token_map_BxN = out.layer_token_maps[-1][1]
    return jnp.take_along_axis(aux_BxTxK, token_map_BxN[:, 1:, None], axis=1)

  def dense_aux_logits(self, images, *, r=None):
    """aux_head's logits of every patch, (B, num_patches, num_classes), at fusion.r or r:
    the patches of one fused token share its logits. Without fusion, aux_head of the patch
    tokens (the official model's dense output)."""
    return self.patch_logits(self.encode(images, r=r, trace_source=True))

  # ------------------------------------------------------------------ for the tools

  @classmethod
  def describe(cls, cfg) -> str:
    return (f"LV-ViT (width {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, "
            f"skip_lam {cfg.skip_lam:g}, stem {cfg.stem_channels}, "
            f"{cfg.img_size}x{cfg.img_size}, patch {cfg.patch_size})")

  @classmethod
  def flax_path(cls, torch_name: str) -> tuple[str, tuple[str, ...]]:
    """timm's rules; the stem's BatchNorm ``bnK.weight`` is its 'scale'."""
    collection, path = super().flax_path(torch_name)
    if len(path) >= 2 and path[-2].startswith("bn") and path[-1] == "kernel":
      path = path[:-1] + ("scale",)
    return collection, path

  @classmethod
  def check_state_dict(cls, cfg, state, source: str) -> None:
    """One line for a checkpoint of another model: no convolutional stem."""
    if "patch_embed.conv1.weight" not in state:
      names = sorted(state)
      listed = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
      raise CheckpointError(
          f"{source} is not an LV-ViT checkpoint: it has no convolutional stem "
          f"(patch_embed.conv1.weight); its {len(names)} weights are {listed}")
    if "aux_head.weight" not in state:
      raise CheckpointError(
          f"{source} has no aux_head (the token-labeling head): this backbone is LV-ViT "
          f"with return_dense=True (lvvit_t / lvvit_s / lvvit_m / lvvit_l)")

  @classmethod
  def torch_shapes(cls, cfg) -> dict[str, tuple[int, ...]]:
    """The official names and shapes of every parameter and BatchNorm statistic."""
    d, hidden, s, half = cfg.embed_dim, cfg.mlp_dim, cfg.stem_channels, cfg.patch_size // 2
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, cfg.num_tokens, d)}
    channels_in = cfg.in_chans
    for i, (kernel, _, _) in enumerate(STEM_CONVS, start=1):
      stem = f"patch_embed.bn{i}."
      shapes[f"patch_embed.conv{i}.weight"] = (s, channels_in, kernel, kernel)
      shapes.update({stem + "weight": (s,), stem + "bias": (s,), stem + "running_mean": (s,),
                     stem + "running_var": (s,)})
      channels_in = s
    shapes.update({"patch_embed.proj.weight": (d, s, half, half), "patch_embed.proj.bias": (d,)})
    for i in range(cfg.depth):
      shapes.update(layers.block_torch_shapes(f"blocks.{i}.", d, hidden, cfg.qkv_bias))
    k = cfg.num_classes
    shapes.update({"norm.weight": (d,), "norm.bias": (d,), "head.weight": (k, d),
                   "head.bias": (k,), "aux_head.weight": (k, d), "aux_head.bias": (k,)})
    return shapes

  @classmethod
  def flops_embed(cls, cfg):
    """The stem as fvcore counts it: each convolution (out positions x C_out x C_in x kh x
    kw) and each inference-mode BatchNorm (2 per element); ReLU is free."""
    s, positions = cfg.stem_channels, cfg.stem_size ** 2
    convs, channels_in = 0, cfg.in_chans
    for kernel, _, _ in STEM_CONVS:
      convs += positions * s * channels_in * kernel * kernel
      channels_in = s
    half = cfg.patch_size // 2
    convs += cfg.num_patches * cfg.embed_dim * s * half * half
    norms = len(STEM_CONVS) * BATCH_NORM_FLOPS_PER_ELEMENT * positions * s
    return ("patch_embed", positions, cfg.num_tokens, (("patch_embed", convs), ("norm", norms)))

  @classmethod
  def flops_tail(cls, cfg, tokens: int):
    """The final LayerNorm on every token; head on the class token and aux_head on every
    other token (fvcore counts both: the official evaluation computes them)."""
    d, k = cfg.embed_dim, cfg.num_classes
    return (("norm", tokens, tokens, (("norm", LAYER_NORM_FLOPS_PER_ELEMENT * tokens * d),)),
            ("head", tokens, 1, (("head", d * k + (tokens - 1) * d * k),)))
