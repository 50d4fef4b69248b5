"""The contract every backbone meets, run over every registered backbone and the toy
backbones of tests/toy_backbones.py (no class token and BatchNorm state; a distillation
token), at their TINY sizes. A new backbone gets all of it by being registered."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

import mctf_jax
from mctf_jax import checkpoint, convert, cost, models
from mctf_jax.fusion import padded
from mctf_jax.fusion.config import TOME_FIXED
from mctf_jax.tools import benchmark, flops
from mctf_jax.training.plan import teacher_plan
from mctf_jax.training.train_step import TrainState, make_train_step
from conftest import ROOT, digits_config, init_variables, run

TOYS = ("toy_backbones:DistilledViT", "toy_backbones:RegistersViT")
ARCHS = tuple(models.names()) + TOYS
# The toys stand for what no registered backbone's configs have: a distillation token (two
# protected tokens); LayerScale and register tokens (three). (Model state: LV-ViT's BatchNorm statistics, T2T-ViT's fixed tensors; no class
# token: big_vision's ViT pooled by average or attention.)
STATE = tuple(models.names())
TOKENS = tuple(models.names()) + TOYS
# Checks of the block and stack drivers on each backbone's own block class: big_vision's ViT
# uses DeiT's (layers.Block), so DeiT's runs stand for it.
OWN_BLOCKS = tuple(a for a in models.names() if a != "vit")
# train.py and eval.py end to end: the backbones whose runs differ in what goes through the
# entry points (DeiT's shared run; LV-ViT's BatchNorm state and two kinds of logits; T2T-ViT's
# fixed tensors). big_vision's ViT: tests/test_big_vision.py runs eval.py on its .npz.
END_TO_END = ("deit", "lvvit", "t2t_vit")


def config_of(arch, dtype="float32", **fusion):
  """The backbone's TINY size, blocks 1 and 2 fusing."""
  settings = dict(r=6, layers=(1, 2), trace_source=True, teacher_r_max=3, pooling="attn")
  settings.update(fusion)
  return {"model": dict(models.get(arch).TINY, arch=arch, dtype=dtype, param_dtype=dtype),
          "fusion": settings}


def _setup(arch, dtype="float32", batch=2, **fusion):
  model = mctf_jax.create_model(config_of(arch, dtype, **fusion))
  variables = init_variables(model)
  images = jax.random.normal(jax.random.key(1), (batch,) + model.config.image_shape,
                             jnp.dtype(dtype))
  return model, variables, images


def test_the_backbones_have_what_the_contract_covers():
  assert [models.get(a).config_class(**models.get(a).TINY).num_protected
          for a in TOYS] == [2, 3]
  assert models.get("vit").config_class().num_protected == 0   # pool_type 'gap'
  for arch, collections in (("lvvit", {"params", "batch_stats"}),
                            ("t2t_vit", {"params", "constants"})):
    model = mctf_jax.create_model(config_of(arch))
    assert set(jax.eval_shape(model.init, jax.random.key(0), model.dummy_images())) == \
        collections


@pytest.mark.parametrize("arch", ARCHS)
def test_fusion_adds_no_variable(arch):
  """A fused model's variables are its unfused model's (what the tests' shared
  ``init_variables`` relies on): the same tree, the same values."""
  model = mctf_jax.create_model(config_of(arch))
  fused = jax.jit(model.init)(jax.random.key(0), model.dummy_images())
  shared = init_variables(model)
  assert jax.tree.structure(shared) == jax.tree.structure(fused)
  jax.tree.map(np.testing.assert_array_equal, shared, fused)


@pytest.mark.parametrize("arch", TOKENS)
def test_schedule_and_the_tokens_it_promises(arch):
  model, variables, images = _setup(arch)
  cfg, schedule = model.config, model.schedule()
  assert schedule.tokens_in == cfg.num_tokens and schedule.num_protected == cfg.num_protected
  for plan in schedule.layers:
    assert plan.tokens_out == plan.tokens_in - plan.r and plan.r == plan.r_ab + plan.r_ba
  assert schedule.fuses
  out = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(variables, images)
  size, source = np.asarray(out.size_BxT), np.asarray(out.source_BxTxN)
  assert out.tokens_BxTxC.shape[:2] == (2, schedule.tokens_out)
  np.testing.assert_array_equal(size.sum(-1), cfg.num_tokens)
  np.testing.assert_array_equal(source.sum(1), 1)                  # each initial token once
  np.testing.assert_array_equal(source.sum(-1), size)
  p = cfg.num_protected
  np.testing.assert_array_equal(size[:, :p], 1)                    # protected: alone, first
  np.testing.assert_array_equal(source[:, :p, :p], np.broadcast_to(np.eye(p), (2, p, p)))
  assert [layer for layer, _ in out.layer_token_maps] == [p.layer for p in schedule.layers
                                                           if p.fuses]


