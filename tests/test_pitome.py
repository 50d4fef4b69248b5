"""PiToMe itself (fusion.method='pitome'): parity with hchautran/PiToMe's outputs
(tests/golden/pitome, see its README), its schedule and settings, every backbone, its FLOPs,
budget, gradients and training."""

import importlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

import mctf_jax
from mctf_jax import convert, cost, models
from mctf_jax.fusion import padded
from mctf_jax.errors import ConfigError
from mctf_jax.fusion import FusionConfig
from mctf_jax.fusion.config import PITOME_FIXED
from mctf_jax.fusion.pitome import pitome_matching, similarity_and_energy
from mctf_jax.fusion.schedule import pitome_r
from mctf_jax.tools import flops
from mctf_jax.training.plan import teacher_plan, teacher_values
from mctf_jax.training.train_step import TrainState, make_train_step
from conftest import (GOLDEN_DIR, assert_gradients_match_differences, golden_images,
                      golden_state_dict, init_variables, load_golden, run_timm_case,
                      timm_model_config)
from test_backbones import TOKENS

CASES = ("pitome_tiny_r090", "pitome_tiny_r080_m090", "pitome_tiny_r085_propflag")
PRECISIONS = {"f64": ("float64", 1e-9), "f32": ("float32", 1e-4)}


def pitome_config(meta, dtype="float64", **fusion):
  """The JAX config of a golden case: timm's constructor arguments, PiToMe's ratio and the
  case's margin of every block."""
  kw = meta["timm_vision_transformer_kwargs"]
  settings = dict(method="pitome", r=meta["pitome_ratio"], layers=tuple(range(kw["depth"])),
                  pitome_margin=tuple(meta["pitome_margin_per_block"]),
                  trace_source=meta["trace_source"], teacher_r_max=0, **PITOME_FIXED)
  settings.update(fusion)
  return {"model": timm_model_config(meta, dtype), "fusion": settings}


def load_case(case):
  return load_golden(f"pitome/{case}")


_run = run_timm_case


@pytest.mark.parametrize("prec", ["f64", "f32"])
@pytest.mark.parametrize("case", CASES)
def test_golden_logits_sizes_sources(case, prec, x64):
  meta, data = load_case(case)
  dtype, tol = PRECISIONS[prec]
  model, logits, out = _run(pitome_config(meta, dtype), data, dtype)
  schedule = model.schedule()
  assert [p.r for p in schedule.layers] == meta["r_per_block"]
  assert [p.tokens_in for p in schedule.layers] == meta["tokens_in_per_block"]
  assert [not p.protect for p in schedule.layers] == meta["use_bsm_pitome_per_block"]
  np.testing.assert_allclose(logits, data[f"{prec}/logits"], rtol=0, atol=tol)
  if prec == "f64":   # rounding, not a formula's difference
    np.testing.assert_allclose(logits, data["f64/logits"], rtol=0, atol=1e-13)
  # Sizes and sources exact, in PiToMe's output order.
  np.testing.assert_array_equal(np.asarray(out.size_BxT), data[f"{prec}/size"])
  np.testing.assert_array_equal(np.asarray(out.source_BxTxN), data[f"{prec}/source"])


def test_golden_with_matmul_merges_and_the_margin_schedule(x64):
  """The TPU merges (0/1 products) give the same outputs; a margin m given as one number is
  PiToMe's schedule m - m l / L (the cases' margins, exactly)."""
  for case, margin in (("pitome_tiny_r090", 0.75), ("pitome_tiny_r080_m090", 0.9)):
    meta, data = load_case(case)
    config = pitome_config(meta, merge_impl="matmul", pitome_margin=margin)
    model, logits, out = _run(config, data, "float64")
    assert [p.margin for p in model.schedule().layers] == meta["pitome_margin_per_block"]
    np.testing.assert_allclose(logits, data["f64/logits"], rtol=0, atol=1e-13)
    np.testing.assert_array_equal(np.asarray(out.size_BxT), data["f64/size"])
    np.testing.assert_array_equal(np.asarray(out.source_BxTxN), data["f64/source"])


