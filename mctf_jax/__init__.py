"""mctf-jax: Multi-criteria Token Fusion (CVPR 2024) for ViTs in JAX and Flax.

    fusion/    the engine: the algorithm, the block and stack drivers (no backbone)
    models/    the backbones on it (DeiT), by config.model.arch
    training/  the train step, the training loop, losses, optimizer, evaluation
    data/      the tf.data input pipelines
    cost.py    FLOPs as the paper counts them, and the r a FLOP budget picks
    tools/     command lines: FLOP counter, TPU compiler, benchmark, profiles, pictures
    config.py, errors.py, checkpoint.py, convert/, torch_pickle.py, parallel.py
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from mctf_jax import cost, models
from mctf_jax.config import fusion_config, load_config, model_config
from mctf_jax.errors import ConfigError, MctfError
from mctf_jax.fusion import FusionConfig, LayerPlan, Schedule, compute_schedule
from mctf_jax.models import Backbone, BackboneConfig, DeiT, DeiTConfig, EncoderOutput

__version__ = "0.1.0"


def create_model(config: Any, **fusion_changes) -> Backbone:
  """The Flax module for `config` (a ConfigDict or mapping with .model and .fusion sections).

  ``config.model.arch`` picks the backbone (default 'deit'). Keyword arguments override
  fusion fields, e.g. ``create_model(config, r=8)`` (an r given so replaces a FLOP budget).
  A FLOP budget (fusion.target_gflops / target_fraction) sets r here. Every field is
  validated here, before any tracing, and the module's ``schedule()`` shows the per-layer
  token counts.
  """
  model_cfg = model_config(config)
  fusion_cfg = fusion_config(config)
  if fusion_changes:
    if "r" in fusion_changes:
      fusion_changes = {"target_gflops": 0.0, "target_fraction": 0.0, **fusion_changes}
    fusion_cfg = dataclasses.replace(fusion_cfg, **fusion_changes)
  fusion_cfg.check_depth(model_cfg.depth)
  if fusion_cfg.has_budget:
    fusion_cfg = cost.apply_budget(model_cfg, fusion_cfg)
  if "float64" in (model_cfg.dtype, model_cfg.param_dtype):
    if not jax.config.jax_enable_x64:
      raise ConfigError("model.dtype/param_dtype float64 needs 64-bit JAX: set "
                        "jax.config.update('jax_enable_x64', True) or JAX_ENABLE_X64=1 first")
  return models.get(model_cfg.arch)(config=model_cfg, fusion=fusion_cfg)


__all__ = ["create_model", "Backbone", "BackboneConfig", "DeiT", "DeiTConfig", "EncoderOutput",
           "FusionConfig", "ConfigError", "MctfError", "Schedule", "LayerPlan",
           "compute_schedule", "load_config", "model_config", "fusion_config"]