@pytest.mark.parametrize("arch", OWN_BLOCKS)
def test_jit_vmap_grad(arch):
  """(The training path's gradients: test_train_step_updates_parameters_and_state.)"""
  model, variables, images = _setup(arch, batch=4)
  fwd = jax.jit(lambda v, x: model.apply(v, x))
  logits = fwd(variables, images)
  assert logits.shape == (4, model.config.num_classes)
  batched = jax.vmap(fwd, in_axes=(None, 0))(variables, images.reshape((2, 2) + images.shape[1:]))
  np.testing.assert_allclose(batched.reshape(4, -1), logits, rtol=2e-5, atol=2e-5)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  grads = jax.jit(jax.grad(lambda p: jnp.sum(fwd({"params": p, **state}, images) ** 2)))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # The fused blocks' queries and keys learn through the (merged) attention.
  assert np.any(np.asarray(grads["blocks_2"]["attn"]["qkv"]["kernel"]) != 0)


# The padded path (the train step's) supports every one-step-ahead mode, the averaging
# poolings and ToMe; its real tokens must be the exact path's. Each pooling merges the
# attention map its own way in 'approx'; 'off' and 'precise' only pool the tokens. The
# driver is the same for every backbone: DeiT runs every mode, the others (which differ in
# their protected tokens, embedding and head) the recipe's and ToMe.
MODES = (("approx", "size"), ("approx", "attn"), ("approx", "mean"), ("off", "attn"),
         ("precise", "attn"), ("tome", "size"))
PADDED_CASES = [(arch, mode, pooling) for arch in TOKENS for mode, pooling in MODES
                if arch == "deit" or (mode, pooling) in (("approx", "attn"), ("tome", "size"))]


@pytest.mark.parametrize("arch,mode,pooling", PADDED_CASES)
def test_padded_equals_exact(arch, mode, pooling, x64):
  fusion = (dict(method="tome", **TOME_FIXED) if mode == "tome"
            else dict(one_step_ahead=mode, pooling=pooling))
  model, variables, images = _setup(arch, "float64", prop_attn=pooling != "mean",
                                    trace_source=False, **fusion)
  schedule = model.schedule()
  step = 5 if pooling == "size" else None   # one grid of widths, else the full width
  layout = padded.layout_of(schedule, padded.token_grid(model.config.num_tokens, step))

  def both(v, x):
    exact = model.apply(v, x, method=model.encode)
    h = model.apply(v, x, method=model.embed)
    pad = model.apply(v, h, layout, padded.splits_of(schedule),
                      max_moved=padded.max_moved([schedule]), method=model.run_blocks_padded)
    logits = [model.apply(v, o.tokens_BxTxC, o.size_BxT, method=model.classify)
              for o in (exact, pad)]
    return exact, pad, logits
  exact, pad, (want, got) = jax.jit(both)(variables, images)
  out = schedule.tokens_out
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  np.testing.assert_array_equal(np.asarray(pad.size_BxT)[:, :out], exact.size_BxT)
  np.testing.assert_array_equal(np.asarray(pad.size_BxT)[:, out:], 0)
  np.testing.assert_allclose(np.asarray(pad.tokens_BxTxC)[:, :out], exact.tokens_BxTxC,
                             rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", OWN_BLOCKS)
def test_scanned_blocks_equal_unrolled(arch, x64):
  """The padded teacher's alike blocks as one lax.scan, built from the backbone's own
  block: the same tokens and gradients, stochastic depth included."""
  config = config_of(arch, "float64")
  config["model"]["drop_path_rate"] = 0.5
  model = mctf_jax.create_model(config)
  variables = init_variables(model)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  schedule = model.schedule()
  layout = padded.layout_of(schedule, padded.token_grid(model.config.num_tokens, None))
  assert padded.alike_runs(layout, 1) == [(1, 3)]
  x = jax.random.normal(jax.random.key(1), (4, model.config.num_tokens, model.config.embed_dim),
                        jnp.float64)

  def run_blocks(p, scan):
    out = model.apply({"params": p, **state}, x, layout, padded.splits_of(schedule),
                      max_moved=6, start=1, scan=scan, deterministic=False,
                      method=model.run_blocks_padded, rngs={"dropout": jax.random.key(2)})
    return jnp.sum(out.tokens_BxTxC ** 2), out.tokens_BxTxC

  def both(p):
    return [jax.value_and_grad(lambda q: run_blocks(q, s), has_aux=True)(p)
            for s in (True, False)]
  ((_, scanned), g_scanned), ((_, unrolled), g_unrolled) = jax.jit(both)(params)
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-12, atol=1e-12)
  for a, b in zip(jax.tree.leaves(g_scanned), jax.tree.leaves(g_unrolled)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_converter_round_trip(arch):
  model, variables, _ = _setup(arch)
  config = config_of(arch)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  torch_state = convert.flax_to_torch(params, config, model_state=state)
  assert {k: v.shape for k, v in torch_state.items()} == convert.expected_shapes(config)
  back = convert.torch_to_variables(torch_state, config)
  assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(np.asarray, variables))
  jax.tree.map(np.testing.assert_array_equal, back, variables)


