"""Optimizer and learning-rate schedule of the DeiT / MCTF fine-tuning recipe.

AdamW (betas 0.9/0.999, eps 1e-8) with weight decay on every parameter except 1-D ones
(biases, LayerNorm) and those the backbone names (``NO_WEIGHT_DECAY``; DeiT: the position
embedding and the class token, as timm's ``create_optimizer`` with its
``no_weight_decay = {pos_embed, cls_token}``; and ``EVAL_ONLY``, which get no gradient, so
that they stay as loaded), optional global-norm
clipping, and timm's epoch-wise cosine schedule:

  lr(e) = warmup_lr + e * (peak - warmup_lr) / warmup_epochs          for e < warmup_epochs
        = min_lr + (peak - min_lr) * (1 + cos(pi * e / num_epochs)) / 2  for e < num_epochs
        = min_lr                                                        for the cool-down epochs

where peak = base_lr * batch_size / 512. The value changes once per epoch, and epoch e
trains with lr(max(e - 1, 0)), exactly as the official code steps its scheduler
(``lr_scheduler.step(epoch)`` after each epoch).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax

from mctf_jax import models
from mctf_jax.config import model_config


def peak_lr(config) -> float:
  return config.base_lr * config.batch_size / 512.0


def total_epochs(config) -> int:
  return config.num_epochs + config.cooldown_epochs


def epoch_lr(config, epoch):
  """The learning rate of the scheduler at (scheduler) epoch `epoch`; jnp-compatible."""
  peak, warmup = peak_lr(config), config.warmup_epochs
  epoch = jnp.asarray(epoch, jnp.float32)
  cosine = config.min_lr + 0.5 * (peak - config.min_lr) * (
      1 + jnp.cos(math.pi * epoch / max(config.num_epochs, 1)))
  lr = jnp.where(epoch < config.num_epochs, cosine, config.min_lr)
  if warmup > 0:
    ramp = config.warmup_lr + epoch * (peak - config.warmup_lr) / warmup
    lr = jnp.where(epoch < warmup, ramp, lr)
  return lr


def make_schedule(config, steps_per_epoch: int):
  """optax schedule: optimizer step -> lr, constant within an epoch as in the reference."""
  def schedule(count):
    epoch = count // steps_per_epoch
    return epoch_lr(config, jnp.maximum(epoch - 1, 0))
  return schedule


def weight_decay_mask(params, no_weight_decay=()):
  """True for the parameters that get weight decay: not the 1-D ones, nor those named in
  `no_weight_decay` (the backbone's ``NO_WEIGHT_DECAY``)."""
  def decays(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    return leaf.ndim > 1 and not any(name in no_weight_decay for name in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  backbone = models.get(model_config(config).arch)
  no_decay = tuple(backbone.NO_WEIGHT_DECAY) + tuple(backbone.EVAL_ONLY)
  parts = []
  if config.grad_clip and config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(make_schedule(config, steps_per_epoch), b1=0.9, b2=0.999, eps=1e-8,
                           weight_decay=config.weight_decay,
                           mask=functools.partial(weight_decay_mask, no_weight_decay=no_decay)))
  return optax.chain(*parts)
