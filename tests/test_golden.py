"""Parity with the official PyTorch MCTF: every case in tests/golden (see its README)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mctf_jax
from mctf_jax import convert
from mctf_jax.training import losses
from mctf_jax.training.train_step import loss_and_grads
from conftest import (EVAL_CASES, golden_config, golden_images, golden_state_dict,
                      load_golden)

PRECISIONS = {"f64": ("float64", 1e-9), "f32": ("float32", 1e-4)}
# What the port reaches in float64 on every case: rounding, not a formula's difference.
F64_ROUNDING = 1e-13


def _setup(case, prec, **fusion_changes):
  meta, data = load_golden(case)
  dtype, tol = PRECISIONS[prec]
  config = golden_config(meta, dtype, **fusion_changes)
  model = mctf_jax.create_model(config)
  params = convert.torch_to_flax(golden_state_dict(data), config)
  return meta, data, model, params, golden_images(data, dtype), tol


# The CPU default merge in both precisions; the TPU one ('matmul') in float64, where the
# formulas are compared at rounding level.
@pytest.mark.parametrize("case", EVAL_CASES)
@pytest.mark.parametrize("merge_impl,prec", [("scatter", "f64"), ("scatter", "f32"),
                                             ("matmul", "f64")])
def test_eval_logits_sizes_sources(case, prec, merge_impl, x64):
  _, data, model, params, images, tol = _setup(case, prec, merge_impl=merge_impl)
  logits, out = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method=model.encode)))(
      {"params": params}, images)
  np.testing.assert_allclose(np.asarray(logits), data[f"{prec}/logits"], rtol=0, atol=tol)
  if prec == "f64":
    np.testing.assert_allclose(np.asarray(logits), data["f64/logits"], rtol=0, atol=F64_ROUNDING)
  np.testing.assert_array_equal(np.asarray(out.size_BxT), data[f"{prec}/size"])
  if f"{prec}/source" in data:   # (the recipe's case traces no sources)
    np.testing.assert_array_equal(np.asarray(out.source_BxTxN), data[f"{prec}/source"])
  assert out.tokens_BxTxC.shape[1] == model.schedule().tokens_out


def _train_setup(case, prec):
  meta, data, model, params, images, tol = _setup(case, prec, teacher_r_max=8)
  train = meta["train"]
  weights = tuple(float(w) for w in data[f"{prec}/loss_weights"])
  assert weights == (train["loss_weights"]["student"], train["loss_weights"]["teacher"],
                     train["loss_weights"]["consistency"])
  loss_cfg = losses.LossConfig(label_smoothing=train["label_smoothing"],
                               threshold=float(data[f"{prec}/threshold"]), weights=weights)
  return meta, data, model, params, images, tol, loss_cfg


# Float64 (where the formulas are compared, at rounding level) with both merge
# implementations and the recipe's pooling; float32 (its precision) on the first case.
@pytest.mark.parametrize("case,merge_impl,prec", [
    ("tiny_train", "scatter", "f64"), ("tiny_train", "matmul", "f64"),
    ("tiny_recipe_train", "scatter", "f64"), ("tiny_train", "scatter", "f32")])
def test_train_outputs_losses_and_gradients(case, prec, merge_impl, x64):
  meta, data, model, params, images, tol, loss_cfg = _train_setup(case, prec)
  model = model.with_fusion(merge_impl=merge_impl)
  labels = jnp.asarray(data[f"{prec}/target"])
  teacher_r = meta["train"]["teacher_r"]

  # What train.py's step computes, with the teacher at the case's r'.
  out, grads = jax.jit(lambda p: loss_and_grads(model, p, {"image": images, "label": labels},
                                                jax.random.key(0), teacher_r=teacher_r,
                                                loss_config=loss_cfg))(params)
  loss, parts = out.loss, out.parts
  np.testing.assert_allclose(out.student_logits, data[f"{prec}/x_student"], atol=tol, rtol=0)
  np.testing.assert_allclose(out.teacher_logits, data[f"{prec}/x_teacher"], atol=tol, rtol=0)
  if prec == "f64":
    for got, name in ((out.student_logits, "x_student"), (out.teacher_logits, "x_teacher")):
      np.testing.assert_allclose(got, data[f"f64/{name}"], atol=F64_ROUNDING, rtol=0)
  np.testing.assert_allclose(out.consistency, data[f"{prec}/loss_consistency"],
                             rtol=1e-9 if prec == "f64" else 1e-4, atol=0)
  _, passed = losses.consistency_loss(out.consistency, out.student_logits, labels,
                                      loss_cfg.threshold)
  np.testing.assert_array_equal(passed, data[f"{prec}/confidence_pass"])
  rtol = 1e-9 if prec == "f64" else 1e-5
  for name, key in [("loss_student", "loss_student"), ("loss_teacher", "loss_teacher"),
                    ("loss_consistency", "loss_cons")]:
    np.testing.assert_allclose(parts[name], data[f"{prec}/{key}"], rtol=rtol, err_msg=name)
  np.testing.assert_allclose(loss, data[f"{prec}/loss"], rtol=rtol)

  got = convert.flax_to_torch(grads)
  want = {k[len(f"{prec}/grad/"):]: v for k, v in data.items()
          if k.startswith(f"{prec}/grad/")}
  assert sorted(got) == sorted(want)
  gtol = 1e-9 if prec == "f64" else 1e-3
  for name, ref in want.items():
    rel = np.abs(got[name] - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert rel < gtol, f"{name}: relative error {rel:.3g}"
    assert prec == "f32" or rel < 1e-12, f"{name}: relative error {rel:.3g} (rounding: ~1e-15)"
