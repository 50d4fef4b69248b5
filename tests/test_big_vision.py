"""big_vision's ViT (arch 'vit') and its checkpoints: parity with big_vision's own outputs
(tests/golden/big_vision), every layout the .npz reader takes, the pooling's token sizes,
the FLOP counts of the configs, and the one-line errors."""

import json
import logging
import os

import jax
import numpy as np
import pytest

import mctf_jax
from mctf_jax import checkpoint, convert
from mctf_jax.errors import CheckpointError, CheckpointMismatchError, ConfigError
from mctf_jax.models.vit import ViTConfig, decode_variant
from mctf_jax import cost
from mctf_jax.tools import flops
from conftest import run

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "big_vision")
CASES = ("bv_tiny_gap", "bv_tiny_map", "bv_tiny_sincos_gap", "bv_tiny_tok_augreg",
         "bv_tiny_tok_scan")


def case_config(case, dtype="float32", **fusion):
  """The 'vit' config of a golden case: big_vision's vit.Model keyword arguments."""
  with open(os.path.join(GOLDEN, f"{case}.json")) as f:
    meta = json.load(f)
  kw = meta["big_vision_model_kwargs"]
  model = dict(arch="vit", img_size=meta["image_size"], patch_size=kw["patch_size"][0],
               embed_dim=kw["width"], depth=kw["depth"], mlp_dim=kw["mlp_dim"],
               num_heads=kw["num_heads"], num_classes=kw["num_classes"],
               pool_type=kw["pool_type"], posemb=kw.get("posemb", "learn"),
               rep_size=kw.get("rep_size", 0), dtype=dtype, param_dtype=dtype)
  return {"model": model, "fusion": dict(dict(r=0, layers=()), **fusion)}


def npz(case):
  return os.path.join(GOLDEN, f"{case}.npz")


def outputs(model):
  """jit(params, images) -> (logits, pre_logits, encoded tokens, their sizes)."""
  def run_model(params, images):
    out = model.apply({"params": params}, images, method=model.encode)
    pre = model.apply({"params": params}, out.tokens_BxTxC, out.size_BxT,
                      method=model.pre_logits_of)
    logits = model.apply({"params": params}, images)
    return logits, pre, out.tokens_BxTxC, out.size_BxT
  return jax.jit(run_model)


@pytest.mark.parametrize("case", CASES)
def test_parity_with_big_vision(case):
  """Each checkpoint through the real loader; logits, pre-logits and encoded tokens as
  big_vision's vit.Model computes them (float32)."""
  config = case_config(case)
  io = np.load(os.path.join(GOLDEN, f"{case}.io.npz"))
  params = checkpoint.load_params(npz(case), config)
  logits, pre, encoded, _ = outputs(mctf_jax.create_model(config))(params, io["images"])
  for name, got in (("logits", logits), ("pre_logits", pre), ("encoded", encoded)):
    np.testing.assert_allclose(got, io[name], rtol=0, atol=1e-4, err_msg=f"{case} {name}")


