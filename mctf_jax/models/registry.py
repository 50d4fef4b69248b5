"""Backbones by name: ``config.model.arch`` picks the Flax module class.

A backbone file registers its class with ``@register('name')``; the package imports the
built-in backbones. A backbone of your own, in your own module, needs no registration:
name it as ``'package.module:ClassName'`` (the module is imported, and the class must
subclass ``mctf_jax.models.base.Backbone``), e.g. ``--config.model.arch=my_vits:MyViT``.
"""

from __future__ import annotations

import importlib

from mctf_jax.errors import ConfigError
from mctf_jax.models.base import Backbone

_BACKBONES: dict[str, type] = {}


def register(name: str):
  """Class decorator: makes a Backbone subclass available as ``config.model.arch=name``."""
  def add(cls):
    if name in _BACKBONES and _BACKBONES[name] is not cls:
      raise ValueError(f"backbone {name!r} is registered already ({_BACKBONES[name]})")
    cls.arch = name
    _BACKBONES[name] = cls
    return cls
  return add


def names() -> tuple[str, ...]:
  """The registered backbones' names."""
  return tuple(sorted(_BACKBONES))


def get(arch) -> type:
  """The Backbone class of ``config.model.arch``; ConfigError naming the registered ones
  for an unknown name."""
  if not isinstance(arch, str) or not arch:
    raise ConfigError(f"model.arch must be a backbone name, one of {list(names())} or "
                      f"'module:Class', got {arch!r}")
  if arch in _BACKBONES:
    return _BACKBONES[arch]
  if ":" not in arch:
    raise ConfigError(f"unknown model.arch {arch!r}; registered backbones: {list(names())} "
                      f"(or give your own as 'module:Class')")
  module_name, _, class_name = arch.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"model.arch={arch!r}: cannot import {module_name!r}: {e}") from None
  cls = getattr(module, class_name, None)
  if not (isinstance(cls, type) and issubclass(cls, Backbone)):
    raise ConfigError(f"model.arch={arch!r}: {module_name}.{class_name} is not a subclass "
                      f"of mctf_jax.models.base.Backbone")
  return cls
