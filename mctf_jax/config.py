"""From the user's ml_collections config to the validated, hashable settings.

The ml_collections configs in ``configs/`` are the user-facing format; their ``model`` and
``fusion`` sections become frozen dataclasses once, with every field checked, so that the
Flax modules get hashable, immutable settings (nanodo style) and a bad value fails before
tracing with a message that names it. ``config.model.arch`` picks the backbone, whose own
config class holds the model section (``mctf_jax.models``); it defaults to 'deit'.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mctf_jax import models
from mctf_jax.errors import ConfigError, is_int
from mctf_jax.fusion.config import FusionConfig, normalize_r
from mctf_jax.models.base import BackboneConfig

__all__ = ["model_config", "fusion_config", "FusionConfig", "normalize_r", "ConfigError"]

DEFAULT_ARCH = "deit"


def _to_dict(section: Any) -> dict:
  if section is None:
    return {}
  if hasattr(section, "to_dict"):
    return section.to_dict()
  if dataclasses.is_dataclass(section):
    return dataclasses.asdict(section)
  if isinstance(section, Mapping):
    return dict(section)
  raise ConfigError(f"expected a config section (ConfigDict or mapping), got {section!r}")


def _build(cls, values: dict, where: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f"unknown field(s) in config.{where}: {unknown}; "
                      f"known fields: {sorted(known)}")
  if "layers" in values and values["layers"] is not None and not is_int(values["layers"]):
    values["layers"] = tuple(values["layers"])
  return cls(**values)


def _section(config: Any, name: str):
  if isinstance(config, Mapping):
    return config.get(name)
  return getattr(config, name, None)


def model_config(config: Any) -> BackboneConfig:
  """The backbone's config dataclass from ``config.model`` (a ConfigDict or mapping), or a
  BackboneConfig as it is."""
  if isinstance(config, BackboneConfig):
    return config
  section = _section(config, "model")
  if section is None:
    raise ConfigError("the config has no 'model' section")
  values = _to_dict(section)
  values.setdefault("arch", DEFAULT_ARCH)
  cls = models.get(values["arch"]).config_class
  return _build(cls, values, "model")


def fusion_config(config: Any) -> FusionConfig:
  """FusionConfig from ``config.fusion``; fusion is off when the section is missing."""
  if isinstance(config, FusionConfig):
    return config
  section = _section(config, "fusion")
  if section is None:
    return FusionConfig(r=0, layers=())
  return _build(FusionConfig, _to_dict(section), "fusion")
