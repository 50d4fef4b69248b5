"""LV-ViT (arch 'lvvit'): parity with the official code (tests/golden/backbones), its
FLOPs, the token-labeling head with fusion, the stem's BatchNorm in training, and its
checkpoints (timm's .pth.tar, written here in torch.save's zip format without torch).
The contract every backbone meets: tests/test_backbones.py."""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

import mctf_jax
from mctf_jax import checkpoint, convert, parallel
from mctf_jax.models.lvvit import LVViT
from mctf_jax import cost
from mctf_jax.training import optim
from mctf_jax.training.train_step import TrainState, make_train_step
from torch_files import write_torch_file
from conftest import ROOT, init_variables, launch_env, load_golden, run

GOLDEN = os.path.join("backbones", "lvvit_tiny")


@pytest.fixture(scope="module")
def golden():
  meta, data = load_golden(GOLDEN)
  state = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
  return meta, data, state


def golden_config(meta, dtype="float32", **fusion):
  """The official constructor's arguments as our config (p_emb '4_2': 64 stem channels)."""
  kw = meta["official_constructor_kwargs"]
  assert kw["p_emb"] == "4_2" and kw["return_dense"]
  model = dict(arch="lvvit", dtype=dtype, param_dtype=dtype, stem_channels=64,
               **{k: kw[k] for k in ("img_size", "patch_size", "embed_dim", "depth",
                                     "num_heads", "mlp_ratio", "num_classes", "skip_lam")})
  return {"model": model, "fusion": dict(dict(r=0, layers=()), **fusion)}


def tiny_config(**changes):
  """LV-ViT's TINY size (17 tokens), blocks 1 and 2 fusing."""
  fusion = dict(r=4, layers=(1, 2), trace_source=True, pooling="attn")
  fusion.update(changes)
  return {"model": dict(LVViT.TINY, arch="lvvit"), "fusion": fusion}


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("precision", ["f64", "f32"])
def test_matches_the_official_model(golden, precision, x64):
  """Weights through our converter, fusion off, evaluation: every output of the official
  LV_ViT (return_dense=True, eval mode) within 1e-9 in float64, 1e-4 in float32."""
  meta, data, state = golden
  dtype = {"f64": "float64", "f32": "float32"}[precision]
  config = golden_config(meta, dtype)
  variables = convert.torch_to_variables(state, config)
  assert set(variables) == {"params", "batch_stats"}
  model = mctf_jax.create_model(config)
  images = np.asarray(data["images"].transpose(0, 2, 3, 1), dtype)

  def outputs(v, x):
    out = model.apply(v, x, method=model.encode)
    return {"tokens": out.tokens_BxTxC,
            "cls_logits": model.apply(v, out.tokens_BxTxC, out.size_BxT,
                                      method=model.train_logits),
            "aux_logits": model.apply(v, x, method=model.dense_aux_logits),
            "logits": model.apply(v, x)}
  got = jax.jit(outputs)(variables, images)
  atol = 1e-9 if precision == "f64" else 1e-4
  for name, value in got.items():
    want = data[f"{precision}/{name}"]
    assert value.shape == want.shape and value.dtype == want.dtype, name
    np.testing.assert_allclose(value, want, rtol=0, atol=atol, err_msg=name)


# ----------------------------------------------------------------------------- FLOPs


def test_flops_of_the_official_models():
  """fvcore on the official models at 224 px (tests/golden/backbones/README.md): the stem's
  convolutions and BatchNorms, the blocks, and both heads (aux_head on every patch)."""
  from mctf_jax import recipes
  for size, want in (("tiny", 2.879), ("small", 6.569), ("medium", 12.704)):
    config = {"model": recipes.lvvit_model(size)}
    assert round(cost.count_flops(config, r=0).gflops, 3) == want, size


def test_mctf_lvvit_s_flops():
  """configs/lvvit_s.py: r on blocks 1..15 (as DeiT's blocks 1..11), at the paper's three
  r. With aux_head on the tokens left (what our evaluation and the official one execute)
  r=12 and 16 round to the paper's 4.2 and 3.6 and r=8 to 5.0 (paper 4.9); the paper's
  three numbers are exactly those without the aux_head term."""
  from configs import lvvit_s
  config = lvvit_s.get_config()
  assert config.fusion.layers == tuple(range(1, 16))
  for r, want, paper in ((8, 4.956, 4.9), (12, 4.165, 4.2), (16, 3.582, 3.6)):
    report = cost.count_flops(config, r=r)
    assert round(report.gflops, 3) == want, r
    aux = (report.schedule.tokens_out - 1) * 384 * 1000
    assert round((report.total - aux) / 1e9, 1) == paper, r
  assert round(cost.count_flops(config, r=0).gflops, 1) == 6.6


