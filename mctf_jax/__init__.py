"""mctf-jax: Multi-criteria Token Fusion (CVPR 2024) for DeiT / ViT in JAX and Flax."""

from __future__ import annotations

from typing import Any

from mctf_jax.config import ConfigError, FusionConfig, ModelConfig, fusion_config, model_config
from mctf_jax.model import EncoderOutput, VisionTransformer
from mctf_jax.schedule import LayerPlan, Schedule, compute_schedule

__version__ = "0.1.0"


def create_model(config: Any, **fusion_changes) -> VisionTransformer:
  """The Flax module for `config` (a ConfigDict with .model and .fusion sections).

  Keyword arguments override fusion fields, e.g. ``create_model(config, r=8)``. The module
  validates every field here, before any tracing, and its ``schedule()`` shows the
  per-layer token counts.
  """
  import dataclasses
  model_cfg = model_config(config)
  fusion_cfg = fusion_config(config)
  if fusion_changes:
    fusion_cfg = dataclasses.replace(fusion_cfg, **fusion_changes)
  fusion_cfg.check_depth(model_cfg.depth)
  if "float64" in (model_cfg.dtype, model_cfg.param_dtype):
    import jax
    if not jax.config.jax_enable_x64:
      raise ConfigError("model.dtype/param_dtype float64 needs 64-bit JAX: set "
                        "jax.config.update('jax_enable_x64', True) or JAX_ENABLE_X64=1 first")
  return VisionTransformer(model=model_cfg, fusion=fusion_cfg)


__all__ = ["create_model", "VisionTransformer", "EncoderOutput", "ModelConfig", "FusionConfig",
           "ConfigError", "Schedule", "LayerPlan", "compute_schedule", "model_config",
           "fusion_config"]