@pytest.mark.parametrize("pool_type", ["gap", "map"])
def test_pooling_counts_a_fused_token_as_its_size(pool_type):
  """Fusing exact duplicates leaves the pooled representation as it was: a token of size n
  weighs as n copies in the mean and in the MAP head's attention."""
  config = case_config(f"bv_tiny_{pool_type}")
  model = mctf_jax.create_model(config)
  params = checkpoint.load_params(npz(f"bv_tiny_{pool_type}"), config)
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 7, 64)), np.float32)
  repeats = np.array([1, 3, 1, 2, 1, 1, 4])
  duplicated = np.repeat(x, repeats, axis=1)                        # 13 tokens of size 1
  sizes = np.broadcast_to(repeats, (2, 7)).astype(np.float32)       # 7 tokens of sizes n

  def pool(tokens, size):
    return model.apply({"params": params}, tokens, size, method=model.pool)
  want = jax.jit(pool)(duplicated, np.ones(duplicated.shape[:2], np.float32))
  got = jax.jit(pool)(x, sizes)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  # Padding rows (size 0) take no part.
  padded = np.concatenate([x, 100 * np.ones((2, 3, 64), np.float32)], axis=1)
  got = jax.jit(pool)(padded, np.concatenate([sizes, np.zeros((2, 3), np.float32)], axis=1))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_mctf_without_a_class_token_on_duplicate_tokens():
  """The whole model with MCTF (nothing protected, MAP head): on an image whose patch
  tokens are all alike (a flat image, no position embedding), fusing them changes no
  output; on a real image it fuses and runs."""
  config = case_config("bv_tiny_map", r=8, layers=(1, 2), trace_source=True)
  model = mctf_jax.create_model(config)
  assert model.schedule().num_protected == 0 and model.schedule().tokens_out == 48
  params = checkpoint.load_params(npz("bv_tiny_map"), config)
  flat = dict(params, pos_embed=np.zeros_like(params["pos_embed"]))
  images = np.full((2, 32, 32, 3), 0.3, np.float32)
  fused, plain = outputs(model), outputs(model.with_fusion(r=0))
  logits, pre, _, size = fused(flat, images)
  want_logits, want_pre, _, _ = plain(flat, images)
  np.testing.assert_array_equal(np.asarray(size).sum(-1), 64)
  assert np.asarray(size).max() > 1
  np.testing.assert_allclose(logits, want_logits, rtol=0, atol=2e-5)
  np.testing.assert_allclose(pre, want_pre, rtol=0, atol=2e-5)
  io = np.load(os.path.join(GOLDEN, "bv_tiny_map.io.npz"))
  logits, _, tokens, _ = fused(params, io["images"])
  assert tokens.shape == (3, 48, 64) and np.all(np.isfinite(logits))


# ----------------------------------------------------------------------------- the reader


def _reference_params():
  return checkpoint.load_params(npz("bv_tiny_map"), case_config("bv_tiny_map"))


def test_layouts_and_sub_trees(tmp_path, caplog):
  """The same weights at the top level, under params/ or opt/target/, as the image tower
  of a two-tower checkpoint (':img'), and as a torch-named .npz (told apart by its keys)."""
  config = case_config("bv_tiny_map")
  want = _reference_params()
  flat = dict(np.load(npz("bv_tiny_map")))
  layouts = {
      "params.npz": {f"params/{k}": v for k, v in flat.items()},
      "opt.npz": {f"opt/target/{k}": v for k, v in flat.items()},
      "two_tower.npz": {**{f"params/img/{k}": v for k, v in flat.items()},
                        "params/txt/Embed_0/embedding": np.zeros((5, 64), np.float32),
                        "params/t": np.ones((1,), np.float32)},
      "torch.npz": convert.flax_to_torch(want, config),
  }
  for name, arrays in layouts.items():
    np.savez(tmp_path / name, **arrays)
  for path in ("params.npz", "opt.npz", "two_tower.npz", "two_tower.npz:img",
               "two_tower.npz:params/img", "torch.npz"):
    got = checkpoint.load_params(str(tmp_path / path), config)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  with pytest.raises(CheckpointError, match=r"no sub-tree 'image' \(looked for image/, "
                     r"params/image/, opt/target/image/\); it holds params/img, params/t"):
    checkpoint.load_params(str(tmp_path / "two_tower.npz:image"), config)
  with pytest.raises(CheckpointError, match="sub-tree 'params/txt' is not a ViT image encoder"):
    checkpoint.load_params(str(tmp_path / "two_tower.npz:txt"), config)


