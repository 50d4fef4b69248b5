"""The docs cannot go stale: docs/configs.md lists every config field with its default, and
its code runs."""

import ast
import dataclasses
import os
import re

import pytest
from flax import traverse_util

from conftest import ROOT, init_variables, run
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


# ----------------------------------------------------------------------------- runnable docs
#
# Every ```python and ```bash block of README.md and docs/*.md runs here, in order, in a
# scratch directory that sees the repository (configs/, tests/, train.py, ...) through
# links, so that what the commands write stays out of the checkout. A block preceded by
# `<!-- not run: REASON -->` is skipped, with its reason in the test's output. The files a
# user would have (a pretrained .pth, a photo, a big_vision .npz) are small files the test
# makes under the same names; commands that would train or time a real model for minutes
# run on a tiny config and the embedded digits (ADAPT), and a figure in a command's comment
# (`# 2.602 GFLOPs`) must be in what it prints.

import shlex
import sys
import time

import numpy as np

DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
SKIP = re.compile(r"<!-- not run: (.*?) -->\s*$")

# The commands that would train, evaluate or time a real model for minutes run on the
# configuration of the end-to-end tests (tests/configs/digits_tiny.py: a DeiT of width 32 on
# the embedded digits), whose programs the shared training run compiles too (the persistent
# compilation cache serves both), and train.py resumes a copy of that run (_workdirs).
TINY = "tests/configs/digits_tiny.py"
TINY_VIT = [f"--config={TINY}:vit", "--config.model.embed_dim=64",
            "--config.model.mlp_dim=128", "--config.model.depth=3", "--config.model.pool_type=map"]
HEAVY = ("train.py", "eval.py", "mctf_jax.convert", "mctf_jax.tools.benchmark",
         "mctf_jax.tools.visualize")
TINY_CONFIGS = {"--config=configs/deit_s.py": [f"--config={TINY}"],
                "--config=configs/siglip_b16.py": TINY_VIT,
                "--config=configs/lvvit_s.py": [f"--config={TINY}:lvvit"]}
EXTRA = {"eval.py": ["--throughput_batch=0"],
         "mctf_jax.tools.benchmark": ["--repeats=2", "--warmup=1"]}


def blocks(name: str):
  """(language, code, skip reason or None) of every python and bash block of a doc."""
  lines = _read(name).splitlines()
  out = []
  for i, line in enumerate(lines):
    if line.startswith("```python") or line.startswith("```bash"):
      end = lines.index("```", i + 1)
      reason = SKIP.match(lines[i - 1]) if i else None
      out.append((line[3:].strip(), "\n".join(lines[i + 1:end]),
                  reason.group(1) if reason else None))
  return out


def commands(code: str):
  """(argv, comment) of each command of a bash block (continuations joined)."""
  logical, current = [], ""
  for line in code.splitlines():
    if line.rstrip().endswith("\\"):
      current += line.rstrip()[:-1] + " "
      continue
    logical.append(current + line)
    current = ""
  out = []
  for line in logical:
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    start = line.find("  #")
    out.append((shlex.split(line, comments=True), line[start:] if start >= 0 else ""))
  return out


def _program(argv):
  return argv[2] if argv[1] == "-m" else argv[1]


def adapt(argv, files):
  """The test's version of a documented command."""
  assert argv[0] == "python", f"documented commands start with python: {argv}"
  program = _program(argv)
  args = []
  for arg in argv[1:]:
    if program in HEAVY and arg in TINY_CONFIGS:
      args += TINY_CONFIGS[arg]
      continue
    for user_file, test_file in files.items():
      arg = arg.replace(user_file, test_file)
    args.append(arg)
  extra = [] if "plot" in argv else EXTRA.get(program, [])   # (visualize plot: no config)
  return [sys.executable] + args + extra


