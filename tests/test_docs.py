"""The docs cannot go stale: docs/configs.md lists every config field with its default, and
its code runs."""

import ast
import dataclasses
import os
import re

import pytest
from flax import traverse_util

from conftest import ROOT
from mctf_jax import models, recipes


def _read(name):
  with open(os.path.join(ROOT, name)) as f:
    return f.read()


def code_blocks(text: str, language: str) -> list[str]:
  """The fenced blocks of `language` in a markdown text."""
  return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _table_rows(text: str) -> dict[str, str]:
  """{'field': 'default'} from the rows | `field` | `default` | meaning | of the tables."""
  rows = {}
  for field, default in re.findall(r"^\| `([\w.]+)` \| `(.*?)` \|", text, flags=re.M):
    assert field not in rows, f"{field} is listed twice"
    rows[field] = default
  return rows


def _value(text: str):
  return None if text == "None" else ast.literal_eval(text)


def _sections(text: str) -> dict[str, str]:
  """The text under each '### `model` for arch NAME' heading, and the rest as ''."""
  parts = re.split(r"^### `model` for arch '([\w.:]+)'.*$", text, flags=re.M)
  out = {"": parts[0]}
  for name, body in zip(parts[1::2], parts[2::2]):
    out[name] = body
  return out


def test_configs_md_lists_every_field_with_its_default():
  sections = _sections(_read("docs/configs.md"))
  common = _table_rows(sections.pop(""))
  recipe = traverse_util.flatten_dict(recipes.base_config().to_dict(), sep=".")
  recipe = {k: v for k, v in recipe.items() if not k.startswith("model.")}
  listed = {k: v for k, v in common.items() if not k.startswith("model.")}
  assert sorted(listed) == sorted(recipe), "fields missing from or unknown to docs/configs.md"
  wrong = {k: (listed[k], v) for k, v in recipe.items() if _value(listed[k]) != v}
  assert not wrong, wrong
  from mctf_jax.models.base import BackboneConfig
  base_fields = {f.name: f.default for f in dataclasses.fields(BackboneConfig)}
  model_common = {k[len("model."):]: v for k, v in common.items() if k.startswith("model.")}
  assert sorted(model_common) == sorted(base_fields)
  assert {k: _value(v) for k, v in model_common.items()} == base_fields
  assert sorted(sections) == sorted(models.names()), "a backbone without its model table"
  for arch, body in sections.items():
    # Its own fields, and the common ones whose default it changes (but arch).
    fields = {f.name: f.default for f in dataclasses.fields(models.get(arch).config_class)
              if f.name != "arch" and base_fields.get(f.name, dataclasses.MISSING) != f.default}
    rows = {k[len("model."):]: _value(v) for k, v in _table_rows(body).items()}
    assert rows == fields, f"docs/configs.md, arch {arch!r}"


@pytest.mark.parametrize("name", ["docs/configs.md"])
def test_python_blocks_run(name, monkeypatch):
  monkeypatch.chdir(ROOT)
  for block in code_blocks(_read(name), "python"):
    exec(compile(block, name, "exec"), {})