# ----------------------------------------------------------------------------- heads


def _tiny(**changes):
  model = mctf_jax.create_model(tiny_config(**changes))
  variables = init_variables(model)
  images = jax.random.normal(jax.random.key(1), (2,) + model.config.image_shape)
  return model, variables, images


def test_the_max_skips_padding_and_counts_a_fused_token_once():
  model, variables, _ = _tiny()
  tokens = jax.random.normal(jax.random.key(2), (2, 7, model.config.embed_dim))
  size = jnp.asarray([[1, 3, 2, 5, 0, 0, 6], [1, 1, 9, 0, 0, 0, 6]], jnp.float32)
  # Padding rows that would win the max, were they counted.
  tokens = tokens.at[:, 4:6].set(100.0)
  classify = jax.jit(lambda v, t, s: model.apply(v, t, s, method=model.classify))
  got = classify(variables, tokens, size)
  real = [[0, 1, 2, 3, 6], [0, 1, 2, 6]]
  for b in range(2):
    one = classify(variables, tokens[b:b + 1, jnp.asarray(real[b])],
                   jnp.ones((1, len(real[b]))))   # the real tokens alone, sizes irrelevant
    np.testing.assert_allclose(got[b:b + 1], one, rtol=1e-6, atol=1e-6)
  head = variables["params"]["head"]
  aux = variables["params"]["aux_head"]
  cls = tokens[:, 0] @ head["kernel"] + head["bias"]
  aux_logits = tokens[0, jnp.asarray(real[0][1:])] @ aux["kernel"] + aux["bias"]
  np.testing.assert_allclose(got[0], cls[0] + 0.5 * aux_logits.max(0), rtol=1e-5, atol=1e-5)
  train = jax.jit(lambda v, t, s: model.apply(v, t, s, method=model.train_logits))
  np.testing.assert_allclose(train(variables, tokens, size), cls, rtol=1e-5, atol=1e-5)


def test_dense_aux_logits_follow_the_token_map():
  model, variables, images = _tiny()

  def run(v, x, r):
    out = model.apply(v, x, r=r, trace_source=True, method=model.encode)
    dense = model.apply(v, x, r=r, method=model.dense_aux_logits)
    aux = model.apply(v, out.tokens_BxTxC, method=lambda m, t: m.aux_head(t))
    logits = model.apply(v, out.tokens_BxTxC, out.size_BxT, method=model.classify)
    cls = model.apply(v, out.tokens_BxTxC, out.size_BxT, method=model.train_logits)
    return out, dense, aux, logits, cls
  run = jax.jit(run, static_argnums=2)
  out, dense, aux, logits, cls = run(variables, images, 0)
  assert dense.shape == (2, 16, 10)
  np.testing.assert_array_equal(dense, aux[:, 1:])     # no fusion: aux_head of the patches
  out, dense, aux, logits, cls = run(variables, images, None)
  assert out.tokens_BxTxC.shape[1] < 17 and np.asarray(out.size_BxT).max() > 1
  source = np.asarray(out.source_BxTxN)                # (B, T, N): token t holds patch n
  for b in range(2):
    for t in range(1, source.shape[1]):
      held = np.flatnonzero(source[b, t])[None] - 1    # patch indices (N counts the cls)
      assert held.size >= 1
      np.testing.assert_array_equal(dense[b, held[0]], np.broadcast_to(aux[b, t],
                                                                       (held.size, 10)))
  # The evaluation's max over tokens is the max over the patches' logits.
  np.testing.assert_allclose(logits, cls + 0.5 * dense.max(1), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- training


def _recipe():
  return ConfigDict(dict(ema_decay=0.0, seed=0, batch_size=8, loss=dict(
      label_smoothing=0.1, consistency_threshold=0.0, weight_student=1.0,
      weight_teacher=1.0, weight_consistency=3.0)))


def _batch(model, n=8):
  rng = np.random.default_rng(0)
  return {"image": rng.standard_normal((n,) + model.config.image_shape).astype(np.float32),
          "label": np.arange(n, dtype=np.int32) % 10}


def test_frozen_batch_norm_and_the_class_token_loss():
  """The default (train_batch_norm False): training normalises with the running
  statistics and leaves them as loaded; the loss reads head(cls) only, so aux_head gets
  no gradient, and AdamW (no weight decay on EVAL_ONLY) leaves it unchanged."""
  config = tiny_config(teacher_r_max=2)
  config["model"]["train_batch_norm"] = False
  model = mctf_jax.create_model(config)
  variables = init_variables(model)
  params = variables["params"]
  state = {"batch_stats": jax.tree.map(lambda x: x + 0.5, variables["batch_stats"])}
  batch = _batch(model)
  # Training's embedding equals the evaluation's (no batch statistics).
  embed = jax.jit(lambda v, x, d: model.apply(v, x, d, method=model.embed), static_argnums=2)
  np.testing.assert_array_equal(embed({"params": params, **state}, batch["image"], False),
                                embed({"params": params, **state}, batch["image"], True))
  # __call__ in training: the class token's logits.
  out = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)},
                                         method=model.encode))({"params": params, **state},
                                                               batch["image"])
  train = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                           rngs={"dropout": jax.random.key(0)}))
  cls = jax.jit(lambda v, t: model.apply(v, t, method=model.train_logits))
  np.testing.assert_allclose(train({"params": params, **state}, batch["image"]),
                             cls({"params": params, **state}, out.tokens_BxTxC), atol=1e-6)

  run = _recipe()
  run.update(dict(base_lr=1e-2, min_lr=1e-3, warmup_epochs=0, warmup_lr=0.0, num_epochs=2,
                  weight_decay=0.5, grad_clip=0.0, model=config["model"]))
  tx = optim.make_optimizer(run, steps_per_epoch=1)
  step = jax.jit(make_train_step(model, tx, run))
  new, metrics = step(TrainState(jnp.asarray(0, jnp.int32), params, tx.init(params), None,
                                 state), batch)
  assert bool(metrics["finite"])
  jax.tree.map(np.testing.assert_array_equal, new.model_state, state)
  jax.tree.map(np.testing.assert_array_equal, new.params["aux_head"], params["aux_head"])
  assert np.any(np.asarray(new.params["head"]["kernel"]) != params["head"]["kernel"])
  assert np.any(np.asarray(new.params["patch_embed"]["bn1"]["scale"])
                != params["patch_embed"]["bn1"]["scale"])


