"""T2T-ViT (arch 't2t_vit'): parity with the official code's outputs
(tests/golden/backbones), the soft split's order, the fixed tensors (out of 'params', never
trained), fvcore's FLOPs of the official variants and of the MCTF configs, the train step on
8 devices, timm's .pth.tar checkpoints and the one-line errors. (The contract every
backbone meets: tests/test_backbones.py.)"""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from ml_collections import ConfigDict

import mctf_jax
from mctf_jax import checkpoint, convert, parallel
from mctf_jax.errors import CheckpointError, ConfigError
from mctf_jax.models.t2t_vit import CONSTANTS, T2TViT, T2TViTConfig, soft_split
from mctf_jax import cost
from mctf_jax.tools import flops
from mctf_jax.training import optim, programs
import torch_files
from conftest import ROOT, init_variables

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "backbones")
CASES = ("t2t_tiny_performer", "t2t_tiny_transformer", "t2t_tiny_qk_scale")
DTYPES = {"f32": "float32", "f64": "float64"}
TOLERANCE = {"f32": 1e-4, "f64": 1e-9}


def golden(case):
  with open(os.path.join(GOLDEN, f"{case}.json")) as f:
    meta = json.load(f)
  with np.load(os.path.join(GOLDEN, f"{case}.npz")) as data:
    arrays = {k: data[k] for k in data.files}
  state = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
  return meta, arrays, state


def case_config(meta, dtype="float32", **changes):
  """The official constructor's keyword arguments are this config's fields, one to one."""
  model = dict(meta["official_constructor_kwargs"], arch="t2t_vit", dtype=dtype,
               param_dtype=dtype, **changes)
  return {"model": model, "fusion": dict(r=0, layers=())}


PARITY = [(case, p) for case in CASES for p in golden(case)[0]["precisions"]]


@pytest.mark.parametrize("case,precision", PARITY)
def test_matches_the_official_code(case, precision, request):
  """Logits and features (the class token after the final norm) of the official model's
  random weights through our converter, fusion off: float64 within 1e-9, float32 within
  1e-4 (the Performer casts to float32 inside: float32 only)."""
  if precision == "f64":
    request.getfixturevalue("x64")
  meta, data, state = golden(case)
  dtype = DTYPES[precision]
  config = case_config(meta, dtype)
  model = mctf_jax.create_model(config)
  variables = convert.torch_to_variables(state, config)
  assert set(variables) == {"params", CONSTANTS}

  def run(v, images):
    out = model.apply(v, images, method=model.encode)
    return model.apply(v, images), model.apply(v, out.tokens_BxTxC, out.size_BxT,
                                               method=model.features)
  images = jnp.asarray(data["images"].transpose(0, 2, 3, 1), dtype)
  logits, features = jax.jit(run)(variables, images)
  for name, got in (("logits", logits), ("features", features)):
    want = data[f"{precision}/{name}"]
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    print(f"{case} {precision} {name}: max |diff| {diff:.3g}")
    assert diff <= TOLERANCE[precision], (name, diff)


def test_soft_split_is_torch_unfold():
  """nn.Unfold's order, by its definition: feature c * k * k + i * k + j of output
  position (y, x) is the padded input at channel c, row y * s + i, column x * s + j."""
  rng = np.random.default_rng(0)
  x_BxCxHxW = rng.standard_normal((2, 3, 12, 12))
  for k, s, p in ((7, 4, 2), (3, 2, 1)):
    padded = np.pad(x_BxCxHxW, ((0, 0), (0, 0), (p, p), (p, p)))
    out = (12 + 2 * p - k) // s + 1
    want = np.zeros((2, 3 * k * k, out * out))
    for c in range(3):
      for i in range(k):
        for j in range(k):
          for y in range(out):
            for x in range(out):
              want[:, c * k * k + i * k + j, y * out + x] = padded[:, c, y * s + i, x * s + j]
    got = soft_split(jnp.asarray(x_BxCxHxW.transpose(0, 2, 3, 1), jnp.float32), k, s, p)
    np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 1), rtol=0, atol=1e-6)


