"""The matching scores: MCTF's three criteria between the two halves of the tokens.

Shapes are in the names: B batch, T tokens, A/B the two halves (even and odd tokens), C
channels, H heads. Pure functions of arrays; nothing here knows a model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mctf_jax.fusion.scopes import scoped


def protected_split(num_protected: int) -> tuple[int, int]:
  """How many of the protected leading tokens are in set A (even tokens) and in set B."""
  return (num_protected + 1) // 2, num_protected // 2


@scoped("scores")
def attention_received(probs_BxHxTxT: jax.Array, valid_BxT: jax.Array | None = None
                       ) -> jax.Array:
  """Mean attention each token receives, over heads and queries: (B, T), in the
  probabilities' precision (float32 at least: 'attn' pooling weighs the fused tokens by it,
  so a float64 model must not round it to float32).

  valid_BxT: on padded arrays, the real tokens: the mean runs over the real queries only.
  """
  dtype = jnp.promote_types(probs_BxHxTxT.dtype, jnp.float32)
  if valid_BxT is None:
    return jnp.mean(probs_BxHxTxT.astype(dtype), axis=(1, 2))
  heads = probs_BxHxTxT.shape[1]
  queries = valid_BxT.astype(dtype)
  total = jnp.einsum("bhqk,bq->bk", probs_BxHxTxT.astype(dtype), queries)
  return total / (heads * jnp.sum(queries, axis=-1, keepdims=True))


def _power(x, exponent: float):
  return x if exponent == 1 else x ** exponent


@scoped("scores")
def matching_scores(metric_BxTxC: jax.Array,
                    *,
                    attn_received_BxT: jax.Array | None = None,
                    size_BxT: jax.Array | None = None,
                    tau_sim: float = 1.0,
                    tau_info: float = 20.0,
                    tau_size: float = 40.0,
                    num_protected: int = 1,
                    valid_BxT: jax.Array | None = None) -> jax.Array:
  """Scores W[i, j] between A = tokens 0, 2, 4, ... and B = tokens 1, 3, 5, ...

  W = W_sim * W_info * W_size with
    W_sim  = ((cos(a_i, b_j) + 1) / 2) ** (1 / tau_sim),
    W_info = (u_i * u_j) ** (1 / tau_info), u = 1 / attention received, u /= max(u),
    W_size = (s_i * s_j) ** (1 / tau_size), s = 1 / size, s /= max(s).
  A criterion with tau = 0, or without its input (None), is left out. The rows and
  columns of the `num_protected` leading tokens (class, distillation tokens) are -inf,
  but they count in the maxima that normalise u and s, as in the reference. On padded
  arrays (`valid_BxT`), padding counts as 1 / inf = 0 there and scores -inf. Scores carry
  no gradient and are computed in at least float32 whatever the compute dtype, so that
  bf16 does not turn near-ties into ties.
  """
  dtype = jnp.promote_types(metric_BxTxC.dtype, jnp.float32)
  if tau_sim:
    scores_BxAxB = _power((_cosine(metric_BxTxC) + 1) / 2, 1 / tau_sim)
  else:
    batch, tokens = metric_BxTxC.shape[:2]
    scores_BxAxB = jnp.ones((batch, (tokens + 1) // 2, tokens // 2), dtype)

  # (u_i u_j)^(1/tau) = u_i^(1/tau) u_j^(1/tau): both pair criteria are products of per-token
  # factors, so the powers are taken on vectors and applied as one outer product.
  factor_BxT = None

  def token_factor(values_BxT, tau):
    values = jax.lax.stop_gradient(values_BxT).astype(dtype)
    if valid_BxT is None:
      inv = 1 / values
    else:  # padding counts as 1 / inf = 0, below every real token
      inv = jnp.where(valid_BxT, 1 / jnp.where(valid_BxT, values, 1), 0)
    return _power(inv / jnp.max(inv, axis=-1, keepdims=True), 1 / tau)

  if tau_info > 0 and attn_received_BxT is not None:
    factor_BxT = token_factor(attn_received_BxT, tau_info)
  if tau_size and size_BxT is not None:
    size_factor = token_factor(size_BxT, tau_size)
    factor_BxT = size_factor if factor_BxT is None else factor_BxT * size_factor
  if factor_BxT is not None:
    scores_BxAxB = scores_BxAxB * (factor_BxT[:, ::2, None] * factor_BxT[:, None, 1::2])
  return _exclude(scores_BxAxB, num_protected, valid_BxT)


@scoped("scores")
def similarity_scores(metric_BxTxC: jax.Array, *, num_protected: int = 1,
                      valid_BxT: jax.Array | None = None) -> jax.Array:
  """ToMe's scores: the cosine similarity between A = tokens 0, 2, ... and B = tokens 1,
  3, ..., -inf for the protected tokens and the padding, as ``matching_scores``."""
  return _exclude(_cosine(metric_BxTxC), num_protected, valid_BxT)


def _cosine(metric_BxTxC):
  """Cosine similarity of the A and B tokens, without gradient, in float32 at least."""
  dtype = jnp.promote_types(metric_BxTxC.dtype, jnp.float32)
  if jnp.dtype(metric_BxTxC.dtype).itemsize <= 2:
    return _cosine_16bit(jax.lax.stop_gradient(metric_BxTxC))
  metric = jax.lax.stop_gradient(metric_BxTxC).astype(dtype)
  # (A zero token would give 0/0; the guard never changes a non-zero norm.)
  norm = jnp.linalg.norm(metric, axis=-1, keepdims=True)
  metric = metric / jnp.maximum(norm, jnp.finfo(dtype).tiny)
  return jnp.einsum("bic,bjc->bij", metric[:, ::2], metric[:, 1::2],
                    precision=jax.lax.Precision.HIGHEST)


def _cosine_16bit(metric_BxTxC):
  """``_cosine`` of 16-bit tokens: their products are exact in float32, so the dot products
  of the A and B halves accumulate in float32 from the tokens as they are (one pass of the
  matrix unit, no float32 copy of the tokens), then divide by the norms."""
  a_BxAxC, b_BxBxC = metric_BxTxC[:, ::2], metric_BxTxC[:, 1::2]
  dots_BxAxB = jnp.einsum("bic,bjc->bij", a_BxAxC, b_BxBxC, preferred_element_type=jnp.float32)
  tiny = jnp.finfo(jnp.float32).tiny

  def norm(x):
    return jnp.maximum(jnp.linalg.norm(x.astype(jnp.float32), axis=-1), tiny)

  return dots_BxAxB / (norm(a_BxAxC)[:, :, None] * norm(b_BxBxC)[:, None, :])


def _exclude(scores_BxAxB, num_protected: int, valid_BxT):
  """-inf in the rows and columns of the protected tokens and the padding."""
  if valid_BxT is not None:
    scores_BxAxB = jnp.where(valid_BxT[:, ::2, None] & valid_BxT[:, None, 1::2], scores_BxAxB,
                             -jnp.inf)
  protected_a, protected_b = protected_split(num_protected)
  if protected_a:
    scores_BxAxB = scores_BxAxB.at[:, :protected_a, :].set(-jnp.inf)
  if protected_b:
    scores_BxAxB = scores_BxAxB.at[:, :, :protected_b].set(-jnp.inf)
  return scores_BxAxB
