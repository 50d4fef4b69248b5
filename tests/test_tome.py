"""ToMe itself (fusion.method='tome'): parity with facebookresearch/ToMe's outputs
(tests/golden/tome, see its README), its r forms, its FLOPs, gradients and training."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

import mctf_jax
from mctf_jax import convert
from mctf_jax.errors import ConfigError
from mctf_jax.fusion import FusionConfig
from mctf_jax.fusion.config import TOME_FIXED
from mctf_jax import cost
from mctf_jax.tools import flops
from mctf_jax.training.plan import teacher_plan
from mctf_jax.training.train_step import TrainState, make_train_step
from conftest import (assert_gradients_match_differences, golden_images, golden_state_dict,
                      init_variables, load_golden, run_timm_case, timm_model_config)

CASES = ("tome_tiny_r8", "tome_tiny_r6_decreasing", "tome_tiny_r8_no_prop")
PRECISIONS = {"f64": ("float64", 1e-9), "f32": ("float32", 1e-4)}


def tome_config(meta, dtype="float64", **fusion):
  """The JAX config of a golden case: timm's constructor arguments, ToMe's r as given
  (a count, or (r, inflection))."""
  kw = meta["timm_vision_transformer_kwargs"]
  r = meta["tome_r"]
  settings = dict(method="tome", layers=tuple(range(kw["depth"])), prop_attn=meta["prop_attn"],
                  trace_source=meta["trace_source"], teacher_r_max=0, **TOME_FIXED)
  settings.update(dict(r=r[0], inflection=r[1]) if isinstance(r, list) else dict(r=r))
  settings.update(fusion)
  return {"model": timm_model_config(meta, dtype), "fusion": settings}


def load_case(case):
  return load_golden(f"tome/{case}")


_run = run_timm_case


@pytest.mark.parametrize("prec", ["f64", "f32"])
@pytest.mark.parametrize("case", CASES)
def test_golden_logits_sizes_sources(case, prec, x64):
  meta, data = load_case(case)
  dtype, tol = PRECISIONS[prec]
  model, logits, out = _run(tome_config(meta, dtype), data, dtype)
  assert [p.r for p in model.schedule().layers] == meta["tome_r_per_block"]
  np.testing.assert_allclose(logits, data[f"{prec}/logits"], rtol=0, atol=tol)
  if prec == "f64":   # rounding, not a formula's difference
    np.testing.assert_allclose(logits, data["f64/logits"], rtol=0, atol=1e-13)
  np.testing.assert_array_equal(np.asarray(out.size_BxT), data[f"{prec}/size"])
  np.testing.assert_array_equal(np.asarray(out.source_BxTxN), data[f"{prec}/source"])


def test_golden_per_block_list_form(x64):
  """ToMe's list form: the decreasing case's counts given block by block (the last block,
  which removes none, left out as parse_r pads with zeros)."""
  meta, data = load_case("tome_tiny_r6_decreasing")
  counts = tuple(meta["tome_r_per_block"][:-1])
  _, logits, out = _run(tome_config(meta, r=counts, inflection=0.0), data, "float64")
  np.testing.assert_allclose(logits, data["f64/logits"], rtol=0, atol=1e-13)
  np.testing.assert_array_equal(np.asarray(out.size_BxT), data["f64/size"])


def test_the_mctf_tome_like_path_is_not_tome(x64):
  """The preset it replaces (MCTF's code path, similarity only) misses ToMe's outputs."""
  meta, data = load_case("tome_tiny_r8")
  config = tome_config(meta)
  config["fusion"] = FusionConfig.tome_like(r=8, layers=tuple(range(4)), trace_source=True)
  _, logits, _ = _run(config, data, "float64")
  assert np.abs(logits - data["f64/logits"]).max() > 1e-3


def _schedule(depth=4, tokens=65, **fusion):
  settings = dict(method="tome", layers=tuple(range(depth)), teacher_r_max=0, **TOME_FIXED)
  settings.update(fusion)
  model = mctf_jax.create_model({"model": dict(img_size=32, patch_size=4, embed_dim=64,
                                               depth=depth, num_heads=2, num_classes=10),
                                 "fusion": settings})
  assert model.config.num_tokens == tokens
  return model.schedule()


def test_r_forms():
  # A constant, capped at half of the unprotected tokens (no lower bound on the count).
  assert [p.r for p in _schedule(r=20).layers] == [20, 20, 12, 6]   # 65 45 25 13 7
  # (r, inflection): parse_r's linear schedule, e.g. (8, 0.5) over 4 blocks.
  assert [p.r for p in _schedule(r=8, inflection=0.5).layers] == [4, 6, 9, 12]
  # A per-block list; blocks beyond it remove none; a block not in layers may list 0.
  s = _schedule(r=(5, 0, 7), layers=(0, 2, 3))
  assert [p.r for p in s.layers] == [5, 0, 7, 0]
  assert s.tokens_per_layer == (65, 60, 60, 53, 53)
  # One-directional: every merge goes A -> B.
  assert all(p.r_ab == p.r and p.r_ba == 0 for p in s.layers)
  # The paper's MCTF can take per-block lists and the inflection too.
  mctf = mctf_jax.create_model({"model": dict(img_size=32, patch_size=4, embed_dim=64,
                                              depth=4, num_heads=2),
                                "fusion": dict(r=(0, 8, 4), layers=(1, 2))}).schedule()
  assert [p.r for p in mctf.layers] == [0, 8, 4, 0]


@pytest.mark.parametrize("fusion,message", [
    (dict(bidirectional=True), r"method='tome' merges as ToMe does.*'bidirectional': True"),
    (dict(pooling="attn", tau_info=20.0),
     r"must read .*got \{'tau_info': 20.0, 'pooling': 'attn'\}"),
    (dict(r=0.25), r"token counts \(ToMe's r\), not the ratio fusion.r=0.25"),
    (dict(r=(4, 4), layers=(0,)), r"removes tokens at block\(s\) \[1\], which fusion.layers"),
    (dict(r=(4, 0.5)), r"holds token counts .* not ratios such as 0.5"),
    (dict(r=(1, 1, 1, 1, 0)), r"lists 5 per-block counts \[1, 1, 1, 1, 0\] for a model of 4"),
    (dict(method="ToMe"),
     r"fusion.method must be one of \('mctf', 'tome', 'pitome'\), got 'ToMe'"),
])
def test_bad_settings(fusion, message):
  with pytest.raises(ConfigError, match=message):
    _schedule(**{"r": 8, **fusion})
  with pytest.raises(ConfigError, match=r"inflection=-1.0 makes a decreasing schedule from a "
                                        r"token count r; fusion.r=0.5"):
    FusionConfig(r=0.5, layers=(1,), inflection=-1.0)


def test_configs():
  tome = importlib.import_module("configs.tome").get_config()
  like = importlib.import_module("configs.tome_like").get_config()
  assert mctf_jax.config.fusion_config(tome).method == "tome"
  assert mctf_jax.config.fusion_config(like).method == "mctf"
  # ToMe's DeiT-S at r=13: 2.71 GFLOPs (its paper: 2.7); the MLP runs on the merged tokens.
  assert round(cost.count_flops(tome).total / 1e9, 3) == 2.712
  assert round(cost.count_flops(like).total / 1e9, 3) == 2.913


@pytest.mark.parametrize("merge_impl", ["scatter", "matmul"])
def test_flops_are_the_traced_programs(merge_impl):
  meta, _ = load_case("tome_tiny_r8")
  config = tome_config(meta, "float32", merge_impl=merge_impl, trace_source=False)
  model = mctf_jax.create_model(config)
  traced = flops.traced_matmul_flops(model, 2, None)
  report = cost.count_flops(config, implementation="mctf_jax")
  assert traced == 2 * report.matmul
  # ToMe's own count (fvcore on its code) is the same where the merges are gathers.
  if merge_impl == "scatter":
    assert report.total == cost.count_flops(config).total


def test_gradients_flow_through_the_merges(x64):
  """Float64 gradients of the logits equal central differences along a random direction of
  every parameter (the matching is fixed under a small step; the merges carry gradient)."""
  meta, data = load_case("tome_tiny_r8")
  config = tome_config(meta, trace_source=False)
  model = mctf_jax.create_model(config)
  params = convert.torch_to_flax(golden_state_dict(data), config)
  grads = assert_gradients_match_differences(model, params, golden_images(data, "float64"))
  # The patch embedding gets its gradient through every block's merge.
  assert np.all(np.abs(np.asarray(grads["patch_embed"]["proj"]["kernel"])) > 0)


def test_train_step():
  """Training in ToMe mode, here with the token reduction consistency (a padded teacher
  in ToMe mode beside the student)."""
  meta, _ = load_case("tome_tiny_r8")
  config = tome_config(meta, "float32", trace_source=False, teacher_r_max=4)
  model = mctf_jax.create_model(config)
  params = init_variables(model)["params"]
  recipe = ConfigDict(dict(ema_decay=0.5, seed=0, batch_size=8, loss=dict(
      label_smoothing=0.1, consistency_threshold=0.0, weight_student=1.0, weight_teacher=1.0,
      weight_consistency=3.0)))
  tx = optax.sgd(0.1)
  step = jax.jit(make_train_step(model, tx, recipe, plan=teacher_plan(model, 8)))
  batch = {"image": np.random.default_rng(0).standard_normal(
               (8,) + model.config.image_shape).astype(np.float32),
           "label": np.arange(8, dtype=np.int32) % 10}
  new, metrics = step(TrainState(jnp.asarray(1, jnp.int32), params, tx.init(params),
                                 jax.tree.map(jnp.copy, params), {}), batch)
  assert bool(metrics["finite"]) and float(metrics["loss_consistency"]) > 0
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         new.params, params)
  assert all(jax.tree.leaves(changed)), changed
