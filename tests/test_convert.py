"""PyTorch checkpoints <-> Flax params, the torch-free .pth reader, and the convert CLI."""

import io
import logging
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

import mctf_jax
from mctf_jax import checkpoint, convert, torch_pickle
from conftest import (golden_config, golden_images, golden_state_dict, jit_apply, launch_env,
                      load_golden, run)

DATA = os.path.join(os.path.dirname(__file__), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def golden():
  meta, data = load_golden("tiny_default")
  return meta, data, golden_state_dict(data)


def test_round_trip_is_exact(golden, x64):
  meta, _, state = golden
  config = golden_config(meta, "float64")
  params = convert.torch_to_flax(state, config)
  back = convert.flax_to_torch(params)
  assert sorted(back) == sorted(state)
  for name, value in state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  again = convert.torch_to_flax(back, config)
  jax.tree.map(np.testing.assert_array_equal, again, params)
  # The flax tree is exactly the model's.
  model = mctf_jax.create_model(config)
  want = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  assert jax.tree.structure(want["params"]) == jax.tree.structure(params)
  jax.tree.map(lambda w, p: (w.shape == p.shape) or pytest.fail(f"{w.shape} vs {p.shape}"),
               want["params"], params)


def test_wrapped_and_torch_file(golden):
  meta, data, state = golden
  config = golden_config(meta, "float32")
  wrapped = convert.torch_to_flax({"model": state, "epoch": 3}, config)
  plain = convert.torch_to_flax(state, config)
  jax.tree.map(np.testing.assert_array_equal, wrapped, plain)
  from_pth = convert.torch_to_flax(convert.load_state_dict(os.path.join(DATA, "tiny_deit.pth")),
                                   config)
  jax.tree.map(np.testing.assert_array_equal, from_pth, plain)
  logits = jit_apply(mctf_jax.create_model(config))(from_pth, golden_images(data, np.float32))
  np.testing.assert_allclose(logits, data["f32/logits"], atol=1e-4, rtol=0)
  ema = convert.load_state_dict(os.path.join(DATA, "tiny_deit.pth"), ema=True)
  np.testing.assert_allclose(ema["norm.bias"], state["norm.bias"].astype(np.float32) * 0.5)


def test_npz_and_safetensors(golden, tmp_path):
  from safetensors.numpy import save_file
  _, _, state = golden
  np.savez(tmp_path / "w.npz", **state)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp_path / "w.safetensors"))
  for name in ("w.npz", "w.safetensors"):
    loaded = convert.load_state_dict(str(tmp_path / name))
    assert sorted(loaded) == sorted(state)
    for k in state:
      np.testing.assert_array_equal(loaded[k], state[k])


@pytest.mark.parametrize("name", ["torch_reader.pth", "torch_reader_legacy.pth"])
def test_torch_free_reader_matches_torch_load(name):
  """Both formats torch.save writes: zip (torch >= 1.6) and legacy (the same object)."""
  loaded = torch_pickle.load(os.path.join(DATA, name))
  expected = np.load(os.path.join(DATA, "torch_reader_expected.npz"))
  for name in expected.files:
    got = loaded["tensors"][name]
    assert got.shape == expected[name].shape, name
    np.testing.assert_array_equal(np.asarray(got, expected[name].dtype), expected[name])
  assert str(loaded["tensors"]["bf16"].dtype) == "bfloat16"
  np.testing.assert_array_equal(loaded["nested"][1]["x"], np.arange(-5, 5))


def test_legacy_checkpoint_gives_the_same_weights(golden):
  """An official-style checkpoint ({'model', 'epoch', 'args': Namespace}) saved in the
  legacy format loads, without torch, to the same weights as the zip-format one."""
  _, _, state = golden
  legacy = convert.load_state_dict(os.path.join(DATA, "tiny_deit_legacy.pth"))
  assert sorted(legacy) == sorted(state)
  for k in state:
    np.testing.assert_array_equal(legacy[k], state[k])
    assert legacy[k].dtype == np.float32


