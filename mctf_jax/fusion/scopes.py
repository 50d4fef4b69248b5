"""Named scopes that mark the parts of a forward pass in compiled programs and profiles.

The fusion's own steps are ``mctf_<step>`` scopes (``scores``, ``matching``, ``merge``,
``attn_merge``); the transformer's parts are ``vit_<part>`` scopes, set by the block
driver around each call of the block protocol and by the backbone around its embedding
and head. ``mctf_jax.tools.profiling`` attributes kernel time by these names alone, so a
new backbone is profiled by part without any change there.
"""

from __future__ import annotations

import functools

import jax

FUSION_PREFIX = "mctf_"
PART_PREFIX = "vit_"

# The transformer's parts, as the profiles name them.
PARTS = {
    "embed": "embed",
    "norm": "norm",
    "qk_softmax": "attention/qk+softmax",
    "values": "attention/v",
    "probs_v": "attention/probs@v",
    "proj": "attention/proj",
    "mlp": "mlp",
    "head": "head",
}


def fusion_scope(step: str):
  """The named scope of one of the fusion's own steps."""
  return jax.named_scope(FUSION_PREFIX + step)


def part_scope(part: str):
  """The named scope of one of the transformer's parts (a key of ``PARTS``)."""
  if part not in PARTS:
    raise ValueError(f"unknown part {part!r}; expected one of {sorted(PARTS)}")
  return jax.named_scope(PART_PREFIX + part)


def scoped(step: str):
  """Decorator: runs a function in the named scope of a fusion step."""
  def wrap(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
      with fusion_scope(step):
        return fn(*args, **kwargs)
    return inner
  return wrap