def _schedule(depth=4, tokens=65, **fusion):
  settings = dict(method="pitome", layers=tuple(range(depth)), teacher_r_max=0, **PITOME_FIXED)
  settings.update(fusion)
  model = mctf_jax.create_model({"model": dict(img_size=32, patch_size=4, embed_dim=64,
                                               depth=depth, num_heads=2, num_classes=10),
                                 "fusion": settings})
  assert model.config.num_tokens == tokens
  return model.schedule()


def test_counts_and_forms():
  # floor(T - T * ratio) in double precision, not T * (1 - ratio): one more for these T.
  assert [pitome_r(0.9, t) for t in (40, 100)] == [4, 10]
  assert [int(t * (1 - 0.9)) for t in (40, 100)] == [3, 9]
  # 64 tokens at 0.9: 6, 5, 5, 4; the first ceil(L/2) blocks match all tokens.
  s = _schedule(r=0.9, depth=5)
  assert [p.r for p in s.layers] == [6, 5, 5, 4, 4]
  assert [p.protect for p in s.layers] == [False, False, False, True, True]
  assert s.layers[1].margin == 0.75 - 0.75 * 1 / 5
  # A keep ratio per block; the blocks beyond the list, or outside layers, keep everything.
  s = _schedule(r=(0.9, 1, 0.8), layers=(0, 2, 3))
  assert [p.r for p in s.layers] == [6, 0, 11, 0]
  # 0 and 1 fuse nothing; so does a ratio whose count comes out 0 (PiToMe's own code crashes
  # there in a protecting block: a max over nothing).
  assert not _schedule(r=0).fuses and not _schedule(r=1.0).fuses
  assert [p.r for p in _schedule(r=0.99).layers] == [0, 0, 0, 0]
  assert "margin  matching" in str(_schedule(r=0.9))


def test_a_ratio_without_merges_is_the_plain_model():
  config = {"model": dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                          num_classes=10),
            "fusion": FusionConfig.pitome(r=0.99, layers=tuple(range(4)))}
  model = mctf_jax.create_model(config)
  variables = init_variables(model)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  np.testing.assert_array_equal(model.apply(variables, images),
                                model.with_fusion(r=0).apply(variables, images))


@pytest.mark.parametrize("fusion,message", [
    (dict(r=0.4), r"fusion.r=0.4: with fusion.method='pitome' r is the fraction of the tokens "
                  r"each block keeps \(PiToMe's ratio\), in \[0.5, 1\]"),
    (dict(r=8), r"fusion.r=8: with fusion.method='pitome' r is the fraction"),
    (dict(r=(0.9, 0.3)), r"fusion.r\[1\]=0.3: with fusion.method='pitome'"),
    (dict(r=(0.9, 0.9), layers=(0,)), r"removes tokens at block\(s\) \[1\]"),
    (dict(pitome_margin=1.5), r"fusion.pitome_margin must be a number in \[-1, 1\].*got 1.5"),
    (dict(pitome_margin=(0.5, 0.4)), r"lists 2 per-block margins \[0.5, 0.4\] for a model "
                                     r"of 4 blocks"),
    (dict(teacher_r_max=4), r"fusion.teacher_r_max=4: with fusion.method='pitome'"),
    (dict(prop_attn=True), r"method='pitome' merges as PiToMe does.*'prop_attn': True"),
    (dict(method="PiToMe"), r"fusion.method must be one of \('mctf', 'tome', 'pitome'\)"),
])
def test_bad_settings(fusion, message):
  with pytest.raises(ConfigError, match=message):
    _schedule(**{"r": 0.9, **fusion})