@pytest.mark.parametrize("name", ["torch_reader.pth", "torch_reader_legacy.pth"])
def test_damaged_torch_files_are_checkpoint_errors(name, tmp_path):
  """A .pth cut short anywhere is a CheckpointError naming the file, never another
  exception and never a silently shorter result."""
  data = open(os.path.join(DATA, name), "rb").read()
  for cut in range(1, len(data), max(1, len(data) // 40)):
    path = tmp_path / f"cut_{cut}.pth"
    path.write_bytes(data[:cut])
    with pytest.raises(convert.CheckpointError, match=f"cut_{cut}.pth"):
      convert.load_state_dict(str(path))


def test_torch_files_that_hold_no_state_dict(tmp_path):
  class _Saver(pickle.Pickler):   # persistent ids as torch's legacy save writes them
    def persistent_id(self, obj):
      return ("module", None, None, None) if obj == "MODULE" else None

  def legacy(obj, magic=0x1950a86a20f9469cfc6c):
    head = b"".join(pickle.dumps(x, protocol=2) for x in
                    (magic, 1001, {"little_endian": True, "protocol_version": 1001}))
    body = io.BytesIO()
    _Saver(body, protocol=2).dump(obj)
    return head + body.getvalue() + pickle.dumps([], protocol=2)

  (tmp_path / "module.pth").write_bytes(legacy({"net": "MODULE"}))
  with pytest.raises(convert.CheckpointError, match=r"module.pth.*model.state_dict\(\)"):
    convert.load_state_dict(str(tmp_path / "module.pth"))
  (tmp_path / "plain.pth").write_bytes(pickle.dumps({"a": 1}, protocol=2))
  with pytest.raises(convert.CheckpointError, match="no torch.save magic number"):
    convert.load_state_dict(str(tmp_path / "plain.pth"))
  # torch.save(model) in the zip format: the module's class, rebuilt by no code of ours.
  with zipfile.ZipFile(tmp_path / "whole.pth", "w") as z:
    z.writestr("whole/data.pkl", b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81}b.")
  with pytest.raises(convert.CheckpointError,
                     match=r"holds a torch.nn.modules.linear.Linear object, not a state dict"):
    convert.load_state_dict(str(tmp_path / "whole.pth"))
  tar = bytearray(1024)
  tar[257:262] = b"ustar"
  (tmp_path / "old.pth").write_bytes(bytes(tar))
  with pytest.raises(convert.CheckpointError, match="tar format of torch < 0.4"):
    convert.load_state_dict(str(tmp_path / "old.pth"))


def test_tensor_past_its_storage_is_refused():
  storage = np.arange(6, dtype=np.float32)
  np.testing.assert_array_equal(torch_pickle._rebuild_tensor(storage, 2, (2, 2), (2, 1)),
                                [[2, 3], [4, 5]])
  for offset, size, stride in [(3, (2, 2), (2, 1)), (0, (7,), (1,)), (6, (), ()),
                               (-1, (2,), (1,)), (5, (2,), (-1,))]:
    with pytest.raises(torch_pickle.FormatError, match="runs past the end of its storage"):
      torch_pickle._rebuild_tensor(storage, offset, size, stride)


def test_zip_storage_shorter_than_its_tensors(tmp_path):
  with zipfile.ZipFile(os.path.join(DATA, "torch_reader.pth")) as z:
    entries = {i.filename: z.read(i) for i in z.infolist()}
  entries["torch_reader/data/1"] = entries["torch_reader/data/1"][:-4]
  with zipfile.ZipFile(tmp_path / "short.pth", "w") as z:
    for name, raw in entries.items():
      z.writestr(name, raw)
  with pytest.raises(convert.CheckpointError,
                     match=r"short.pth'?: storage 1 holds 236 bytes, its tensors need 240"):
    convert.load_state_dict(str(tmp_path / "short.pth"))


@pytest.mark.parametrize("name", ["tiny_deit.pth", "tiny_deit_legacy.pth"])
def test_reader_agrees_with_torch_when_installed(name):
  torch = pytest.importorskip("torch")
  path = os.path.join(DATA, name)
  ours = torch_pickle.load(path)["model"]
  theirs = torch.load(path, map_location="cpu", weights_only=False)["model"]
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k].numpy())