def _user_files(scratch):
  """The files the docs assume a user has, made small: {name in the docs: path}."""
  from PIL import Image
  from skimage import data as samples
  Image.fromarray(samples.astronaut()).save(scratch / "photo.jpg")
  flat = dict(np.load(os.path.join(ROOT, "tests", "golden", "big_vision", "bv_tiny_map.npz")))
  np.savez(scratch / "siglip.npz", **{f"params/img/{k}": v for k, v in flat.items()},
           **{"params/t": np.ones((1,), np.float32)})
  # DeiT's and LV-ViT's released files: the tiny models' random weights, as torch.save and
  # timm's training script write them.
  import jax
  import mctf_jax
  import torch_files
  from mctf_jax import convert
  for name, arch, write in (("deit.pth", None, torch_files.write_torch_file),
                            ("lvvit.pth.tar", "lvvit", torch_files.timm_checkpoint)):
    config = mctf_jax.load_config(os.path.join(ROOT, TINY) + (f":{arch}" if arch else ""))
    model = mctf_jax.create_model(config)
    variables = init_variables(model)
    state = convert.flax_to_torch(variables.pop("params"), config, model_state=variables)
    write(scratch / name, {k: np.asarray(v, np.float32) for k, v in state.items()})
  return {"deit_small_patch16_224-cd65a155.pth": str(scratch / "deit.pth"),
          "lvvit_s-26M-224-83.3.pth.tar": str(scratch / "lvvit.pth.tar"),
          "webli_en_b16_224_63724782.npz": str(scratch / "siglip.npz"),
          "/path/to/tensorflow_datasets": str(scratch / "tfds")}


def _scratch(tmp_path):
  for name in ("configs", "tests", "train.py", "eval.py", "benchmarks"):
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  return tmp_path


def _workdirs(scratch, trained):
  """The workdirs the docs' train.py commands name, as copies of the shared digits_tiny run
  (tests/conftest.py): train.py then checks the command, its config (init.checkpoint and
  data.data_dir may differ on resumption) and its checkpoints, and finds the run complete,
  instead of training the same program again; eval.py and the tools read the copy."""
  import shutil
  workdir, _ = trained()
  for name in ("workdirs/mctf_deit_s",):
    shutil.copytree(workdir, scratch / name)


@pytest.mark.parametrize("name", DOCS)
def test_doc_code_runs(name, tmp_path, monkeypatch, env, trained):
  scratch = _scratch(tmp_path)
  monkeypatch.chdir(scratch)
  files = _user_files(scratch)
  if any(_program(argv) == "train.py" for language, code, reason in blocks(name)
         if language == "bash" and not reason for argv, _ in commands(code)):
    _workdirs(scratch, trained)
  namespace = {}
  ran, skipped = 0, []
  for language, code, reason in blocks(name):
    if reason:
      skipped.append(reason)
      continue
    ran += 1
    if language == "python":
      for user_file, test_file in files.items():
        code = code.replace(user_file, test_file)
      code = code.replace('"configs/deit_s.py"', f'"{TINY}"')
      start = time.time()
      exec(compile(code, name, "exec"), namespace)
      print(f"{time.time() - start:6.1f} s  python block of {len(code.splitlines())} lines")
      continue
    for argv, comment in commands(code):
      cmd = adapt(argv, files)
      start = time.time()
      done = run(cmd[1:], env, cwd=scratch)
      print(f"{time.time() - start:6.1f} s  {shlex.join(argv)[:100]}")
      assert done.returncode == 0, f"{name}: {shlex.join(argv)}\n{done.stdout}\n{done.stderr}"
      if _program(argv) == "train.py":
        assert "is complete" in done.stdout, done.stdout
      if _program(argv) not in HEAVY:
        for figure in re.findall(r"\d+\.\d+|r=\d+", comment):
          assert figure in done.stdout, f"{name}: {shlex.join(argv)} does not print {figure}"
  print(f"{name}: {ran} blocks run, skipped: {skipped}")
  assert ran or skipped or not blocks(name)
