"""Layers that timm-style ViTs share: the pre-norm block of the fusion protocol and its
parts, the patch embedding, initialisers and the dtype table.

Parameter names mirror timm's one to one (``blocks.3.attn.qkv.weight`` is
``params['blocks_3']['attn']['qkv']['kernel']``, transposed).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}

dense_init = nn.initializers.truncated_normal(stddev=0.02)


def layer_norm(eps: float, dtype, param_dtype) -> nn.LayerNorm:
  """LayerNorm with the two-pass variance PyTorch computes (the fast E[x^2] - E[x]^2 form
  loses digits)."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False)


class QKV(nn.Module):
  """The fused query/key/value projection of timm (one (C, 3C) kernel), in parts.

  One-step-ahead attention needs the queries and keys of the tokens before fusion but the
  values of the tokens after it, so the projection is exposed as ``qk`` and ``v``.
  """
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.kernel = self.param("kernel", dense_init, (self.features, 3 * self.features),
                             self.param_dtype)
    if self.use_bias:
      self.bias = self.param("bias", nn.initializers.zeros, (3 * self.features,),
                             self.param_dtype)

  def _project(self, x, part: slice):
    kernel = self.kernel[:, part].astype(self.dtype)
    y = jnp.einsum("btc,cf->btf", x.astype(self.dtype), kernel)
    if self.use_bias:
      y = y + self.bias[part].astype(self.dtype)
    return y

  def qk(self, x_BxTxC):
    c = self.features
    qk = self._project(x_BxTxC, slice(0, 2 * c))
    return qk[..., :c], qk[..., c:]

  def v(self, x_BxTxC):
    c = self.features
    return self._project(x_BxTxC, slice(2 * c, 3 * c))

  def __call__(self, x_BxTxC):
    q, k = self.qk(x_BxTxC)
    return q, k, self.v(x_BxTxC)