def test_timm_checkpoints_agree_with_torch_when_installed(tmp_path):
  """Both ways on a timm training checkpoint ('.pth.tar': weights, EMA weights, an
  argparse.Namespace, an int64 BatchNorm counter): the files the tests write without torch
  load in torch as written, and torch.save's own files (with a transposed view sharing its
  storage) read as torch reads them."""
  torch = pytest.importorskip("torch")
  import argparse
  import torch_files
  _, data = load_golden(os.path.join("backbones", "lvvit_tiny"))
  state = {k[len("param/"):]: np.asarray(v) for k, v in data.items() if k.startswith("param/")}
  state["patch_embed.bn1.num_batches_tracked"] = np.asarray(7, np.int64)
  ema = {k: np.asarray(v * 2) for k, v in state.items()}
  ours = tmp_path / "ours.pth.tar"
  torch_files.timm_checkpoint(ours, state, ema=ema)
  loaded = torch.load(ours, map_location="cpu", weights_only=False)
  for key, want in (("state_dict", state), ("state_dict_ema", ema)):
    assert sorted(loaded[key]) == sorted(want)
    for k, v in want.items():
      assert loaded[key][k].numpy().dtype == v.dtype, k
      np.testing.assert_array_equal(loaded[key][k].numpy(), v)
  tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
  tensors["head.weight_t"] = tensors["head.weight"].t()
  theirs = tmp_path / "theirs.pth.tar"
  torch.save({"epoch": 3, "state_dict": tensors, "args": argparse.Namespace(lr=1e-3),
              "state_dict_ema": {k: v * 2 for k, v in tensors.items()}}, theirs)
  read = torch_pickle.load(str(theirs))
  for k, v in tensors.items():
    np.testing.assert_array_equal(read["state_dict"][k], v.numpy())
    np.testing.assert_array_equal(read["state_dict_ema"][k], (v * 2).numpy())