@pytest.mark.parametrize("arch", models.names())
def test_flops_against_the_traced_program_and_xla(arch):
  """The FLOP counter's matrix products are exactly the traced program's; XLA counts 2 per
  multiply-add plus elementwise work (see mctf_jax.tools.flops)."""
  config = config_of(arch, merge_impl="scatter", trace_source=False)
  model = mctf_jax.create_model(config)
  for r in (None, 0):
    traced = flops.traced_matmul_flops(model, 2, r)
    report = cost.count_flops(config, r=r, implementation="mctf_jax")
    assert traced == 2 * report.matmul
    xla = flops.xla_cost(model, 2, r)["flops"]
    # Elementwise work weighs more at these tiny widths (16-32) than at DeiT-S's (3%).
    assert 2 * traced <= xla <= 2 * 2 * traced, (r, xla / (2 * traced))


@pytest.mark.parametrize("arch", [a for a in STATE if a != "deit"])
def test_train_step_updates_parameters_and_state(arch):
  """The train step through the backbone protocol: finite losses, every parameter trained
  (but those only the evaluation reads, ``EVAL_ONLY``, left as they were), the model's
  state (BatchNorm statistics) updated by the embedding, its fixed tensors (T2T-ViT's) not.
  (DeiT's train step: tests/test_train_step.py.)"""
  config = config_of(arch)
  model = mctf_jax.create_model(config)
  variables = init_variables(model)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}

  recipe = ConfigDict(dict(ema_decay=0.5, seed=0, batch_size=8, loss=dict(
      label_smoothing=0.1, consistency_threshold=0.0, weight_student=1.0, weight_teacher=1.0,
      weight_consistency=3.0)))
  # Adam moves every parameter that has a gradient by about the learning rate, however
  # small the gradient (T2T-ViT's LayerNorm scales inside its T2T module get ~1e-9 here,
  # which an SGD step leaves below float32's resolution at 1.0).
  tx = optax.adam(0.1)
  plan = teacher_plan(model, 8)
  step = jax.jit(make_train_step(model, tx, recipe, plan=plan))
  batch = {"image": np.random.default_rng(0).standard_normal(
               (8,) + model.config.image_shape).astype(np.float32),
           "label": np.arange(8, dtype=np.int32) % 10}
  new, metrics = step(TrainState(jnp.asarray(1, jnp.int32), params, tx.init(params),
                                 jax.tree.map(jnp.copy, params), state), batch)
  assert bool(metrics["finite"]) and float(metrics["loss_consistency"]) >= 0
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         new.params, params)
  eval_only = models.get(arch).EVAL_ONLY
  assert all(jax.tree.leaves({k: v for k, v in changed.items() if k not in eval_only})), changed
  assert not any(jax.tree.leaves({k: changed[k] for k in eval_only})), changed
  assert jax.tree.structure(new.model_state) == jax.tree.structure(state)
  # Statistics (BatchNorm's) move; fixed tensors (T2T-ViT's 'constants') do not.
  changed = {k: any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                                 new.model_state[k], state[k])))
             for k in state}
  assert changed == {k: k == "batch_stats" for k in state}, changed