def test_other_image_size_class_count_and_old_position_embedding(tmp_path, caplog):
  """The position embedding is resized and the head dropped with a warning (adapt, as
  convert and train.py's init do); eval's exact loading lists them instead. An embedding
  with the class token's entry first (old checkpoints) is folded into the class token."""
  config = case_config("bv_tiny_tok_augreg")
  config["model"].update(img_size=48, num_classes=7)
  with caplog.at_level(logging.WARNING):
    params = checkpoint.load_params(npz("bv_tiny_tok_augreg"), config, adapt=True)
  assert ("resizing Transformer/posembed_input/pos_embedding from 64 to 144 tokens (linear, "
          "as big_vision)") in caplog.text
  assert "dropping the checkpoint's head (10 classes)" in caplog.text
  assert params["pos_embed"].shape == (1, 144, 64) and params["head"]["kernel"].shape == (64, 7)
  # The new head starts at zero, as big_vision's (head_zeroinit).
  assert not params["head"]["kernel"].any() and not params["head"]["bias"].any()
  # Resized as big_vision's loader resizes it: scipy.ndimage.zoom(grid, order=1).
  scipy_ndimage = pytest.importorskip("scipy.ndimage")
  grid = np.load(npz("bv_tiny_tok_augreg"))["Transformer/posembed_input/pos_embedding"]
  want = scipy_ndimage.zoom(grid.reshape(8, 8, 64), (12 / 8, 12 / 8, 1), order=1)
  np.testing.assert_allclose(params["pos_embed"].reshape(12, 12, 64), want, rtol=0, atol=1e-6)
  assert not np.allclose(params["pos_embed"], convert.resize_pos_embed(grid, 144, 0), atol=1e-3)
  with pytest.raises(CheckpointMismatchError) as err:
    checkpoint.load_params(npz("bv_tiny_tok_augreg"), config)
  assert "Transformer/posembed_input/pos_embedding is (1, 64, 64), the config needs " \
         "(1, 144, 64)" in str(err.value) and "head/kernel is (64, 10)" in str(err.value)

  # The old layout: x = [cls, patches] + pos (65 entries) equals cls + pos[0] then patches.
  config = case_config("bv_tiny_tok_augreg")
  flat = dict(np.load(npz("bv_tiny_tok_augreg")))
  name = "Transformer/posembed_input/pos_embedding"
  first = np.asarray(jax.random.normal(jax.random.key(3), (1, 1, 64)), np.float32)
  old = dict(flat, **{name: np.concatenate([first, flat[name]], axis=1),
                      "cls": flat["cls"] - first})
  np.savez(tmp_path / "old.npz", **old)
  got = checkpoint.load_params(str(tmp_path / "old.npz"), config)
  want = checkpoint.load_params(npz("bv_tiny_tok_augreg"), config)
  np.testing.assert_array_equal(got["pos_embed"], want["pos_embed"])
  np.testing.assert_allclose(got["cls_token"], want["cls_token"], rtol=0, atol=1e-6)
  # A feature extractor (no head): a new head when adapting, else listed as missing.
  np.savez(tmp_path / "headless.npz", **{k: v for k, v in flat.items()
                                         if not k.startswith("head/")})
  with caplog.at_level(logging.WARNING):
    got = checkpoint.load_params(str(tmp_path / "headless.npz"), config, adapt=True)
  assert "has no head" in caplog.text and got["head"]["kernel"].shape == (64, 10)
  assert not got["head"]["kernel"].any()
  with pytest.raises(CheckpointMismatchError, match="missing .2.: head/kernel, head/bias"):
    checkpoint.load_params(str(tmp_path / "headless.npz"), config)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
  config = case_config("bv_tiny_tok_scan")
  flat = dict(np.load(npz("bv_tiny_tok_scan")))
  np.savez(tmp_path / "other.npz", weights=np.zeros(3), step=np.ones(1))
  with pytest.raises(CheckpointError, match=r"other.npz is not a checkpoint of a 'vit' model: "
                     r"none of its 2 arrays \(step, weights\)") as err:
    checkpoint.load_params(str(tmp_path / "other.npz"), config)
  assert "\n" not in str(err.value)
  with pytest.raises(CheckpointError, match="is not a big_vision / vision_transformer ViT"):
    convert.file_to_variables(str(tmp_path / "other.npz"), config, kind="big_vision")
  # Width and depth: what the file is, and what the config asks.
  wide = dict(config, model=dict(config["model"], embed_dim=128, mlp_dim=256))
  with pytest.raises(CheckpointError, match=r"is a ViT of width 64 and depth 3, but the config "
                     r"has width 128 and depth 3") as err:
    checkpoint.load_params(npz("bv_tiny_tok_scan"), wide)
  assert "\n" not in str(err.value)
  deep = dict(config, model=dict(config["model"], depth=4))
  with pytest.raises(CheckpointError, match="depth 3, but the config has width 64 and depth 4"):
    checkpoint.load_params(npz("bv_tiny_tok_scan"), deep)
  # Every missing, unexpected or misshapen array at once, in the file's own names.
  broken = dict(flat)
  del broken["cls"], broken["Transformer/encoderblock/LayerNorm_1/bias"]
  broken["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] = np.zeros((3, 64, 100))
  broken["MAPHead_0/probe"] = np.zeros((1, 1, 64))
  np.savez(tmp_path / "broken.npz", **broken)
  with pytest.raises(CheckpointMismatchError) as err:
    checkpoint.load_params(str(tmp_path / "broken.npz"), config)
  message = str(err.value)
  for needle in ("missing (2): cls, Transformer/encoderblock/LayerNorm_1/bias",
                 "unexpected (1): MAPHead_0/probe",
                 "wrong shape: Transformer/encoderblock/MlpBlock_0/Dense_0/kernel is "
                 "(3, 64, 100), the config needs (3, 64, 128)"):
    assert needle in message, message
  # A big_vision checkpoint for another backbone.
  with pytest.raises(ConfigError, match="loads into model.arch='vit'"):
    checkpoint.load_params(npz("bv_tiny_tok_scan"), {"model": dict(arch="deit")})


def test_variants_and_config_errors():
  assert decode_variant("So400m/14") == dict(embed_dim=1152, depth=27, mlp_dim=4304,
                                             num_heads=16, patch_size=14)
  cfg = ViTConfig(variant="B/32", depth=6, rep_size=True)
  assert (cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.mlp_dim, cfg.rep_size) == \
      (768, 6, 32, 3072, 768)
  assert ViTConfig(embed_dim=64, num_heads=2).mlp_dim == 256       # big_vision: 4 x width
  for bad in ("Q/16", "B/x", "B16"):
    with pytest.raises(ConfigError, match=f"unknown model.variant '{bad}': big_vision's "
                       f"variants are mu, Ti, S, M, B, L, So400m"):
      ViTConfig(variant=bad)
  with pytest.raises(ConfigError, match="model.pool_type must be one of"):
    ViTConfig(pool_type="cls")
  assert ViTConfig(variant="So400m/14", img_size=384).num_tokens == 27 * 27


@pytest.mark.parametrize("name,ratio", [("vit_b16_augreg", 0.592), ("vit_s16_gap", 0.589),
                                        ("siglip_b16", 0.584), ("siglip_so400m14", 0.593)])
def test_configs_remove_about_40_percent_of_the_flops(name, ratio):
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config()
  fused, plain = cost.count_flops(config), cost.count_flops(config, r=0)
  assert fused.total / plain.total == pytest.approx(ratio, abs=5e-4)
  assert mctf_jax.create_model(config).schedule().fuses


def test_flops_of_the_tail_against_the_traced_program():
  """The FLOP counter's products are the traced program's for the class-token model with
  pre-logits and the sin-cos GAP one (the contract test covers the MAP head)."""
  for case in ("bv_tiny_tok_augreg", "bv_tiny_sincos_gap"):
    config = case_config(case, r=8, layers=(1,), merge_impl="scatter")
    model = mctf_jax.create_model(config)
    for r in (None, 0):
      report = cost.count_flops(config, r=r, implementation="mctf_jax")
      assert flops.traced_matmul_flops(model, 2, r) == 2 * report.matmul


def test_convert_cli_and_eval_py_on_an_npz(tmp_path, env):
  """`python -m mctf_jax.convert --big_vision=...` writes what load_params reads; eval.py
  takes the .npz itself (the digits: 32x32, 10 classes, as the golden model)."""
  overrides = ["--config.model.embed_dim=64", "--config.model.mlp_dim=128",
               "--config.model.depth=3", "--config.model.pool_type=map"]
  config = "--config=tests/configs/digits_tiny.py:vit"
  out = tmp_path / "converted"
  done = run(["-m", "mctf_jax.convert", config, f"--big_vision={npz('bv_tiny_map')}",
              f"--out={out}"] + overrides, env)
  assert done.returncode == 0, done.stderr
  params = checkpoint.load_params(str(out), case_config("bv_tiny_map"))
  jax.tree.map(np.testing.assert_array_equal, params, _reference_params())
  done = run(["eval.py", config, f"--checkpoint={npz('bv_tiny_map')}",
              f"--output_dir={tmp_path}", "--config.eval.r_values=(0, 8)",
              "--throughput_batch=0"] + overrides, env)
  assert done.returncode == 0, done.stdout + done.stderr
  rows = json.loads((tmp_path / "results.json").read_text())["results"]
  assert [row["r"] for row in rows] == [0, 8] and rows[0]["images"] == 360
  bad = run(["eval.py", config, f"--checkpoint={npz('bv_tiny_map')}:img",
             f"--output_dir={tmp_path}"] + overrides, env)
  assert bad.returncode == 1 and "no sub-tree 'img'" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_train_py_initialises_from_an_npz(caplog):
  """config.init.checkpoint = a big_vision .npz, as for fine-tuning with MCTF: the trainer's
  initial parameters are the file's, the head re-initialised for another class count."""
  import ml_collections
  from mctf_jax import parallel
  from mctf_jax.training import trainer
  config = ml_collections.ConfigDict(case_config("bv_tiny_map"))
  config.model.num_classes = 7
  config.init = ml_collections.ConfigDict(dict(checkpoint=npz("bv_tiny_map")))
  model = mctf_jax.create_model(config)
  mesh = parallel.create_mesh(1, jax.devices()[:1])
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), model.dummy_images())
  with caplog.at_level(logging.WARNING):
    params = trainer.initial_variables(model, config, jax.random.PRNGKey(0),
                                       parallel.tree_shardings(mesh, shapes))["params"]
  assert "head" in caplog.text
  assert params["head"]["kernel"].shape[-1] == 7
  want = checkpoint.load_params(npz("bv_tiny_map"), case_config("bv_tiny_map"))
  for name in ("patch_embed", "blocks_1", "attn_pool"):
    jax.tree.map(np.testing.assert_array_equal, params[name], want[name])