def test_not_a_checkpoint(tmp_path):
  """Every way a file can fail to be a checkpoint is a CheckpointError naming the file
  (what train.py and eval.py report in one line), never an exception from the reader."""
  bad = tmp_path / "notes.pth"
  bad.write_text("hello")
  with pytest.raises(torch_pickle.FormatError, match="notes.pth.*neither a zip archive"):
    torch_pickle.load(str(bad))
  with pytest.raises(FileNotFoundError, match="no checkpoint file"):
    convert.load_state_dict(str(tmp_path / "missing.pth"))
  (tmp_path / "w.txt").write_text("x")
  with pytest.raises(convert.CheckpointError, match="unknown checkpoint format '.txt'"):
    convert.load_state_dict(str(tmp_path / "w.txt"))
  # A zip that is no torch checkpoint, a truncated one, and files that only look like
  # numpy or safetensors archives.
  with zipfile.ZipFile(tmp_path / "other.pth", "w") as z:
    z.writestr("readme.txt", "not a checkpoint")
  real = open(os.path.join(DATA, "tiny_deit.pth"), "rb").read()
  (tmp_path / "cut.pth").write_bytes(real[:len(real) // 2])
  (tmp_path / "fake.npz").write_bytes(b"PK not really")
  (tmp_path / "fake.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
  with pytest.raises(convert.CheckpointError, match="neither a zip archive .* nor a pickle"):
    convert.load_state_dict(str(bad))
  for name in ("other.pth", "cut.pth", "fake.npz", "fake.safetensors"):
    with pytest.raises(convert.CheckpointError, match=name):
      convert.load_state_dict(str(tmp_path / name))
  with pytest.raises(convert.CheckpointError, match="no EMA weights"):
    convert.unwrap_state_dict({"model": {}}, ema=True)
  assert issubclass(convert.CheckpointMismatchError, convert.CheckpointError)


def test_pos_embed_resize_matches_torch_bicubic():
  data = np.load(os.path.join(DATA, "pos_embed_resize.npz"))
  for new in (10, 4):
    got = convert.resize_pos_embed(data["pos_embed"], 1 + new * new)
    np.testing.assert_allclose(got, data[f"resized_{new}"], rtol=0, atol=1e-12)
  same = convert.resize_pos_embed(data["pos_embed"], data["pos_embed"].shape[1])
  np.testing.assert_allclose(same, data["pos_embed"], atol=1e-12)


def test_other_image_size_and_class_count(golden, caplog):
  meta, data, state = golden
  config = golden_config(meta, "float32")
  config["model"].update(img_size=48, num_classes=7)   # 144 patches, new head
  with caplog.at_level(logging.WARNING):
    params = convert.torch_to_flax(state, config)
  assert "resizing pos_embed from 65 to 145 tokens" in caplog.text
  assert "dropping the checkpoint's head (10 classes)" in caplog.text
  assert params["pos_embed"].shape == (1, 145, 64)
  assert params["head"]["kernel"].shape == (64, 7)
  model = mctf_jax.create_model(config)
  logits = jit_apply(model)(params, np.zeros((2, 48, 48, 3), np.float32))
  assert logits.shape == (2, 7) and np.all(np.isfinite(logits))


def test_mismatch_lists_every_problem(golden):
  meta, _, state = golden
  config = golden_config(meta, "float32")
  broken = dict(state)
  del broken["blocks.1.mlp.fc1.bias"], broken["norm.weight"]
  broken["blocks.0.attn.qkv.weight"] = np.zeros((10, 64))
  broken["head_dist.weight"] = np.zeros((10, 64))
  with pytest.raises(convert.CheckpointMismatchError) as err:
    convert.torch_to_flax(broken, config)
  message = str(err.value)
  for needle in ("missing (2)", "blocks.1.mlp.fc1.bias", "norm.weight", "unexpected (1)",
                 "head_dist.weight", "blocks.0.attn.qkv.weight is (10, 64), the config needs "
                 "(192, 64)"):
    assert needle in message
  ok = dict(state, head_dist_extra=np.zeros(3))
  convert.torch_to_flax(ok, config, allow_unexpected=True)


def test_cli_writes_an_orbax_checkpoint_that_loads(tmp_path, golden):
  _, data, _ = golden
  out = tmp_path / "converted"
  env = launch_env()
  cmd = ["-m", "mctf_jax.convert", "--config=tests/configs/tiny.py",
         f"--torch={DATA}/tiny_deit.pth", f"--out={out}"]
  done = run(cmd, env, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "converted" in done.stdout and "parameters" in done.stdout
  config = {"model": dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                          num_classes=10)}
  params = checkpoint.load_params(str(out), config)
  direct = convert.torch_to_flax(convert.load_state_dict(f"{DATA}/tiny_deit.pth"), config)
  jax.tree.map(np.testing.assert_array_equal, params, direct)
  # Refuses to overwrite; a bad checkpoint gives a clear message, no traceback.
  again = run(cmd, env, timeout=300)
  assert again.returncode != 0 and "exists; pass --overwrite" in again.stderr
  # --overwrite replaces a converted checkpoint, never another directory or a file.
  replaced = run(cmd + ["--overwrite"], env, timeout=300)
  assert replaced.returncode == 0, replaced.stderr
  (out / "notes.txt").write_text("mine")
  (tmp_path / "a_file").write_text("mine")
  for where in (out, tmp_path / "a_file", tmp_path / "a_file" / "x"):
    refused = run(cmd[:-1] + [f"--out={where}", "--overwrite"], env, timeout=300)
    assert refused.returncode != 0 and str(where) in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
  assert (out / "notes.txt").read_text() == (tmp_path / "a_file").read_text() == "mine"
  bad = run(cmd[:-1] + [f"--out={tmp_path}/x", "--config.model.embed_dim=32",
                        "--config.model.num_heads=2"], env, timeout=300)
  assert bad.returncode != 0 and "wrong shape" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_load_params_errors(tmp_path):
  config = {"model": dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                          num_classes=10)}
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.load_params(str(tmp_path / "nope"), config)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    checkpoint.load_params(str(tmp_path / "empty"), config)
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(convert.CheckpointError, match="not a PyTorch checkpoint"):
    checkpoint.load_params(str(tmp_path / "notes.txt"), config)
  wrong = dict(config["model"], embed_dim=32)
  with pytest.raises(convert.CheckpointMismatchError, match="wrong shape"):
    checkpoint.load_params(os.path.join(DATA, "tiny_deit.pth"), {"model": wrong})
