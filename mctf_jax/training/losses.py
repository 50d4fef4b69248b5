"""Losses of MCTF fine-tuning with token reduction consistency.

    total = w_student * CE(student) + w_teacher * CE(teacher) + w_cons * consistency

CE is cross-entropy with label smoothing (0.1 in the official recipe) or with the soft
targets of mixup/cutmix. The consistency term is the per-example squared distance between
the teacher's (no gradient) and the student's final class tokens, averaged over the
examples the student already classifies confidently (softmax probability of the target
above a threshold, 0.4 officially; with mixup the probability of the flipped target is
added). Averages run over the global batch, so the same code is right under data parallel
sharding. ``student_loss`` and ``teacher_loss`` weigh the terms; the train step
(``mctf_jax.training.train_step.loss_and_grads``) differentiates their sum.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# The official recipe: student 1, teacher 1, consistency 3; threshold 0.4.
DEFAULT_WEIGHTS = (1.0, 1.0, 3.0)
DEFAULT_THRESHOLD = 0.4


def smooth_labels(labels, num_classes: int, label_smoothing: float = 0.0):
  """One-hot targets with smoothing: 1 - s + s/C on the label, s/C elsewhere (timm's)."""
  off = label_smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - label_smoothing) + off


def cross_entropy(logits, targets):
  """Mean cross-entropy against soft targets (B, C), computed in float32 at least."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.sum(targets.astype(logp.dtype) * logp, axis=-1))


def classification_loss(logits, labels, label_smoothing: float = 0.0, targets=None):
  """Label-smoothed CE for integer labels; or CE against given soft targets (mixup)."""
  if targets is None:
    targets = smooth_labels(labels, logits.shape[-1], label_smoothing)
  return cross_entropy(logits, targets)


def confidence(student_logits, labels, mixed_labels=None):
  """Softmax probability of the target (plus that of the mixed-in target with mixup)."""
  probs = jax.nn.softmax(student_logits.astype(jnp.promote_types(student_logits.dtype,
                                                                 jnp.float32)), axis=-1)
  score = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
  if mixed_labels is not None:
    score = score + jnp.take_along_axis(probs, mixed_labels[:, None], axis=-1)[:, 0]
  return jax.lax.stop_gradient(score)


def consistency_loss(per_example, student_logits, labels, threshold: float = DEFAULT_THRESHOLD,
                     mixed_labels=None):
  """Confidence-masked mean of the per-example consistency; 0 when no example passes.

  Returns (loss, passed): the loss and the (B,) 0/1 mask of the examples counted.
  """
  passed = (confidence(student_logits, labels, mixed_labels) > threshold).astype(
      per_example.dtype)
  count = jnp.sum(passed)
  loss = jnp.sum(per_example * passed) / jnp.maximum(count, 1)
  return jnp.where(count > 0, loss, 0.0), passed


@dataclasses.dataclass(frozen=True)
class LossConfig:
  label_smoothing: float = 0.1
  threshold: float = DEFAULT_THRESHOLD
  weights: tuple[float, float, float] = DEFAULT_WEIGHTS


def student_loss(student_logits, labels, config: LossConfig = LossConfig(), targets=None,
                 consistency=None, mixed_labels=None):
  """The student's weighted terms: (loss, parts). loss = w_student * CE(student), plus
  w_consistency * the confidence-masked consistency when `consistency` (the per-example
  distance to the teacher, the teacher held fixed) is given; parts: loss_student, and
  loss_consistency and pass_rate with it. The train step differentiates this with the
  teacher's features as constants."""
  w_student, _, w_cons = config.weights
  loss = w_student * classification_loss(student_logits, labels, config.label_smoothing,
                                         targets)
  parts = {"loss_student": loss}
  if consistency is not None:
    cons, passed = consistency_loss(consistency, student_logits, labels, config.threshold,
                                    mixed_labels)
    parts.update(loss_consistency=w_cons * cons, pass_rate=jnp.mean(passed))
    loss = loss + w_cons * cons
  return loss, parts


def teacher_loss(teacher_logits, labels, config: LossConfig = LossConfig(), targets=None):
  """The teacher's weighted term: w_teacher * CE(teacher)."""
  return config.weights[1] * classification_loss(teacher_logits, labels,
                                                 config.label_smoothing, targets)