@pytest.mark.parametrize("old,new", [(8, 12), (14, 16), (16, 14), (24, 14), (16, 37), (2, 5)])
def test_position_embedding_resizes_as_big_vision(old, new):
  """big_vision's resample_posemb: scipy.ndimage.zoom of the grid with order 1 (corners on
  corners); equal to within float32 rounding, whatever the sizes."""
  from mctf_jax.convert.big_vision import resample_posemb
  scipy_ndimage = pytest.importorskip("scipy.ndimage")
  posemb = np.random.default_rng(old * 100 + new).standard_normal((1, old * old, 6))
  posemb = posemb.astype(np.float32)
  got = resample_posemb(posemb, new * new)
  want = scipy_ndimage.zoom(posemb.reshape(old, old, 6), (new / old, new / old, 1), order=1)
  assert got.dtype == np.float32 and got.shape == (1, new * new, 6)
  np.testing.assert_allclose(got.reshape(new, new, 6), want, rtol=1e-6, atol=1e-6)
  with pytest.raises(CheckpointError, match=r"shape \(1, 64, 6\) to 50 tokens"):
    resample_posemb(np.zeros((1, 64, 6), np.float32), 50)


# ----------------------------------------------------------------------------- pool 'none'


def test_pool_none_outputs_every_token_as_big_vision():
  """Pool 'none' (a VLM's image encoder): the head on every encoded token, as big_vision's
  'logits' with pool 'none' (from the golden GAP model's encoded tokens and head); with
  fusion one row per fused token, whose size-weighted mean is the GAP model's logits (the
  head is affine); ``grid_outputs`` gives each patch its token's row."""
  config = case_config("bv_tiny_gap")
  config["model"]["pool_type"] = "none"
  io = np.load(os.path.join(GOLDEN, "bv_tiny_gap.io.npz"))
  params = checkpoint.load_params(npz("bv_tiny_gap"), config)
  model = mctf_jax.create_model(config)
  assert model.config.per_token_outputs and model.schedule().num_protected == 0
  with np.load(npz("bv_tiny_gap")) as f:
    kernel, bias = f["head/kernel"], f["head/bias"]
  want = np.einsum("btc,ck->btk", io["encoded"].astype(np.float64), kernel) + bias
  logits = jax.jit(model.apply)({"params": params}, io["images"])
  np.testing.assert_allclose(logits, want, rtol=0, atol=1e-4)
  grid = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.grid_outputs))(
      params, io["images"])
  np.testing.assert_array_equal(grid, np.asarray(logits).reshape(3, 8, 8, 10))

  fused = model.with_fusion(r=8, layers=(1, 2))
  gap = mctf_jax.create_model(case_config("bv_tiny_gap", r=8, layers=(1, 2)))

  def run_fused(p, x):
    out = fused.apply({"params": p}, x, method=fused.encode, trace_source=True)
    return (fused.apply({"params": p}, x), out.size_BxT, out.source_BxTxN,
            fused.apply({"params": p}, x, method=fused.grid_outputs),
            gap.apply({"params": p}, x))
  tokens, size, source, grid, gap_logits = jax.jit(run_fused)(params, io["images"])
  assert tokens.shape == (3, 48, 10) and grid.shape == (3, 8, 8, 10)
  mean = np.einsum("btk,bt->bk", tokens, size) / np.asarray(size).sum(-1, keepdims=True)
  np.testing.assert_allclose(mean, gap_logits, rtol=0, atol=2e-5)
  # Patch n holds the row of the one token t with source[b, t, n] = 1.
  holder = np.argmax(np.asarray(source), axis=1)                      # (B, N)
  np.testing.assert_array_equal(
      np.asarray(grid).reshape(3, 64, 10), np.take_along_axis(np.asarray(tokens),
                                                              holder[..., None], axis=1))


