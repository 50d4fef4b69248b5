"""The Flax model: sizes, transformations (jit/vmap/grad), bf16, modes, and bad input."""

import importlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mctf_jax
from mctf_jax.training.train_step import loss_and_grads
from conftest import init_variables, jit_apply, tiny_config


def _n_params(config_name):
  config = importlib.import_module(f"configs.{config_name}").get_config()
  model = mctf_jax.create_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name,count", [("deit_t", 5_717_416), ("deit_s", 22_050_664),
                                        ("deit_b", 86_567_656)])
def test_parameter_counts_match_timm(name, count):
  assert _n_params(name) == count


@pytest.fixture(scope="module")
def tiny():
  model = mctf_jax.create_model(tiny_config())
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  params = init_variables(model)["params"]
  return model, params, images


def test_forward_shapes_and_fusion_invariants(tiny):
  model, params, images = tiny
  out = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, images)
  schedule = model.schedule()
  assert out.tokens_BxTxC.shape == (4, schedule.tokens_out, 64)
  np.testing.assert_array_equal(out.size_BxT.sum(-1), model.config.num_tokens)
  np.testing.assert_array_equal(out.size_BxT[:, 0], 1)               # class token alone
  np.testing.assert_array_equal(out.source_BxTxN[:, 0, 0], 1)         # and first
  np.testing.assert_array_equal(out.source_BxTxN.sum(1), 1)           # each patch once
  np.testing.assert_array_equal(out.source_BxTxN.sum(-1), out.size_BxT)
  assert [layer for layer, _ in out.layer_token_maps] == [1, 2, 3]
  for (layer, token_map), plan in zip(out.layer_token_maps, schedule.layers[1:]):
    assert int(token_map.max()) == plan.tokens_out - 1


# Each pooling merges the attention map its own way in 'approx'; 'off' and 'precise' only
# pool the tokens, which the approx cases cover. (The golden training cases differentiate
# 'approx' with the size- and attention-weighted poolings against the official gradients.)
@pytest.mark.parametrize("mode,pooling", [("approx", "max"), ("approx", "mean"),
                                          ("off", "attn"), ("precise", "attn")])
def test_every_mode_and_pooling_runs_and_differentiates(mode, pooling):
  config = tiny_config(one_step_ahead=mode, pooling=pooling, prop_attn=pooling != "mean",
                       layers=(1, 2))
  config["model"]["depth"] = 3   # two fused blocks: the second sees a merged map
  model = mctf_jax.create_model(config)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  params = init_variables(model)["params"]

  batch = {"image": images, "label": jnp.asarray([1, 7])}
  out, grads = jax.jit(lambda p: loss_and_grads(model, p, batch, jax.random.key(2),
                                                teacher_r=3))(params)
  assert np.isfinite(out.loss) and out.loss > 0 and np.all(out.consistency > 0)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # The fusion layers' q/k get gradients through the (merged) attention in every mode.
  assert np.any(np.asarray(grads["blocks_2"]["attn"]["qkv"]["kernel"]) != 0)


def test_no_fusion_equals_plain_vit(tiny):
  model, params, images = tiny
  a = jit_apply(model.with_fusion(layers=()))(params, images)
  # Fusing zero tokens at a fused layer is an ordinary block in every mode.
  for mode in ("off", "approx", "precise"):
    z = jit_apply(model.with_fusion(one_step_ahead=mode, r=0))(params, images)
    np.testing.assert_allclose(z, a, rtol=1e-6, atol=1e-6)


def test_attention_scale_is_not_a_broadcast_of_the_logits_shape(tiny):
  # The scale multiplies the queries: a scalar times the (B, H, T, T) logits made XLA:CPU
  # build a (B, H, T, T) array of the constant when blocks share that shape (~9% of
  # DeiT-T's forward time).
  model, params, images = tiny
  b, t = images.shape[0], model.schedule().tokens_in
  heads = tiny_config()["model"]["num_heads"]
  plain = model.with_fusion(layers=())
  hlo = jax.jit(lambda p, x: plain.apply({"params": p}, x)).lower(params, images).compile()
  logits_shape = re.escape(f"f32[{b},{heads},{t},{t}]")
  assert not re.findall(rf"= {logits_shape}\S* (?:broadcast|fusion)\(%constant[.\d]*\)",
                        hlo.as_text())


def _train_outputs(model, params, images, teacher_r, key=0):
  batch = {"image": images, "label": jnp.arange(images.shape[0]) % 10}
  return jax.jit(lambda p, b, k: loss_and_grads(model, p, b, k, teacher_r=teacher_r)[0])(
      params, batch, jax.random.key(key))


