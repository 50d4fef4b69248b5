"""What every backbone is: ``BackboneConfig`` and the ``Backbone`` module protocol.

A backbone is one file that subclasses both and registers itself
(``mctf_jax.models.registry``). It supplies

    setup()                           self.blocks: its blocks, each with the members of the
                                      fusion's block protocol (mctf_jax.fusion.block); and
                                      its embedding, final norm and head
    embed(images, deterministic)      -> x_BxTxC, the tokens entering block 0, the
                                      config.num_protected protected ones first
    finish(x_BxTxC)                   -> tokens_BxTxC, what follows the blocks (final norm)
    features(tokens_BxTxC, size_BxT)  -> BxF, the representation that the token reduction
                                      consistency compares (DeiT: the class token)
    classify(tokens_BxTxC, size_BxT)  -> logits (B, num_classes)
    train_logits(tokens_BxTxC, size_BxT)
                                      -> the logits training's losses read; by default
                                      classify's (LV-ViT: the class token's head alone)

and, as class attributes and classmethods used by the tools (checkpoint conversion, FLOP
counting, optimizer, tests), ``config_class``, ``torch_shapes``, ``flops_embed``,
``flops_tail``, ``describe``, ``NO_WEIGHT_DECAY``, ``EVAL_ONLY``, ``POS_EMBED``, ``HEAD`` and
``TINY``; the naming of parameters in PyTorch checkpoints defaults to timm's (see
``flax_path``), and ``check_state_dict`` may refuse another model's checkpoint. The
sizes on padded arrays are 0 on the padding rows: ``classify`` and ``features`` must give
those rows no weight.

On that, this base class builds what the rest of the package uses (the train step, the
evaluation, the tools), through the fusion engine's drivers (mctf_jax.fusion.stack):
``schedule``, ``with_fusion``, ``encode``, ``__call__`` (logits), ``run_unfused``,
``run_blocks``, ``run_blocks_padded`` and ``dummy_images``.

Model state other than parameters (e.g. BatchNorm statistics, in a 'batch_stats'
collection) may live in the embedding only: the train step updates it there (the
embedding runs with the state collections mutable in training) and reads it elsewhere.
Fixed tensors that checkpoints hold but training must not change (T2T-ViT's sinusoid
position embedding and Performer matrices, its 'constants' collection) are model state
too: the embedding reads them and never writes them, and the optimizer never sees them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mctf_jax.errors import ConfigError, is_int, is_number
from mctf_jax.fusion import stack
from mctf_jax.fusion.config import FusionConfig
from mctf_jax.fusion.merge import source_map
from mctf_jax.fusion.scopes import part_scope
from mctf_jax.fusion.schedule import Schedule, compute_schedule
from mctf_jax.models.layers import DTYPES

DTYPE_NAMES = tuple(DTYPES)
# FLOPs are counted as fvcore counts them (mctf_jax.cost): one multiply-add is one
# FLOP, and a LayerNorm with its affine parameters is 5 per element.
LAYER_NORM_FLOPS_PER_ELEMENT = 5


def patch_embed_flops(cfg) -> tuple:
  """``Backbone.flops_embed`` of a patch embedding by a strided convolution (fvcore: out
  positions x C_out x C_in x kh x kw), for configs with num_patches, num_tokens, embed_dim,
  in_chans and patch_size."""
  return ("patch_embed", cfg.num_patches, cfg.num_tokens,
          (("patch_embed", cfg.num_patches * cfg.embed_dim * cfg.in_chans
            * cfg.patch_size ** 2),))


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """The fields every backbone's config has, checked; a backbone's config subclasses it.

  A subclass defines ``num_tokens`` (tokens entering block 0), ``num_protected`` (the
  leading tokens never merged: 1 for a class token, 2 with a distillation token, 0 for
  models pooled by average or attention), ``embed_dim``, ``mlp_dim``, ``num_heads``, and
  may check its own fields in ``__post_init__`` (calling this one's first).
  """
  arch: str = ""
  img_size: int = 224
  in_chans: int = 3
  depth: int = 12
  num_classes: int = 1000
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  dtype: str = "float32"        # compute dtype; parameters stay float32
  param_dtype: str = "float32"
  # Rematerialisation of each block in training (stack.REMAT_POLICIES): 'none', 'full',
  # 'dots', 'dots_with_no_batch_dims'; less memory for more compute, the same results.
  remat_policy: str = "none"

  def __post_init__(self):
    for name in ("img_size", "in_chans", "depth", "num_classes"):
      check_positive_int(self, name)
    for name in ("drop_path_rate", "dropout_rate"):
      value = getattr(self, name)
      if not is_number(value) or not 0 <= value < 1:
        raise ConfigError(f"model.{name} must be in [0, 1), got {value!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPE_NAMES:
        raise ConfigError(f"model.{name} must be one of {DTYPE_NAMES}, "
                          f"got {getattr(self, name)!r}")
    stack.check_remat_policy(self.remat_policy)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(height, width, channels) of the images the model takes."""
    return (self.img_size, self.img_size, self.in_chans)

  @property
  def per_token_outputs(self) -> bool:
    """Whether the model's output is a row per token (B, tokens, num_classes) rather than a
    row per image (big_vision's pool 'none'); train.py and eval.py need one per image."""
    return False

  @property
  def drop_path_rates(self) -> list[float]:
    """Each block's stochastic depth: rising linearly from 0 to drop_path_rate (timm's)."""
    return [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]


class ClassTokenSizes:
  """The sizes of a config with a class token before its patches (``num_patches``) and
  an MLP of ``mlp_ratio`` times ``embed_dim`` (DeiT, T2T-ViT, LV-ViT)."""

  @property
  def num_tokens(self) -> int:
    """Tokens entering the first block: the patches and the class token."""
    return self.num_patches + 1

  @property
  def num_protected(self) -> int:
    return 1   # the class token

  @property
  def mlp_dim(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)


class PatchGrid:
  """The patch grid of a config with ``img_size`` and ``patch_size``: square images cut
  into whole patches; as a 'VALID' convolution, the pixels past the last whole patch are
  left out (SigLIP So400m/14 at 384: 27 x 27 patches)."""

  @property
  def grid_size(self) -> int:
    """Patches per side."""
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2


def check_positive_int(cfg, name: str) -> None:
  value = getattr(cfg, name)
  if not is_int(value) or value < 1:
    raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")


def check_positive_numbers(cfg, *names: str) -> None:
  """ConfigError unless every named field is a number > 0."""
  for name in names:
    value = getattr(cfg, name)
    if not is_number(value) or value <= 0:
      raise ConfigError(f"model.{name} must be a number > 0, got {value!r}")


def check_bools(cfg, *names: str) -> None:
  """ConfigError unless every named field is True or False."""
  for name in names:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
      raise ConfigError(f"model.{name} must be True or False, got {value!r}")


def check_heads(cfg) -> None:
  """ConfigError unless the heads split ``embed_dim`` evenly."""
  if cfg.embed_dim % cfg.num_heads:
    raise ConfigError(f"model.embed_dim={cfg.embed_dim} is not divisible by "
                      f"model.num_heads={cfg.num_heads}")


class EncoderOutput(NamedTuple):
  """Result of ``Backbone.encode`` and of the block runs.

  tokens_BxTxC: the final tokens after ``finish`` (protected tokens first).
  size_BxT: their sizes (float32 at least; 0 on padding rows).
  source_BxTxN: 0/1 map of the initial tokens each final token holds (trace_source only).
  layer_token_maps: for every block that fused, (layer, token_map_BxN) after it
    (trace_source only); token_map[b, n] is the token holding initial token n.
  """
  tokens_BxTxC: jax.Array
  size_BxT: jax.Array
  source_BxTxN: jax.Array | None
  layer_token_maps: tuple[tuple[int, jax.Array], ...]


def consistency(student_BxF, teacher_BxF):
  """Per-example mean squared difference of the features, the teacher's held fixed."""
  teacher = jax.lax.stop_gradient(teacher_BxF)
  acc = jnp.promote_types(teacher.dtype, jnp.float32)
  diff = teacher.astype(acc) - student_BxF.astype(acc)
  return jnp.mean(jnp.square(diff), axis=-1)


class Backbone(nn.Module):
  """A ViT whose blocks fuse tokens; see the module docstring for what a subclass supplies.

  ``model.apply({'params': p}, images, train=False)`` -> logits (B, num_classes), with
  images NHWC floats of ``config.image_shape``. Training runs the student and teacher paths
  through ``run_unfused``, ``run_blocks`` / ``run_blocks_padded``, ``train_logits`` and
  ``features`` (``mctf_jax.training.train_step.loss_and_grads``).
  """
  config: Any
  fusion: FusionConfig

  arch: ClassVar[str] = ""
  config_class: ClassVar[type] = BackboneConfig

  # ------------------------------------------------------------------ what a backbone supplies

  def embed(self, images, deterministic: bool = True):
    """The tokens entering block 0, (B, num_tokens, C), the protected ones first."""
    raise NotImplementedError(f"{type(self).__name__} does not define embed()")

  def finish(self, x_BxTxC):
    """What follows the blocks (the final norm)."""
    raise NotImplementedError(f"{type(self).__name__} does not define finish()")

  def features(self, tokens_BxTxC, size_BxT):
    """The (B, F) representation that the token reduction consistency compares."""
    raise NotImplementedError(f"{type(self).__name__} does not define features()")

  def classify(self, tokens_BxTxC, size_BxT):
    """Logits (B, num_classes) from the final tokens (size 0 on padding rows)."""
    raise NotImplementedError(f"{type(self).__name__} does not define classify()")

  def train_logits(self, tokens_BxTxC, size_BxT):
    """The logits that training's losses read (the train step, ``__call__`` with
    train=True); ``classify``'s unless a backbone trains on other logits than it evaluates."""
    return self.classify(tokens_BxTxC, size_BxT)

  # ------------------------------------------------------------------ static helpers

  def schedule(self, r=None) -> Schedule:
    """The fusion schedule at fusion.r, or at the r given (a count or a ratio)."""
    cfg = self.config
    return compute_schedule(self.fusion, num_tokens=cfg.num_tokens, depth=cfg.depth,
                            num_protected=cfg.num_protected, r=r)

  def with_fusion(self, **changes) -> "Backbone":
    """The same model (same parameters) with other fusion settings, e.g. ``r=8``."""
    return self.clone(fusion=self.fusion.with_changes(**changes))

  def dummy_images(self, batch_size: int = 1, dtype=jnp.float32) -> jax.Array:
    """Zeros of the images' shape, e.g. for ``init``."""
    return jnp.zeros((batch_size,) + tuple(self.config.image_shape), dtype)

  def check_images(self, images) -> None:
    """ValueError unless `images` are float NHWC of this config's image shape."""
    cfg = self.config
    expected = tuple(cfg.image_shape)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"images must be NHWC of shape (batch, {', '.join(map(str, expected))}) "
                       f"for this config (img_size={cfg.img_size}, in_chans={cfg.in_chans}), "
                       f"got shape {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be floating point (normalised pixels), got dtype "
                       f"{images.dtype}; convert uint8 images with the input pipeline's "
                       f"normalisation first")

  # ------------------------------------------------------------------ block runs

  def run_unfused(self, x_BxTxC, stop: int, *, deterministic: bool = True):
    """Blocks 0 .. stop-1 as ordinary blocks: the tokens entering block `stop`."""
    return stack.run_unfused(self.blocks, x_BxTxC, stop, self.fusion,
                             deterministic=deterministic, remat_policy=self.config.remat_policy)

  def run_blocks(self, x_BxTxC, schedule: Schedule, *, deterministic: bool = True,
                 trace_source: bool | None = None, start: int = 0) -> EncoderOutput:
    """The blocks as `schedule` says, then ``finish``.

    start: the first block to run, x being the tokens that enter it (from ``run_unfused``);
    the blocks before it must not fuse in `schedule`. The train step runs those blocks once
    for the student and the teacher path.
    """
    trace = self.fusion.trace_source if trace_source is None else trace_source
    state, layer_maps = stack.run_exact(self.blocks, x_BxTxC, schedule, self.fusion,
                                        deterministic=deterministic, trace_source=trace,
                                        start=start, remat_policy=self.config.remat_policy)
    tokens_out = self.finish(state.x_BxTxC)
    size = state.size_BxT
    if size is None:
      size = jnp.ones(tokens_out.shape[:2], jnp.promote_types(tokens_out.dtype, jnp.float32))
    source = (source_map(state.token_map_BxN, tokens_out.shape[1], size.dtype)
              if trace else None)
    return EncoderOutput(tokens_out, size, source, layer_maps)

  def run_blocks_padded(self, x_BxTxC, layout, splits_Lx2, *, max_moved: int,
                        deterministic: bool = True, start: int = 0,
                        first: jax.Array | None = None, scan: bool | None = None
                        ) -> EncoderOutput:
    """``run_blocks`` on padded arrays of the widths in `layout` (``fusion.stack.run_padded``;
    scan defaults to fusion.train_scan_blocks). The final tokens come at the last width of
    the layout, padding included (its sizes are 0)."""
    scan = self.fusion.train_scan_blocks if scan is None else scan
    cfg = self.config
    state = stack.run_padded(self.blocks, x_BxTxC, layout, splits_Lx2, self.fusion,
                             num_protected=cfg.num_protected, max_moved=max_moved,
                             fusion_width=cfg.num_tokens, deterministic=deterministic,
                             start=start, first=first,
                             scan=scan and not self.is_initializing(),
                             remat_policy=self.config.remat_policy)
    return EncoderOutput(self.finish(state.x_BxTxC), state.size_BxT, None, ())

  # ------------------------------------------------------------------ forward

  def encode(self, images, *, train: bool = False, r=None,
             trace_source: bool | None = None) -> EncoderOutput:
    """Final tokens, sizes and (optionally) sources of `images`, at fusion.r or r."""
    x = self.embed(images, deterministic=not train)
    return self.run_blocks(x, self.schedule(r), deterministic=not train,
                           trace_source=trace_source)

  def __call__(self, images, *, train: bool = False):
    """Logits (B, num_classes) at fusion.r: ``classify``'s, or with train=True (dropout and
    stochastic depth on, keys from ``rngs={'dropout': key}``) ``train_logits``'. The training
    loss with its teacher path is ``mctf_jax.training.train_step.loss_and_grads``."""
    deterministic = not train
    logits_of = self.train_logits if train else self.classify
    x = self.embed(images, deterministic)
    out = self.run_blocks(x, self.schedule(), deterministic=deterministic)
    return logits_of(out.tokens_BxTxC, out.size_BxT)

  # ------------------------------------------------------------------ for the tools

  @classmethod
  def describe(cls, cfg) -> str:
    """One line naming the architecture and its size."""
    return f"{cls.__name__} (depth {cfg.depth}, {cfg.img_size}x{cfg.img_size})"

  @classmethod
  def torch_shapes(cls, cfg) -> dict[str, tuple[int, ...]]:
    """PyTorch names and shapes of every parameter (and state buffer) of the model."""
    raise NotImplementedError(f"{cls.__name__} has no PyTorch naming")

  @classmethod
  def flax_path(cls, torch_name: str) -> tuple[str, tuple[str, ...]]:
    """(collection, path) of a PyTorch parameter or buffer, timm's naming:
    ``blocks.3.attn.qkv.weight`` -> ('params', ('blocks_3', 'attn', 'qkv', 'kernel')),
    a norm's ``weight`` is its 'scale', BatchNorm's ``running_mean``/``running_var`` its
    'batch_stats' 'mean'/'var'."""
    parts = torch_name.split(".")
    path = []
    i = 0
    while i < len(parts):
      if parts[i] == "blocks" and i + 1 < len(parts):
        path.append(f"blocks_{parts[i + 1]}")
        i += 2
        continue
      path.append(parts[i])
      i += 1
    collection = "params"
    if path[-1] in ("running_mean", "running_var"):
      collection, path[-1] = "batch_stats", path[-1][len("running_"):]
    elif path[-1] == "weight":
      path[-1] = "scale" if "norm" in path[-2] else "kernel"
    return collection, tuple(path)

  @classmethod
  def torch_name(cls, collection: str, path: tuple[str, ...]) -> str:
    """The inverse of ``flax_path``."""
    parts = []
    for part in path:
      if part.startswith("blocks_"):
        parts += ["blocks", part[len("blocks_"):]]
      else:
        parts.append(part)
    if collection == "batch_stats":
      parts[-1] = "running_" + parts[-1]
    elif parts[-1] in ("kernel", "scale"):
      parts[-1] = "weight"
    return ".".join(parts)

  @staticmethod
  def to_flax_layout(torch_name: str, value):
    """A PyTorch tensor in Flax's layout: linear (out, in) -> (in, out), conv
    (O, I, kh, kw) -> (kh, kw, I, O)."""
    if torch_name.endswith(".weight") and value.ndim == 4:
      return value.transpose(2, 3, 1, 0)
    if torch_name.endswith(".weight") and value.ndim == 2:
      return value.T
    return value

  @staticmethod
  def to_torch_layout(torch_name: str, value):
    """The inverse of ``to_flax_layout``."""
    if torch_name.endswith(".weight") and value.ndim == 4:
      return value.transpose(3, 2, 0, 1)
    if torch_name.endswith(".weight") and value.ndim == 2:
      return value.T
    return value

  # A tiny size of the backbone (config.model fields): what the contract tests of every
  # backbone run (tests/test_backbones.py), with 3 blocks, at 32x32 images unless it gives
  # another img_size (T2T-ViT: 64, for 16 patches).
  TINY: ClassVar[dict] = {}
  # Parameters without weight decay besides the 1-D ones, by name (timm's no_weight_decay).
  NO_WEIGHT_DECAY: ClassVar[tuple[str, ...]] = ()
  # Parameters, by name, that only ``classify`` reads, not ``train_logits`` or ``features``:
  # training gives them no gradient, and the optimizer no weight decay (they stay as
  # loaded, as PyTorch's AdamW leaves a parameter without gradient).
  EVAL_ONLY: ClassVar[tuple[str, ...]] = ()
  # The position embedding (resized with the image size, its first `prefix` tokens kept)
  # and the classifier (re-initialised when the class count differs; zeros if EVAL_ONLY),
  # or a tuple of classifiers, by PyTorch name.
  POS_EMBED: ClassVar[str | None] = None
  HEAD: ClassVar[str | tuple[str, ...] | None] = None

  @classmethod
  def rename_state_dict(cls, cfg, state: dict) -> dict:
    """Called by the converter first: a backbone may map other names of its parameters
    (an official release's) to its own here. The default renames nothing."""
    return state

  @classmethod
  def check_state_dict(cls, cfg, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Called by the converter with the PyTorch names and shapes of a checkpoint, before it
    lists every mismatch: a backbone may raise a one-line CheckpointError here for a
    checkpoint that is plainly of another model (another backbone, another variant), naming
    what to change. The default checks nothing."""

  @classmethod
  def pos_embed_prefix(cls, cfg) -> int:
    """Tokens of the position embedding that are not on the patch grid."""
    return cfg.num_protected

  @classmethod
  def flops_embed(cls, cfg) -> tuple:
    """FLOPs of the embedding (fvcore convention): (stage name, tokens in, tokens out,
    ops), ops as (op, count) pairs with op in ``mctf_jax.cost.OPS``."""
    raise NotImplementedError

  @classmethod
  def flops_tail(cls, cfg, tokens: int) -> tuple:
    """FLOPs after the blocks, given the tokens leaving them: (stage name, tokens in,
    tokens out, ops) for each stage."""
    raise NotImplementedError


class ClassTokenBackbone(Backbone):
  """A backbone with one class token before its patches, a final norm, and a head on the
  class token (DeiT, T2T-ViT, LV-ViT). Its setup() defines ``cls_token`` (1, 1, C),
  ``pos_drop``, ``norm`` and ``head``; its embed() ends with ``with_class_token``."""

  def with_class_token(self, patches_BxNxC, pos_embed, deterministic: bool,
                       registers=None, *, embed_prefix: bool = True):
    """[class token, registers (1, R, C) if any, patches] + the position embedding
    (1, 1 + R + N, C), then its dropout; with embed_prefix False the position embedding
    (1, N, C) is on the patches only, before the others join them (timm's
    no_embed_class)."""
    b, _, c = patches_BxNxC.shape
    dtype = patches_BxNxC.dtype
    prefix = [jnp.broadcast_to(self.cls_token.astype(dtype), (b, 1, c))]
    if registers is not None:
      prefix.append(jnp.broadcast_to(registers.astype(dtype), (b,) + registers.shape[1:]))
    if embed_prefix:
      x = jnp.concatenate(prefix + [patches_BxNxC], axis=1) + pos_embed.astype(dtype)
    else:
      x = jnp.concatenate(prefix + [patches_BxNxC + pos_embed.astype(dtype)], axis=1)
    return self.pos_drop(x, deterministic=deterministic)

  def finish(self, x_BxTxC):
    with part_scope("norm"):
      return self.norm(x_BxTxC)

  def features(self, tokens_BxTxC, size_BxT=None):
    """The class token after the final norm."""
    return tokens_BxTxC[:, 0]

  def classify(self, tokens_BxTxC, size_BxT=None):
    """Logits from the class token of the final (normalised) tokens."""
    with part_scope("head"):
      return self.head(tokens_BxTxC[:, 0])