def test_pool_none_flops_and_the_scripts_refusal(tmp_path):
  """The head (and a pre-logits layer) on every token in the FLOP count, as traced; train.py
  (before the workdir records the config) and eval.py refuse an output per token."""
  from mctf_jax.training import evaluation, trainer
  config = case_config("bv_tiny_gap", r=8, layers=(1,), merge_impl="scatter")
  config["model"].update(pool_type="none", rep_size=32)
  model = mctf_jax.create_model(config)
  for r in (None, 0):
    report = cost.count_flops(config, r=r, implementation="mctf_jax")
    assert flops.traced_matmul_flops(model, 2, r) == 2 * report.matmul
  head = cost.count_flops(config).stages[-1]   # 64 - 8 tokens, each through the head
  assert (head.name, head.tokens_in, head.ops) == ("head", 56, (("head", 56 * 32 * 10),))
  with pytest.raises(ConfigError, match=r"eval.py trains and evaluates image classifiers, "
                     r"but model.pool_type='none' gives an output per token"):
    evaluation.check_image_outputs(model, "eval.py")
  train_config = mctf_jax.load_config(os.path.join(os.path.dirname(__file__), "configs",
                                                   "digits_tiny.py:vit"))
  train_config.model.pool_type = "none"
  with pytest.raises(ConfigError, match=r"train.py .* model.pool_type='none'"):
    trainer.train_and_evaluate(train_config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run") or not os.listdir(tmp_path / "run")