def test_matching_orders_and_destinations():
  """The matching on hand-checkable metrics: 6 unprotected tokens behind a class token."""
  rng = np.random.default_rng(0)
  metric = rng.standard_normal((3, 7, 4))
  for protect, r in ((False, 3), (True, 3), (True, 1), (False, 1)):
    m = pitome_matching(jnp.asarray(metric), r=r, margin=0.3, protect=protect)
    dest, anchor = np.asarray(m.dest_BxT), np.asarray(m.anchor_BxO)
    sim, energy = map(np.asarray, similarity_and_energy(jnp.asarray(metric[:, 1:]), 0.3))
    for b in range(3):
      pi = list(np.argsort(-energy[b], kind="stable") + 1)
      assert dest[b, 0] == 0 and anchor[b, 0] == 0
      assert sorted(anchor[b]) == sorted(set(range(7)) - set(np.asarray(m.moved_BxR[b])))
      np.testing.assert_array_equal(dest[b, anchor[b]], np.arange(7 - r))
      if protect:
        a, bb = pi[0:2 * r:2], pi[1:2 * r:2]
        assert list(anchor[b, 1:]) == pi[2 * r:] + bb
      else:
        a, bb = pi[0::2], pi[1::2]
        best = [max(sim[b, t - 1, u - 1] for u in bb) for t in a]
        order = [a[i] for i in np.argsort(-np.asarray(best), kind="stable")]
        assert list(np.asarray(m.moved_BxR[b])) == order[:r]
        assert list(anchor[b, 1:]) == order[r:] + bb
      for t in np.asarray(m.moved_BxR[b]):   # each merged A token into its most similar B
        target = max(bb, key=lambda u: sim[b, t - 1, u - 1])
        assert dest[b, t] == dest[b, target]


def config_of(arch, dtype="float32", **fusion):
  """The backbone's TINY size, every block fusing with PiToMe."""
  depth = models.get(arch).config_class(**models.get(arch).TINY).depth
  settings = dict(method="pitome", r=0.8, layers=tuple(range(depth)), trace_source=True,
                  teacher_r_max=0, **PITOME_FIXED)
  settings.update(fusion)
  return {"model": dict(models.get(arch).TINY, arch=arch, dtype=dtype, param_dtype=dtype),
          "fusion": settings}


@pytest.mark.parametrize("arch", TOKENS)
def test_every_backbone_gets_the_tokens_it_promises(arch):
  """On every backbone (big_vision's ViT without a class token: every token may merge, and
  the protecting blocks protect the low-energy ones only) the sizes and sources add up."""
  model = mctf_jax.create_model(config_of(arch))
  variables = init_variables(model)
  images = jax.random.normal(jax.random.key(1), (2,) + model.config.image_shape)
  cfg, schedule = model.config, model.schedule()
  assert schedule.fuses and schedule.num_protected == cfg.num_protected
  p = cfg.num_protected
  for plan in schedule.layers:
    if plan.fuses:
      assert plan.r == math.floor((plan.tokens_in - p) - (plan.tokens_in - p) * 0.8)
  out = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(variables, images)
  size, source = np.asarray(out.size_BxT), np.asarray(out.source_BxTxN)
  assert out.tokens_BxTxC.shape[:2] == (2, schedule.tokens_out)
  np.testing.assert_array_equal(size.sum(-1), cfg.num_tokens)
  np.testing.assert_array_equal(source.sum(1), 1)
  np.testing.assert_array_equal(source.sum(-1), size)
  np.testing.assert_array_equal(size[:, :p], 1)
  logits = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("arch", TOKENS)