def test_model_state_goes_through_checkpoints(tmp_path):
  """The model's state is saved and restored with the train state, and by save_params."""
  arch = "lvvit"
  config = config_of(arch)
  model = mctf_jax.create_model(config)
  variables = init_variables(model)
  state = jax.tree.map(lambda x: x + 1.5, {k: v for k, v in variables.items()
                                           if k != "params"})
  params = variables["params"]
  path = checkpoint.save_params(str(tmp_path / "converted"), params, config, model_state=state)
  loaded = checkpoint.load_variables(path, config)
  jax.tree.map(np.testing.assert_array_equal, loaded, {"params": params, **state})

  recipe = ConfigDict(dict(keep_checkpoints=2, ema_decay=0.0))
  manager = checkpoint.train_manager(str(tmp_path / "run"), recipe, model_state=True)
  tx = optax.sgd(0.1)
  train_state = TrainState(jnp.asarray(3, jnp.int32), params, tx.init(params), None, state)
  checkpoint.save_train_state(manager, train_state, 0.5)
  manager.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), train_state)
  restored = checkpoint.restore_train_state(manager, abstract, 3)
  manager.close()
  jax.tree.map(np.testing.assert_array_equal, restored.model_state, state)
  jax.tree.map(np.testing.assert_array_equal, restored.params, params)


@pytest.mark.parametrize("arch", END_TO_END)
def test_train_py_and_eval_py_end_to_end(arch, trained, tmp_path, env):
  """A train.py run on the digits (DeiT's: the run tests/test_entry_points.py shares), then
  eval.py on it: the table, results.json and results.csv."""
  arch = None if arch == "deit" else arch
  workdir, out = trained(arch)
  assert "done:" in out
  relative = os.path.relpath(workdir, ROOT)   # as `make demo` passes it
  # DeiT (the README's path) with throughput; the others without.
  r_values, throughput = ((0, 8), 16) if arch is None else ((0, 8), 0)
  done = run(["eval.py", digits_config(arch), f"--checkpoint={relative}",
              f"--output_dir={tmp_path}", f"--config.eval.r_values={r_values}",
              f"--throughput_batch={throughput}"], env)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "oneDNN" not in done.stderr and "Unable to initialize backend" not in done.stderr
  result = json.loads((tmp_path / "results.json").read_text())
  assert [row["r"] for row in result["results"]] == list(r_values)
  for row in result["results"]:
    assert row["images"] == 360 and 0 <= row["top1"] <= row["top5"] <= 100
    assert (row["img_per_s"] > 0) if throughput else row["img_per_s"] is None
  gflops = [row["gflops"] for row in result["results"]]
  assert gflops == sorted(gflops, reverse=True) and gflops[0] > gflops[-1]
  assert (tmp_path / "results.csv").read_text().splitlines()[0] == \
      "r,tokens_out,gflops,img_per_s,top1,top5,images"
  assert "GFLOPs" in done.stdout and "top-1" in done.stdout


@pytest.mark.parametrize("arch", tuple(models.names()))
def test_steps_free_forward_runs_on_every_backbone(arch):
  """The benchmarks' limit (blocks at the fused widths, no fusion step) runs on every
  backbone, in both forms: at r=0 it is the plain forward; fused, finite logits of the
  right shape."""
  model, variables, images = _setup(arch)
  plain = model.with_fusion(r=0)
  want = jax.jit(plain.apply)(variables, images)
  for slice_probs in (False, True):
    got = jax.jit(benchmark.steps_free_forward(plain, slice_probs=slice_probs))(variables, images)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    fused = jax.jit(benchmark.steps_free_forward(model, slice_probs=slice_probs))(variables,
                                                                                 images)
    assert fused.shape == want.shape and bool(jnp.all(jnp.isfinite(fused)))