class Attention(nn.Module):
  """Multi-head self-attention as two named steps: probabilities, then the values.

  scale: the logits' scale; None for head_dim ** -0.5.
  """
  dim: int
  num_heads: int
  qkv_bias: bool = True
  scale: float | None = None
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.qkv = QKV(self.dim, self.qkv_bias, self.dtype, self.param_dtype)
    self.proj = nn.Dense(self.dim, kernel_init=dense_init, dtype=self.dtype,
                         param_dtype=self.param_dtype)
    self.proj_drop = nn.Dropout(self.dropout_rate)

  def _heads(self, x_BxTxC):
    """(B, T, C) -> (B, H, T, d): head-major, the layout CPU/GPU/TPU matmuls want."""
    b, t, _ = x_BxTxC.shape
    return x_BxTxC.reshape(b, t, self.num_heads, self.dim // self.num_heads).transpose(0, 2, 1, 3)

  def probs(self, h_BxTxC, bias_BxT=None):
    """Attention probabilities (B, H, T, T) from queries and keys, in float32 at least.

    bias_BxT: an additive bias on the keys' logits (log size: proportional attention).
    """
    return self.probs_and_keys(h_BxTxC, bias_BxT)[0]

  def probs_and_keys(self, h_BxTxC, bias_BxT=None):
    """``probs``, and the keys (B, H, T, d) they were computed from."""
    q, k = self.qkv.qk(h_BxTxC)
    k = self._heads(k)
    # The scale multiplies the queries (T x d values) rather than the (T x T) logits: a
    # scalar times the logits makes XLA:CPU materialise the scalar broadcast to the
    # logits' shape when blocks share that shape. Exact where d is a power of 4.
    scale = (self.dim // self.num_heads) ** -0.5 if self.scale is None else self.scale
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bhqd,bhkd->bhqk", self._heads(q * jnp.asarray(scale, q.dtype)),
                        k, preferred_element_type=acc)
    if bias_BxT is not None:
      logits = logits + bias_BxT[:, None, None, :].astype(logits.dtype)
    return jax.nn.softmax(logits, axis=-1), k

  def values(self, h_BxTxC):
    """Values split into heads: (B, H, T, d)."""
    return self._heads(self.qkv.v(h_BxTxC))

  def output(self, out_BxTxHxd, deterministic: bool):
    """Concatenates the heads and projects."""
    b, t = out_BxTxHxd.shape[:2]
    y = self.proj(out_BxTxHxd.reshape(b, t, self.dim))
    return self.proj_drop(y, deterministic=deterministic)


class Mlp(nn.Module):
  """Linear, GELU, linear. approximate_gelu: GELU's tanh approximation (flax's default,
  which big_vision's ViTs use) instead of the exact erf form (timm's)."""
  hidden: int
  dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  approximate_gelu: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = nn.Dense(self.hidden, kernel_init=dense_init, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=self.approximate_gelu)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(self.dim, kernel_init=dense_init, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc2")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class LayerScale(nn.Module):
  """A learned factor per channel on a residual branch (timm's LayerScale, CaiT's and
  DeiT III's): y * gamma, gamma starting at `init_values`."""
  dim: int
  init_values: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y):
    gamma = self.param("gamma", nn.initializers.constant(self.init_values), (self.dim,),
                       self.param_dtype)
    return y * gamma.astype(y.dtype)


class Block(nn.Module):
  """timm's pre-norm transformer block (norm1, attn, norm2, mlp, stochastic depth), with
  the members the fusion's block driver calls (``mctf_jax.fusion.block``): norm1, norm2,
  mlp and drop_path are its submodules, the attention steps and the residual are below.
  approximate_gelu: the MLP's GELU in its tanh form (big_vision's blocks). init_values:
  LayerScale on both branches (``ls1``, ``ls2``) starting at this value; None: none."""
  dim: int
  num_heads: int
  mlp_dim: int
  qkv_bias: bool = True
  qk_scale: float | None = None
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  approximate_gelu: bool = False
  init_values: float | None = None

  def setup(self):
    dtype, param_dtype = DTYPES[self.dtype], DTYPES[self.param_dtype]
    if self.init_values is not None:
      self.ls1 = LayerScale(self.dim, self.init_values, param_dtype)
      self.ls2 = LayerScale(self.dim, self.init_values, param_dtype)
    self.norm1 = layer_norm(self.layer_norm_eps, dtype, param_dtype)
    self.attn = Attention(self.dim, self.num_heads, self.qkv_bias, self.qk_scale,
                          self.dropout_rate, dtype, param_dtype)
    self.norm2 = layer_norm(self.layer_norm_eps, dtype, param_dtype)
    self.mlp = Mlp(self.mlp_dim, self.dim, self.dropout_rate, dtype, param_dtype,
                   self.approximate_gelu)
    # Stochastic depth: one keep/drop per example (mask broadcast over tokens, channels).
    self.drop_path = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2))

  # The protocol of mctf_jax.fusion.block.
  def attention_probs(self, h_BxTxC, bias_BxT=None):
    return self.attn.probs(h_BxTxC, bias_BxT)

  def attention_values(self, h_BxTxC):
    return self.attn.values(h_BxTxC)

  def attention_probs_and_keys(self, h_BxTxC, bias_BxT=None):
    return self.attn.probs_and_keys(h_BxTxC, bias_BxT)

  def attention_output(self, out_BxTxHxd, deterministic: bool):
    return self.attn.output(out_BxTxHxd, deterministic)

  def residual(self, x_BxTxC, y_BxTxC, branch: int):
    if self.init_values is not None:
      y_BxTxC = (self.ls1, self.ls2)[branch](y_BxTxC)
    return x_BxTxC + y_BxTxC


def block_torch_shapes(prefix: str, dim: int, mlp_dim: int, qkv_bias: bool,
                       dim_in: int | None = None,
                       layer_scale: bool = False) -> dict[str, tuple[int, ...]]:
  """timm's names (under `prefix`, e.g. 'blocks.3.') and PyTorch shapes of a ``Block``'s
  parameters: width `dim`, MLP width `mlp_dim`; `dim_in`: the width of its input where
  the attention changes it (T2T-ViT's token transformers), else `dim`; `layer_scale`: with
  the LayerScale factors of the two branches (``init_values``)."""
  d, hidden, din = dim, mlp_dim, dim_in or dim
  shapes = {
      prefix + "norm1.weight": (din,), prefix + "norm1.bias": (din,),
      prefix + "attn.qkv.weight": (3 * d, din),
      prefix + "attn.proj.weight": (d, d), prefix + "attn.proj.bias": (d,),
      prefix + "norm2.weight": (d,), prefix + "norm2.bias": (d,),
      prefix + "mlp.fc1.weight": (hidden, d), prefix + "mlp.fc1.bias": (hidden,),
      prefix + "mlp.fc2.weight": (d, hidden), prefix + "mlp.fc2.bias": (d,),
  }
  if qkv_bias:
    shapes[prefix + "attn.qkv.bias"] = (3 * d,)
  if layer_scale:
    shapes.update({prefix + "ls1.gamma": (d,), prefix + "ls2.gamma": (d,)})
  return shapes


class PatchEmbed(nn.Module):
  """Non-overlapping patches, projected by a strided convolution (timm's PatchEmbed)."""
  embed_dim: int
  patch_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_BxHxWxC):
    x = nn.Conv(self.embed_dim, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype,
                param_dtype=self.param_dtype, name="proj")(images_BxHxWxC)
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)