def _mesh_step(config, mesh, batch):
  model = mctf_jax.create_model(config)
  variables = init_variables(model)
  tx = optax.sgd(0.1)
  state = TrainState(jnp.asarray(0, jnp.int32), variables["params"],
                     tx.init(variables["params"]), None,
                     {"batch_stats": variables["batch_stats"]})
  state = jax.device_put(state, parallel.tree_shardings(mesh, state))
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  step = jax.jit(make_train_step(model, tx, _recipe()),
                 in_shardings=(state_sh, parallel.batch_sharding(mesh)),
                 out_shardings=(state_sh, parallel.replicated(mesh)))
  return jax.device_get(step(state, parallel.global_batch(batch, mesh)))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_train_step_with_batch_norm_state_on_eight_devices():
  """train_batch_norm on a data x fsdp mesh: the statistics are the global batch's, so
  the updated state and parameters are one device's."""
  config = tiny_config(teacher_r_max=0)
  model = mctf_jax.create_model(config)
  batch = _batch(model)
  one, m1 = _mesh_step(config, parallel.create_mesh(1, jax.devices()[:1]), batch)
  mesh = parallel.create_mesh(2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  eight, m8 = _mesh_step(config, mesh, batch)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree.map(close, one.model_state, eight.model_state)
  jax.tree.map(close, one.params, eight.params)
  bn1 = one.model_state["batch_stats"]["patch_embed"]["bn1"]
  assert np.any(np.asarray(bn1["var"]) != 1.0)   # updated from the initial statistics


# ----------------------------------------------------------------------------- bad input


def test_bad_sizes_are_one_line_config_errors():
  for changes, needle in ((dict(patch_size=15), "model.patch_size=15 is odd"),
                          (dict(img_size=200), "model.img_size=200 is not a multiple of "
                                               "model.patch_size=16"),
                          (dict(stem_channels=0), "model.stem_channels"),
                          (dict(skip_lam=0), "model.skip_lam")):
    with pytest.raises(mctf_jax.ConfigError, match=needle) as err:
      mctf_jax.create_model({"model": dict(arch="lvvit", **changes)})
    assert "\n" not in str(err.value)


def _timm_checkpoint(state):
  """What timm's CheckpointSaver writes (LV-ViT's training script): the weights under
  'state_dict' and the EMA's under 'state_dict_ema', with the run's bookkeeping."""
  weights = collections.OrderedDict((k, np.asarray(v, np.float32)) for k, v in state.items())
  weights["patch_embed.bn1.num_batches_tracked"] = np.asarray(1000, np.int64)
  ema = collections.OrderedDict((k, v * 0.5 if v.dtype == np.float32 else v)
                                for k, v in weights.items())
  return {"epoch": 299, "arch": "lvvit_s", "state_dict": weights, "optimizer": {"state": {}},
          "version": 2, "metric": 83.3, "state_dict_ema": ema}


def test_pth_tar_through_the_cli(golden, tmp_path):
  """``python -m mctf_jax.convert --torch=X.pth.tar``: a timm-style file (written here as
  torch.save writes it), the weights or with --ema the EMA's, BatchNorm statistics
  included, into an Orbax checkpoint that loads back exactly."""
  meta, _, state = golden
  path = tmp_path / "lvvit_tiny-26M-64-83.3.pth.tar"
  write_torch_file(path, _timm_checkpoint(state))
  assert convert.file_extension(str(path)) == ".pth.tar"
  config_file = tmp_path / "lvvit_golden.py"
  model = golden_config(meta)["model"]
  config_file.write_text(f"import ml_collections\n\ndef get_config():\n  return "
                         f"ml_collections.ConfigDict({{'model': {model!r}}})\n")
  env = launch_env()
  for ema in (False, True):
    out = tmp_path / f"converted_{ema}"
    done = run(["-m", "mctf_jax.convert", f"--config={config_file}", f"--torch={path}",
                f"--out={out}"] + (["--ema"] if ema else []), env, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = checkpoint.load_variables(str(out), {"model": model})
    want = convert.torch_to_variables(state, {"model": model})
    scale = 0.5 if ema else 1.0
    for k in ("params", "batch_stats"):
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.float32(b) * np.float32(
          scale)), loaded[k], want[k])
  # Straight from the file too (train.py's --config.init.checkpoint, eval.py's --checkpoint).
  direct = checkpoint.load_variables(str(path), {"model": model})
  jax.tree.map(np.testing.assert_array_equal, direct,
               convert.torch_to_variables(state, {"model": model}, dtype=np.float32))
  # Round trip: flax -> torch names -> flax, exactly.
  back = convert.flax_to_torch(direct["params"], {"model": model},
                               model_state={"batch_stats": direct["batch_stats"]})
  assert sorted(back) == sorted(k for k in state if not k.endswith("num_batches_tracked"))
  for k, v in back.items():
    np.testing.assert_array_equal(v, np.float32(state[k]), err_msg=k)


