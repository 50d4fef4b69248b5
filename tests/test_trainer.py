"""Pieces of the training loop: initialisation from checkpoints, workdir checks."""

import json
import logging
import os

import jax
import numpy as np
import pytest

from mctf_jax import checkpoint, convert, parallel
from mctf_jax.errors import ConfigError, TrainingError
from mctf_jax.training import run_config, trainer
from configs import default

DATA = os.path.join(os.path.dirname(__file__), "data")


def tiny_config(**model):
  c = default.get_config()
  c.model.update(dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                      num_classes=10))
  c.model.update(model)
  c.fusion.update(dict(r=8.0, layers=(1, 2, 3)))
  return c


def _init(config):
  import mctf_jax
  mesh = parallel.create_mesh(1, jax.devices()[:1])
  model = mctf_jax.create_model(config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), model.dummy_images())
  return trainer.initial_variables(model, config, jax.random.PRNGKey(0),
                                   parallel.tree_shardings(mesh, shapes))["params"]


def test_init_from_pth_and_from_converted_orbax(tmp_path):
  config = tiny_config()
  config.init.checkpoint = os.path.join(DATA, "tiny_deit.pth")
  from_pth = _init(config)
  want = convert.torch_to_flax(convert.load_state_dict(config.init.checkpoint), config)
  jax.tree.map(np.testing.assert_array_equal, from_pth, want)
  checkpoint.save_params(str(tmp_path / "conv"), want, config)
  config.init.checkpoint = str(tmp_path / "conv")
  jax.tree.map(np.testing.assert_array_equal, _init(config), want)


def test_init_adapts_image_size_and_class_count(caplog):
  config = tiny_config(img_size=48, num_classes=7)
  config.init.checkpoint = os.path.join(DATA, "tiny_deit.pth")
  with caplog.at_level(logging.WARNING):
    params = _init(config)
  assert params["pos_embed"].shape == (1, 145, 64)
  assert params["head"]["kernel"].shape == (64, 7)
  assert "resizing pos_embed" in caplog.text and "dropping the checkpoint's head" in caplog.text
  src = convert.load_state_dict(config.init.checkpoint)
  np.testing.assert_array_equal(params["blocks_2"]["mlp"]["fc1"]["kernel"],
                                src["blocks.2.mlp.fc1.weight"].T)


def test_random_init_without_checkpoint():
  params = _init(tiny_config())
  assert params["pos_embed"].shape == (1, 65, 64)
  assert 0.005 < float(np.std(params["blocks_0"]["attn"]["qkv"]["kernel"])) < 0.05


@pytest.mark.parametrize("field,value,says", [
    ("log_every_steps", 0, "log_every_steps=0: expected an int >= 1"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps=0: expected an int >= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints=0: expected an int >= 1"),
    ("eval_every_epochs", -2, "eval_every_epochs=-2: expected an int >= 1"),
    ("cooldown_epochs", -1, "cooldown_epochs=-1: expected an int >= 0"),
    ("weight_decay", -0.1, "weight_decay=-0.1: expected a number >= 0"),
    ("base_lr", 0.0, "base_lr=0.0: expected a number > 0"),
    ("ema_decay", 1.0, r"ema_decay=1.0: expected a number in \[0, 1\)"),
    ("seed", -1, r"seed=-1: expected an int in \[0, 2\*\*63\)"),
    ("loss.label_smoothing", 1.5, r"loss.label_smoothing=1.5: expected a number in \[0, 1\)"),
    ("loss.consistency_threshold", -1.0,
     r"loss.consistency_threshold=-1.0: expected a number in \[0, 1\]"),
    ("loss.weight_teacher", -1.0, "loss.weight_teacher=-1.0: expected a number >= 0"),
])
def test_training_config_check(field, value, says):
  config = tiny_config()
  run_config.check_training_config(config)
  *parents, name = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[name] = value
  with pytest.raises(ConfigError, match=says):
    run_config.check_training_config(config)


def test_batch_size_check():
  mesh = parallel.create_mesh(1, jax.devices()[:1])
  parallel.check_batch_size(3, mesh)
  with pytest.raises(ConfigError, match=r"eval_batch_size=0: expected an int >= 1"):
    parallel.check_batch_size(0, mesh, "eval_batch_size")   # eval.py's (0 passed before)


def test_training_config_needs_an_epoch():
  config = tiny_config()
  config.num_epochs, config.cooldown_epochs = 0, 0
  with pytest.raises(ConfigError, match="nothing to train"):
    run_config.check_training_config(config)


def test_workdir_config_check(tmp_path):
  config = tiny_config()
  run_config.check_workdir_config(str(tmp_path), config)
  run_config.check_workdir_config(str(tmp_path), config)        # same config: fine
  config.log_every_steps = 7                                  # operational: fine
  config.data.data_dir = "/elsewhere"
  run_config.check_workdir_config(str(tmp_path), config)
  config.fusion.r = 4.0
  with pytest.raises(TrainingError, match=r"fusion\.r: 8\.0 there, 4\.0 now"):
    run_config.check_workdir_config(str(tmp_path), config)
  # A run made before fields were added resumes with their values of that time.
  path = tmp_path / run_config.CONFIG_FILE
  stored = json.loads(path.read_text())
  for section, field in [("model", "arch"), ("fusion", "method"), ("fusion", "inflection")]:
    del stored[section][field]
  path.write_text(json.dumps(stored))
  config.fusion.r = 8.0
  run_config.check_workdir_config(str(tmp_path), config)
  config.fusion.method = "tome"
  with pytest.raises(TrainingError, match=r"fusion\.method: 'mctf' there, 'tome' now"):
    run_config.check_workdir_config(str(tmp_path), config)


def test_other_processes_find_the_workdir_config_whole_or_absent(tmp_path, monkeypatch):
  """Every process of a multi-process run checks the workdir at about the time process 0
  writes config.json there. One that looks while it is being written must find no file
  (or all of it): an empty one, created but not yet written, failed its json.load, which
  made test_entry_points::test_two_processes fail now and then."""
  config = tiny_config()
  workdir = str(tmp_path / "run")
  looked = []

  class LookFirst:
    """Process 0's file, through which process 1 checks the workdir before each write."""

    def __init__(self, f):
      self._f = f

    def __getattr__(self, name):
      return getattr(self._f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return self._f.__exit__(*exc)

    def write(self, text):
      with monkeypatch.context() as m:
        m.setattr(run_config.jax, "process_index", lambda: 1)
        run_config.check_workdir_config(workdir, config)
      looked.append(text)
      return self._f.write(text)

  monkeypatch.setattr(run_config, "open", lambda *a, **k: LookFirst(open(*a, **k)), raising=False)
  run_config.check_workdir_config(workdir, config)
  monkeypatch.undo()
  assert looked                                        # process 1 looked mid-write
  with open(os.path.join(workdir, run_config.CONFIG_FILE)) as f:
    assert json.load(f) == json.loads(config.to_json_best_effort())
  assert os.listdir(workdir) == [run_config.CONFIG_FILE]  # nothing else left behind
  run_config.check_workdir_config(workdir, config)        # and the same config resumes