def test_teacher_path(tiny):
  """The training forward's teacher at r' = 0 is the plain model, its student the model at
  fusion.r; at r' = r the two agree."""
  model, params, images = tiny
  out = _train_outputs(model, params, images, 0)
  plain = jit_apply(model.with_fusion(r=0))(params, images)
  np.testing.assert_allclose(out.teacher_logits, plain, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.student_logits, jit_apply(model)(params, images),
                             rtol=1e-5, atol=1e-5)
  same = _train_outputs(model, params, images, 8)
  np.testing.assert_allclose(same.consistency, 0, atol=1e-12)
  assert out.consistency.shape == (4,) and np.all(out.consistency > 0)
  no_teacher = _train_outputs(model, params, images, None)
  assert no_teacher.teacher_logits is None and no_teacher.consistency is None
  assert sorted(no_teacher.parts) == ["loss_student"]
  np.testing.assert_allclose(no_teacher.student_logits, out.student_logits, rtol=1e-6)


def test_dropout_and_drop_path_need_rngs_and_vary():
  config = tiny_config()
  config["model"].update(dropout_rate=0.1, drop_path_rate=0.2)
  model = mctf_jax.create_model(config)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  params = init_variables(model)["params"]
  apply = jit_apply(model, train=True)
  a = apply(params, images, {"dropout": jax.random.key(1)})
  b = apply(params, images, {"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)
  a, b = (_train_outputs(model, params, images, 2, key) for key in (1, 2))
  assert not np.allclose(a.teacher_logits, b.teacher_logits)
  # Evaluation is deterministic and needs no rng.
  evaluate = jit_apply(model)
  np.testing.assert_array_equal(evaluate(params, images), evaluate(params, images))


def test_one_trace_per_shape(tiny):
  """(jit, vmap and grad: tests/test_backbones.py, for every backbone.)"""
  model, params, images = tiny
  # A second call with new values does not recompile.
  counted = jax.jit(lambda p, x: model.apply({"params": p}, x))
  counted(params, images)
  before = counted._cache_size()
  counted(params, images + 1)
  assert counted._cache_size() == before


def test_bfloat16_compute_with_float32_params(tiny):
  _, params, images = tiny
  config = tiny_config()
  config["model"]["dtype"] = "bfloat16"
  model = mctf_jax.create_model(config)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      jax.eval_shape(model.init, jax.random.key(0), images)["params"]))
  out = _train_outputs(model, params, images, 3)
  assert out.student_logits.dtype == jnp.bfloat16
  ref = jit_apply(mctf_jax.create_model(tiny_config()))(params, images)
  assert np.all(np.isfinite(np.asarray(out.student_logits, np.float32)))
  # bf16 keeps ~3 significant digits; the logits of this random model are O(1).
  assert np.abs(np.asarray(out.student_logits, np.float32) - ref).max() < 0.25
  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, images).astype(
      jnp.float32).sum()))(params)
  assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_matmul_and_scatter_merges_agree(tiny):
  # 'approx' uses every merge: tokens, sizes, pooling weights and the attention rows.
  model, params, images = tiny
  a = jit_apply(model.with_fusion(merge_impl="scatter", pooling="attn"))(params, images)
  b = jit_apply(model.with_fusion(merge_impl="matmul", pooling="attn"))(params, images)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,dtype,message", [
    ((4, 3, 32, 32), jnp.float32,
     r"NHWC of shape \(batch, 32, 32, 3\).*got shape \(4, 3, 32, 32\)"),
    ((4, 28, 28, 3), jnp.float32, r"img_size=32.*got shape \(4, 28, 28, 3\)"),
    ((32, 32, 3), jnp.float32, r"got shape \(32, 32, 3\)"),
    ((4, 32, 32, 3), jnp.uint8, "must be floating point.*got dtype uint8"),
])
def test_bad_images(tiny, shape, dtype, message):
  model, params, _ = tiny
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda x: model.apply({"params": params}, x), jnp.zeros(shape, dtype))


def test_bad_teacher_r(tiny):
  model, params, images = tiny
  with pytest.raises(ValueError, match="teacher_r must be >= 0"):
    _train_outputs(model, params, images, -1)


def test_matmul_merges_keep_inference_tokens_token_major(tiny):
  """'matmul' merges ask XLA to keep the fused tokens token-major in inference programs
  only (a train step pays for it: docs/speed.md), and the request changes no value."""
  _, params, images = tiny
  model = mctf_jax.create_model(tiny_config(merge_impl="matmul"))
  scatter = mctf_jax.create_model(tiny_config(merge_impl="scatter"))
  rngs = {"dropout": jax.random.key(2)}

  def hlo(m, train):
    return jax.jit(lambda p, x: m.apply({"params": p}, x, train=train, rngs=rngs)).lower(
        params, images).as_text()

  assert hlo(model, False).count("LayoutConstraint") == 3      # one per fusing block
  assert "LayoutConstraint" not in hlo(model, True)
  assert "LayoutConstraint" not in hlo(scatter, False)
  out = jit_apply(model)(params, images)
  np.testing.assert_allclose(out, jit_apply(scatter)(params, images), rtol=1e-5, atol=1e-5)