def test_padded_equals_exact(arch, x64):
  """The train step's padded path (full-width arrays, runtime counts) gives the exact
  path's tokens, sizes and logits; with the counts of r' = 0 its fusing blocks change
  nothing (the plain model's tokens, in their order)."""
  model = mctf_jax.create_model(config_of(arch, "float64", trace_source=False))
  variables = init_variables(model)
  images = jax.random.normal(jax.random.key(1), (2,) + model.config.image_shape, jnp.float64)
  schedule, plain = model.schedule(), model.schedule(0)
  layout = padded.layout_of(schedule, padded.token_grid(model.config.num_tokens, None))

  def run(v, x):
    h = model.apply(v, x, method=model.embed)
    pads = [model.apply(v, h, layout, padded.splits_of(s), max_moved=padded.max_moved([schedule]),
                        method=model.run_blocks_padded) for s in (schedule, plain)]
    exact = [model.apply(v, x, method=model.encode),
             model.with_fusion(r=0).apply(v, x, method=model.encode)]
    logits = [model.apply(v, o.tokens_BxTxC, o.size_BxT, method=model.classify)
              for o in pads + exact]
    return pads, exact, logits
  pads, exact, logits = jax.jit(run)(variables, images)
  for pad, ex, got, want in zip(pads, exact, logits[:2], logits[2:]):
    out = ex.tokens_BxTxC.shape[1]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(pad.size_BxT)[:, :out], ex.size_BxT)
    np.testing.assert_array_equal(np.asarray(pad.size_BxT)[:, out:], 0)
    np.testing.assert_allclose(np.asarray(pad.tokens_BxTxC)[:, :out], ex.tokens_BxTxC,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", models.names())
def test_flops_are_the_traced_programs(arch):
  for merge_impl in ("scatter", "matmul"):
    config = config_of(arch, merge_impl=merge_impl, trace_source=False)
    model = mctf_jax.create_model(config)
    traced = flops.traced_matmul_flops(model, 2, None)
    report = cost.count_flops(config, implementation="mctf_jax")
    assert traced == 2 * report.matmul, merge_impl
    if merge_impl == "scatter":   # fvcore's count of PiToMe's code: the same products
      assert report.total == cost.count_flops(config).total


def test_config_and_budget():
  config = importlib.import_module("configs.pitome").get_config()
  fusion = mctf_jax.config.fusion_config(config)
  assert (fusion.method, fusion.r, fusion.pitome_margin) == ("pitome", 0.925, 0.75)
  # PiToMe's DeiT-S at 0.925: 197 -> 82 tokens, 3.01 GFLOPs as fvcore counts its code.
  report = cost.count_flops(config)
  assert [p.r for p in report.schedule.layers] == [14, 13, 12, 11, 10, 10, 9, 8, 8, 7, 7, 6]
  assert round(report.total / 1e9, 3) == 3.013
  # A budget picks the keep ratio (a 0.001 grid) whose FLOPs come closest from below.
  config.fusion.target_gflops = 2.5
  choice = cost.budget_choice(config)
  assert isinstance(choice.r, float) and 0.5 <= choice.r < 0.925
  assert choice.flops <= 2.5e9 < cost.count_flops(config, r=round(choice.r + 0.001, 6)).total
  assert mctf_jax.create_model(config).fusion.r == choice.r
  # The embedded default with PiToMe (its docstring's train.py command).
  digits = mctf_jax.load_config(os.path.join(os.path.dirname(GOLDEN_DIR), "..", "configs",
                                             "pitome.py:digits"))
  assert digits.data.dataset == "digits" and digits.fusion.method == "pitome"
  schedule = mctf_jax.create_model(digits).schedule()
  assert schedule.tokens_per_layer == (65, 53, 43, 35, 29, 24, 20)
  assert [p.protect for p in schedule.layers] == [False] * 3 + [True] * 3
  with pytest.raises(ValueError, match="expected the variant deit_s or digits"):
    mctf_jax.load_config(os.path.join(os.path.dirname(GOLDEN_DIR), "..", "configs",
                                      "pitome.py:imagenet"))


def test_gradients_and_train_step(x64):
  """Float64 gradients of the logits equal central differences (the matching is fixed under
  a small step), and train.py's step trains with PiToMe, without a teacher and with one
  (keep ratios down to teacher_r_max, groups of examples drawing their own)."""
  meta, data = load_case("pitome_tiny_r090")
  config = pitome_config(meta, trace_source=False)
  model = mctf_jax.create_model(config)
  params = convert.torch_to_flax(golden_state_dict(data), config)
  images = golden_images(data, "float64")
  assert_gradients_match_differences(model, params, images)

  recipe = ConfigDict(dict(ema_decay=0.5, seed=0, batch_size=4, loss=dict(
      label_smoothing=0.1, consistency_threshold=0.0, weight_student=1.0, weight_teacher=1.0,
      weight_consistency=3.0)))
  tx = optax.sgd(0.1)
  batch = {"image": images, "label": np.arange(4, dtype=np.int32)}
  for teacher in (0, 0.97):
    taught = model.with_fusion(teacher_r_max=teacher, teacher_group_size=2)
    assert teacher_values(taught.fusion) == ((0, 0.99, 0.98, 0.97) if teacher else ())
    step = jax.jit(make_train_step(taught, tx, recipe, plan=teacher_plan(taught, 4)))
    new, metrics = step(TrainState(jnp.asarray(1, jnp.int32), params, tx.init(params),
                                   jax.tree.map(jnp.copy, params), {}), batch)
    assert bool(metrics["finite"])
    assert (float(metrics.get("loss_consistency", 0)) > 0) == bool(teacher)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           new.params, params)
    assert all(jax.tree.leaves(changed)), changed
