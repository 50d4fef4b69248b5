"""From the user's ml_collections config to the validated, hashable settings.

The ml_collections configs in ``configs/`` are the user-facing format; their ``model`` and
``fusion`` sections become frozen dataclasses once, with every field checked, so that the
Flax modules get hashable, immutable settings (nanodo style) and a bad value fails before
tracing with a message that names it. ``config.model.arch`` picks the backbone, whose own
config class holds the model section (``mctf_jax.models``); it defaults to 'deit'.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Mapping

from mctf_jax import models
from mctf_jax.errors import ConfigError, is_int
from mctf_jax.fusion.config import FusionConfig, normalize_r
from mctf_jax.models.base import BackboneConfig

__all__ = ["load_config", "model_config", "fusion_config", "FusionConfig", "normalize_r",
           "ConfigError"]

DEFAULT_ARCH = "deit"


def _to_dict(section: Any) -> dict:
  if section is None:
    return {}
  if hasattr(section, "to_dict"):
    return section.to_dict()
  if dataclasses.is_dataclass(section):   # shallow: fields may hold objects (budget_choice)
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
  if isinstance(section, Mapping):
    return dict(section)
  raise ConfigError(f"expected a config section (ConfigDict or mapping), got {section!r}")


def _build(cls, values: dict, where: str):
  fields = dataclasses.fields(cls)
  unknown = sorted(set(values) - {f.name for f in fields})
  if unknown:
    known = sorted(f.name for f in fields if not f.metadata.get("internal"))
    raise ConfigError(f"unknown field(s) in config.{where}: {unknown}; "
                      f"known fields: {known}")
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


def load_config(path: str, overrides: Mapping[str, Any] | None = None):
  """The ml_collections ConfigDict of a config file, loaded by path from any directory, as
  absl's ``--config=path`` flag loads it: ``'configs/deit_s.py'``, or ``'FILE.py:ARG'`` for
  a file whose ``get_config`` takes an argument. overrides: fields by dotted name, set
  afterwards with the command line's type checks, e.g. ``{'fusion.r': 8}``."""
  file, _, arg = str(path).partition(":")
  if not os.path.isfile(file):
    raise ConfigError(f"config file {file!r} not found (from {os.getcwd()!r}): expected the "
                      f"path of a .py file with get_config(), e.g. configs/deit_s.py")
  name = "mctf_jax_config_" + os.path.splitext(os.path.basename(file))[0]
  spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  get = getattr(module, "get_config", None)
  if not callable(get):
    raise ConfigError(f"config file {file!r} has no get_config() function")
  config = get(arg) if arg else get()
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    section = config
    for part in parents:
      section = section.get(part) if hasattr(section, "get") else None
      if section is None:
        raise ConfigError(f"override {key!r}: the config has no section {part!r}")
    if leaf not in section:
      raise ConfigError(f"override {key!r}: unknown field; config.{'.'.join(parents) or ''} "
                        f"has {sorted(section.keys())}")
    try:
      setattr(section, leaf, value)
    except TypeError as e:
      raise ConfigError(f"override {key}={value!r}: {e}") from None
  return config