def test_fixed_tensors_are_not_parameters():
  """w and pos_embed: initialised in 'constants' (not 'params', so no optimizer, weight
  decay or EMA sees them), as the official init makes them, and read from checkpoints."""
  config = {"model": dict(T2TViT.TINY, arch="t2t_vit")}
  model = mctf_jax.create_model(config)
  variables = init_variables(model)
  constants = traverse_util.flatten_dict(variables[CONSTANTS], sep=".")
  assert sorted(constants) == ["pos_embed", "tokens_to_token.attention1.w",
                               "tokens_to_token.attention2.w"]
  flat_params = traverse_util.flatten_dict(variables["params"], sep=".")
  assert not any(name.endswith(("pos_embed", ".w")) for name in flat_params)
  # The official sinusoid, position p, channel j: p / 10000 ** (2 * (j // 2) / d).
  cfg = mctf_jax.create_model(config).config
  d = cfg.embed_dim
  want = [[p / 10000 ** (2 * (j // 2) / d) for j in range(d)] for p in range(cfg.num_tokens)]
  want = np.array(want)
  want[:, 0::2], want[:, 1::2] = np.sin(want[:, 0::2]), np.cos(want[:, 1::2])
  np.testing.assert_allclose(constants["pos_embed"][0], want, rtol=0, atol=1e-6)
  # Orthogonal rows of norm sqrt(m), as orthogonal_(randn(m, d)) * sqrt(m).
  m = cfg.num_features
  for name in ("tokens_to_token.attention1.w", "tokens_to_token.attention2.w"):
    w = np.asarray(constants[name], np.float64)
    assert w.shape == (m, cfg.token_dim)
    np.testing.assert_allclose(w @ w.T, m * np.eye(m), atol=1e-4)
  # Back to the official names, and the optimizer's view: the params only.
  torch_state = convert.flax_to_torch(variables["params"], config,
                                      model_state={CONSTANTS: variables[CONSTANTS]})
  assert {"pos_embed", "tokens_to_token.attention1.w"} <= set(torch_state)
  mask = traverse_util.flatten_dict(optim.weight_decay_mask(variables["params"],
                                                            T2TViT.NO_WEIGHT_DECAY), sep=".")
  assert not mask["cls_token"] and mask["blocks_0.attn.qkv.kernel"]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_train_step_on_eight_devices():
  """One step of the real optimizer (AdamW, weight decay) on a 4 x 2 (data x FSDP) mesh,
  the model state sharded like the parameters: finite, every parameter moved, the fixed
  tensors unchanged."""
  config = ConfigDict({
      "model": dict(T2TViT.TINY, arch="t2t_vit"), "seed": 0, "batch_size": 16,
      "fusion": dict(r=0.0, layers=(), teacher_r_max=0.0),   # (fusion: the contract tests)
      "loss": dict(label_smoothing=0.1, consistency_threshold=0.0, weight_student=1.0,
                   weight_teacher=1.0, weight_consistency=3.0),
      "ema_decay": 0.0, "num_epochs": 2, "cooldown_epochs": 0, "warmup_epochs": 0,
      "base_lr": 1e-3, "min_lr": 1e-5, "warmup_lr": 1e-6, "weight_decay": 0.05,
      "grad_clip": 0.0})
  mesh = parallel.create_mesh(2)
  assert mesh.devices.size == 8
  program = programs.train_program(config, mesh, steps_per_epoch=2)   # train.py's own
  variables = jax.jit(program.model.init, out_shardings=program.variables_shardings)(
      jax.random.key(0), program.model.dummy_images())
  before = jax.device_get(variables)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({
      "image": rng.standard_normal((16,) + program.model.config.image_shape).astype(np.float32),
      "label": np.arange(16, dtype=np.int32) % 10}, mesh)
  new, metrics = jax.device_get(program.step(program.init_state(variables), batch))
  assert bool(metrics["finite"])
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new.params,
                       before["params"])
  assert all(jax.tree.leaves(moved)), moved
  jax.tree.map(np.testing.assert_array_equal, new.model_state,
               {CONSTANTS: before[CONSTANTS]})


# fvcore on the official models at 224x224 (tests/golden/backbones/README.md).
OFFICIAL_GFLOPS = {"14": 4.800, "19": 8.503, "24": 13.692, "t_14": 6.106}
# configs/t2t_vit.py's table: (r, fused GFLOPs, unfused GFLOPs).
CONFIG_GFLOPS = {"7": (29, 0.794, 1.156), "10": (17, 1.054, 1.527), "12": (13, 1.236, 1.775),
                 "14": (10, 3.322, 4.800), "19": (7, 5.877, 8.503), "24": (5, 9.769, 13.692),
                 "t_14": (13, 4.193, 6.106), "t_19": (8, 6.810, 9.808),
                 "t_24": (6, 10.292, 14.998)}


def t2t_config(variant):
  return importlib.import_module("configs.t2t_vit").get_config(variant)


@pytest.mark.parametrize("variant", OFFICIAL_GFLOPS)
def test_flops_of_the_official_variants(variant):
  """fvcore's count of the official T2T-ViT-14/19/24 and T2T-ViT_t-14, to the 3 decimals
  given: the unfolds count nothing, the Performer's einsums their multiply-adds."""
  report = cost.count_flops(t2t_config(variant), r=0)
  assert round(report.gflops, 3) == OFFICIAL_GFLOPS[variant]


def test_flops_of_the_mctf_configs():
  """configs/t2t_vit_14.py: r=10 on blocks 1..13, 3.322 GFLOPs (30.8% under 4.800; the
  paper: at least 31% faster); every variant of configs/t2t_vit.py as its table says."""
  config = importlib.import_module("configs.t2t_vit_14").get_config()
  fused, plain = cost.count_flops(config), cost.count_flops(config, r=0)
  assert config.fusion.r == 10 and tuple(config.fusion.layers) == tuple(range(1, 14))
  assert round(fused.gflops, 3) == 3.322 and round(plain.gflops, 3) == 4.800
  assert fused.total / plain.total == pytest.approx(0.692, abs=5e-4)
  assert mctf_jax.create_model(config).config.attn_scale == 384 ** -0.5
  for variant, (r, gflops, base) in CONFIG_GFLOPS.items():
    config = t2t_config(variant)
    assert config.fusion.r == r
    assert round(cost.count_flops(config).gflops, 3) == gflops, variant
    assert round(cost.count_flops(config, r=0).gflops, 3) == base, variant


def test_flops_of_the_transformer_module_against_the_traced_program():
  """(The contract test traces the Performer's TINY; this the transformer T2T module.)"""
  config = {"model": dict(T2TViT.TINY, arch="t2t_vit", tokens_type="transformer"),
            "fusion": dict(r=4, layers=(1, 2), merge_impl="scatter")}
  model = mctf_jax.create_model(config)
  for r in (None, 0):
    report = cost.count_flops(config, r=r, implementation="mctf_jax")
    assert flops.traced_matmul_flops(model, 2, r) == 2 * report.matmul


# ----------------------------------------------------------------------------- checkpoints


def save_like_torch(path, obj):
  """torch.save's zip format without torch (tests/torch_files.py)."""
  torch_files.write_torch_file(path, obj)


def timm_checkpoint(path, state, ema=None):
  """A checkpoint as timm's train.py saves it (the released T2T-ViT ones)."""
  torch_files.timm_checkpoint(path, {k: np.asarray(v, np.float32) for k, v in state.items()},
                              None if ema is None else
                              {k: np.asarray(v, np.float32) for k, v in ema.items()},
                              arch="t2t_vit_14", metric=81.5)


def test_timm_pth_tar_checkpoints(tmp_path):
  """'.pth.tar' (os.path.splitext says '.tar') through every reader: its 'state_dict', or
  with ema its 'state_dict_ema'; the same variables as the state dict itself."""
  meta, _, state = golden("t2t_tiny_performer")
  config = case_config(meta)
  path = str(tmp_path / "81.5_T2T_ViT_14.pth.tar")
  timm_checkpoint(path, state, ema={k: v * 0.5 for k, v in state.items()})
  assert convert.file_extension(path) == ".pth.tar"
  want = convert.torch_to_variables(state, config)
  for got in (convert.file_to_variables(path, config),
              checkpoint.load_variables(path, config)):
    jax.tree.map(np.testing.assert_array_equal, got, want)
  ema = convert.file_to_variables(path, config, ema=True)
  np.testing.assert_allclose(ema[CONSTANTS]["pos_embed"], want[CONSTANTS]["pos_embed"] * 0.5,
                             rtol=1e-6)
  # Another image size: pos_embed resized (bicubic) as the official transfer code does.
  config96 = case_config(meta, img_size=96)
  resized = convert.file_to_variables(path, config96)[CONSTANTS]["pos_embed"]
  np.testing.assert_allclose(resized, convert.resize_pos_embed(state["pos_embed"], 37),
                             rtol=1e-6)


def one_line_error(fn, *args, match, **kwargs):
  with pytest.raises(CheckpointError, match=match) as err:
    fn(*args, **kwargs)
  assert "\n" not in str(err.value), str(err.value)
  return str(err.value)


def test_checkpoints_of_other_models_are_one_line_errors(tmp_path):
  meta, _, state = golden("t2t_tiny_performer")
  config = case_config(meta)
  # DeiT's (a tiny official-style checkpoint), under timm's file name.
  deit = tmp_path / "deit.pth.tar"
  deit.write_bytes(open(os.path.join(ROOT, "tests", "data", "tiny_deit.pth"), "rb").read())
  one_line_error(convert.file_to_variables, str(deit), config,
                 match=r"deit.pth.tar is not a T2T-ViT checkpoint: none of its \d+ arrays "
                       r"\(blocks.0.attn.proj.bias, .*\) is a weight of the Tokens-to-Token")
  # The transformer T2T module's weights for the Performer config.
  _, _, transformer = golden("t2t_tiny_transformer")
  one_line_error(convert.torch_to_variables, transformer, config, source="t2t_t.pth",
                 match=r"t2t_t.pth is a T2T-ViT with the transformer Tokens-to-Token module "
                       r"\(tokens_to_token.attention1.attn.qkv.weight\), the config's is "
                       r"'performer': set model.tokens_type='transformer'")
  # Another size.
  message = one_line_error(convert.torch_to_variables, state, case_config(meta, depth=4),
                           match=r"checkpoint is a T2T-ViT of embed_dim 64, depth 3, "
                                 r"token_dim 16; the config differs in model.depth=4")
  assert "configs/t2t_vit.py:14" in message
  # A .pth.tar whose dict holds no weights at all (e.g. a run's metadata only).
  empty = str(tmp_path / "last.pth.tar")
  save_like_torch(empty, {"epoch": 3, "arch": "t2t_vit_14", "metric": 81.5})
  one_line_error(convert.file_to_variables, empty, config,
                 match=r"last.pth.tar holds no weights: no tensor under its keys \(arch, epoch, "
                       r"metric\)")


def test_bad_config_values_are_one_line_errors():
  with pytest.raises(ConfigError, match=r"^model.img_size=200 is not divisible by 16: "
                     r"T2T-ViT's soft splits \(strides 4, 2, 2\) need img_size % 16 == 0"):
    T2TViTConfig(img_size=200)
  with pytest.raises(ConfigError, match="model.tokens_type must be one of"):
    T2TViTConfig(tokens_type="convolution")
  with pytest.raises(ConfigError, match=r"model.qk_scale must be a number > 0, None, "
                     r"'head_dim' .* got 'width'"):
    T2TViTConfig(qk_scale="width")
  assert T2TViTConfig(qk_scale="0.125").attn_scale == 0.125   # a command-line override
  assert T2TViTConfig().attn_scale == 64 ** -0.5              # the official default
  assert T2TViTConfig(qk_scale="embed_dim").attn_scale == 384 ** -0.5