def test_other_checkpoints_are_one_line_errors(golden, tmp_path):
  meta, _, state = golden
  model = golden_config(meta)["model"]
  deit = os.path.join(ROOT, "tests", "data", "tiny_deit.pth")
  with pytest.raises(convert.CheckpointError, match=r"tiny_deit.pth is not an LV-ViT "
                     r"checkpoint: it has no convolutional stem") as err:
    checkpoint.load_variables(deit, {"model": model})
  assert "\n" not in str(err.value)
  no_aux = {k: v for k, v in state.items() if not k.startswith("aux_head")}
  write_torch_file(tmp_path / "no_aux.pth.tar", {"state_dict": no_aux})
  bookkeeping = {"epoch": 3, "arch": "lvvit_s", "optimizer": {"state": {}}}
  write_torch_file(tmp_path / "no_weights.pth.tar", bookkeeping)
  for name, needle in (("no_aux.pth.tar", "has no aux_head"),
                       ("no_weights.pth.tar", r"holds no weights: no tensor under its keys "
                                              r"\(arch, epoch, optimizer\)")):
    with pytest.raises(convert.CheckpointError, match=needle) as err:
      convert.file_to_variables(str(tmp_path / name), {"model": model})
    assert "\n" not in str(err.value) and name in str(err.value)
  with pytest.raises(convert.CheckpointError, match="no EMA weights") as err:
    convert.file_to_variables(str(tmp_path / "no_aux.pth.tar"), {"model": model}, ema=True)
  assert "\n" not in str(err.value)


def test_another_class_count(golden, caplog):
  """Fine-tuning for other classes: head initialised afresh, aux_head (which training does
  not train) set to zero, so that the evaluation logits are the class token's."""
  meta, _, state = golden
  config = golden_config(meta)
  config["model"]["num_classes"] = 5
  with caplog.at_level("WARNING"):
    variables = convert.torch_to_variables(state, config)
  assert "dropping the checkpoint's head (10 classes)" in caplog.text
  assert "dropping the checkpoint's aux_head (10 classes)" in caplog.text
  aux = variables["params"]["aux_head"]
  assert aux["kernel"].shape == (64, 5) and not np.any(aux["kernel"]) and not np.any(aux["bias"])
  assert np.any(variables["params"]["head"]["kernel"])
