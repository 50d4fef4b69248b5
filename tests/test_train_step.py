"""The jitted train step: the same loss and gradients as the model's own teacher path, the
same losses and parameters on 8 devices (data parallel, FSDP) as on one, the schedule."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mctf_jax
from mctf_jax import parallel
from mctf_jax.config import ConfigError
from mctf_jax.fusion import padded
from mctf_jax.models import DeiT
from mctf_jax.models.base import consistency
from mctf_jax.training import losses, optim, programs
from mctf_jax.training.plan import teacher_plan, teacher_values
from mctf_jax.training.train_step import TrainState, make_train_step
from configs import default
from conftest import init_variables


def small_config(**fusion):
  c = default.get_config()
  c.model.update(dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                      num_classes=10, drop_path_rate=0.0))
  c.fusion.update(dict(r=2.0, layers=(1, 2), teacher_r_max=3.0, pooling="attn"))
  c.fusion.update(fusion)
  c.batch_size = 16
  c.ema_decay = 0.9
  c.base_lr = 5e-3
  return c


def _batch(seed, n=16, size=16, mixup=False):
  rng = np.random.default_rng(seed)
  batch = {"image": rng.standard_normal((n, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, 10, n).astype(np.int32)}
  if mixup:
    lam = 0.7
    onehot = losses.smooth_labels(batch["label"], 10, 0.1)
    batch["mixed_label"] = batch["label"][::-1].copy()
    batch["targets"] = np.asarray(lam * onehot + (1 - lam) * onehot[::-1], np.float32)
  return batch


def test_teacher_values_and_branches():
  no_teacher = mctf_jax.create_model(small_config(teacher_r_max=0.0))
  assert teacher_values(no_teacher.fusion) == ()
  assert teacher_plan(no_teacher, 16).num_branches == 0
  model = mctf_jax.create_model(small_config(train_token_step=0))   # exact shapes
  plan = teacher_plan(model, 16)
  assert plan.values == (0, 1, 2)
  assert len(plan.paths) == 3
  ratio = mctf_jax.create_model(small_config(r=0.35, teacher_r_max=0.15, train_token_step=0))
  b = teacher_plan(ratio, 16)
  assert b.values == tuple(k / 100 for k in range(15))
  # 17 tokens, then 17 - r: r = int(16 k/100) and int((16 - r) k/100) are (0, 0) for k < 7,
  # (1, 1) for k = 7..12 and (2, 1) for k = 13, 14: three distinct schedules.
  assert [tuple(p.r for p in s.layers[1:]) for s in b.paths] == [(0, 0), (1, 1), (2, 1)]
  assert b.branch_of_value == (0,) * 7 + (1,) * 6 + (2,) * 2
  # The plan prints what the trainer logs.
  assert str(plan) == ("teacher r' drawn from [0, 1, 2]: 3 switch branch(es), ending at "
                       "[13, 15, 17] tokens")


def test_shared_blocks():
  model = mctf_jax.create_model(small_config())
  assert teacher_plan(model, 16).shared == 1                 # everyone fuses from block 1 on
  no_fusion = mctf_jax.create_model(small_config(r=0.0, teacher_r_max=0.0))
  assert teacher_plan(no_fusion, 16).shared == 3             # nothing fuses: all blocks
  fast = mctf_jax.create_model(small_config(r=0.35, layers=(2,), teacher_r_max=0.15))
  assert teacher_plan(fast, 16).shared == 2
  with pytest.raises(ValueError, match=r"fuses at block\(s\) \[1\]"):
    variables = init_variables(model)
    jax.eval_shape(lambda v, x: model.apply(v, x, model.schedule(), start=2,
                                            method=model.run_blocks),
                   variables, jnp.zeros((1, 17, 32)))


def _reference_loss(model, batch, cfg, teacher_rs):
  """loss_fn(params) -> (loss, parts): the MCTF loss as one function of the parameters,
  differentiated as a whole, composed here of the model's own methods at exact shapes: the
  student at fusion.r, the teacher of each consecutive group of the batch at its r' (the
  outputs joined before the loss, which averages over the whole batch)."""
  images, labels = batch["image"], batch["label"]
  size = len(labels) // len(teacher_rs)

  def outputs(v, x, r):
    out = model.apply(v, x, train=True, r=r, method=model.encode)
    return (model.apply(v, out.tokens_BxTxC, out.size_BxT, method=model.train_logits),
            model.apply(v, out.tokens_BxTxC, out.size_BxT, method=model.features))

  def loss_fn(p):
    v = {"params": p}
    student_logits, student_features = outputs(v, images, None)
    teacher = [outputs(v, images[g * size:(g + 1) * size], r) for g, r in enumerate(teacher_rs)]
    teacher_logits, teacher_features = (jnp.concatenate(t) for t in zip(*teacher))
    loss, parts = losses.student_loss(student_logits, labels, cfg, batch.get("targets"),
                                      consistency(student_features, teacher_features),
                                      batch.get("mixed_label"))
    parts["loss_teacher"] = losses.teacher_loss(teacher_logits, labels, cfg,
                                                batch.get("targets"))
    return loss + parts["loss_teacher"], parts

  return loss_fn


def _assert_sgd_step_is(new, metrics, params, loss_fn):
  """The step (SGD at lr 1, so params - grads) gave loss_fn's loss, parts and gradient."""
  (loss, parts), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  for k in ("loss_student", "loss_teacher", "loss_consistency", "pass_rate"):
    np.testing.assert_allclose(metrics[k], parts[k], rtol=1e-5, atol=1e-7, err_msg=k)
  want = jax.tree.map(lambda p, g: p - g, params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new.params, want)


# The grid of widths (16) runs as a benchmark (pytest -m benchmark): its padded logits are
# checked against the golden ones in tests/test_padded.py, and its step differs from the
# full-width one only in the widths of the branches.
@pytest.mark.parametrize("depth,layers,token_step", [
    (2, (1,), None), pytest.param(3, (0, 2), 16, marks=pytest.mark.benchmark), (3, (0, 2), 0)])
def test_step_equals_model_teacher_path(depth, layers, token_step):
  """The step (shared blocks run once, teacher in a switch, at padded shapes or exact
  ones) gives the model's own loss and gradient, which the golden tests check against the
  reference."""
  config = small_config(layers=layers, train_token_step=token_step)
  config.model.depth = depth
  model = mctf_jax.create_model(config)
  plan = teacher_plan(model, config.batch_size)
  assert plan.padded == (token_step != 0)
  if token_step != 0:   # full width, or the grid (17, 1): r' = 1, 2 run at width 17
    assert plan.branch_of_value == (0, 1, 1)
    assert plan.paths[1].widths == (17,) * (depth + 1)
  params = init_variables(model)["params"]
  tx = optax.sgd(1.0)   # params - grads: the update shows the gradient
  step = jax.jit(make_train_step(model, tx, config))
  cfg = losses.LossConfig(0.1, config.loss.consistency_threshold, (1.0, 1.0, 3.0))
  # Steps that draw different r' (the draw depends on the step number only).
  first_of = {}
  for i in range(12):
    state = TrainState(jnp.asarray(i, jnp.int32), params, tx.init(params), None)
    drawn = int(step(state, _batch(1))[1]["teacher_r"])
    assert plan.value_at(config.seed, i) == drawn
    first_of.setdefault(drawn, i)
  assert len(first_of) >= 2
  for (r, i), mixup in zip(sorted(first_of.items())[-2:], (False, True)):
    batch = _batch(1, mixup=mixup)
    new, metrics = step(TrainState(jnp.asarray(i, jnp.int32), params, tx.init(params), None),
                        batch)

    _assert_sgd_step_is(new, metrics, params, _reference_loss(model, batch, cfg, [r]))


def test_each_group_of_the_batch_draws_its_own_teacher_r():
  """With fusion.teacher_group_size=8 a batch of 16 is two groups, each with its own r'
  (the official code: one per GPU). The step gives the loss and gradient of the model's
  own teacher path run on each group at its r', the outputs joined before the loss (the
  consistency loss averages over the whole batch).

  On a token grid of step 1 each r' has its own layout, so the groups share a covering
  one: r' = 1 and 2 run in r' = 1's; 0 beside 2 in a branch of its own, which fuses at
  the full width (the layout of the default full-width teacher's r' > 0)."""
  config = small_config(teacher_group_size=8, train_token_step=1)
  model = mctf_jax.create_model(config)
  plan = teacher_plan(model, 16)
  assert plan.groups == 2 and teacher_plan(model, 8).groups == 1
  one_group = teacher_plan(model, 8)
  full = padded.PaddedLayout((17,) * 4, (False, True, True))
  assert [l.widths for l in one_group.paths] == [(17,) * 4, (17, 17, 16, 15),
                                                 (17, 17, 15, 13)]
  assert plan.paths == one_group.paths + (full,)
  assert plan.branch_of_lowest == (3, 1, 2)
  assert teacher_plan(mctf_jax.create_model(small_config()), 16).paths[1] == full
  assert str(plan).startswith("teacher r' drawn from [0, 1, 2] for each group of 8 images "
                              "(2 a step): 4 switch branch(es) (token arrays padded to a "
                              "grid of step 1)")
  params = init_variables(model)["params"]
  tx = optax.sgd(1.0)
  step = jax.jit(make_train_step(model, tx, config))
  cfg = losses.LossConfig(0.1, config.loss.consistency_threshold, (1.0, 1.0, 3.0))
  draws = {i: plan.value_at(config.seed, i) for i in range(40)}
  assert all(len(d) == 2 for d in draws.values())
  # A step that draws 0 beside 2: both groups run in the extra branch, the r' = 0 group
  # merging nothing, the r' = 2 group in a layout wider than its own (as 2 beside 1 runs
  # in r' = 1's layout).
  i = next(i for i, d in draws.items() if min(d) == 0 and max(d) == 2)
  batch = _batch(2, mixup=True)
  new, metrics = step(TrainState(jnp.asarray(i, jnp.int32), params, tx.init(params), None),
                      batch)
  np.testing.assert_allclose(metrics["teacher_r"], np.mean(draws[i]), rtol=1e-6)

  _assert_sgd_step_is(new, metrics, params, _reference_loss(model, batch, cfg, draws[i]))


def test_teacher_groups_need_a_fitting_batch_and_the_padded_teacher():
  model = mctf_jax.create_model(small_config(teacher_group_size=6))
  with pytest.raises(ConfigError, match="batch_size=16 is not a multiple of "
                                        "fusion.teacher_group_size=6"):
    make_train_step(model, optax.sgd(1.0), small_config(teacher_group_size=6))
  exact = small_config(teacher_group_size=4, train_token_step=0)
  with pytest.raises(ConfigError, match="needs the padded teacher"):
    make_train_step(mctf_jax.create_model(exact), optax.sgd(1.0), exact)
  for fine in (dict(teacher_group_size=0), dict(teacher_group_size=16),
               dict(teacher_group_size=4, teacher_r_max=0.0)):
    assert teacher_plan(mctf_jax.create_model(small_config(**fine)), 16).groups == 1
  with pytest.raises(ConfigError, match="teacher_group_size must be an integer >= 0"):
    mctf_jax.create_model(small_config(teacher_group_size=-1))


def test_scanned_step_traces_in_bfloat16():
  """The scanned step in bfloat16: the scan's carry keeps its dtypes (lax.scan refuses a
  body whose carry changes type, when it is traced)."""
  config = small_config(train_scan_blocks=True)
  config.model.update(drop_path_rate=0.3, dtype="bfloat16")
  model = mctf_jax.create_model(config)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  tx = optax.sgd(1.0)
  state = TrainState(jnp.asarray(0, jnp.int32), params, jax.eval_shape(tx.init, params), None)
  new, metrics = jax.eval_shape(make_train_step(model, tx, config), state, _batch(0))
  assert jax.tree.map(lambda x: x.dtype, new.params) == jax.tree.map(lambda x: x.dtype, params)


def test_scanned_step_equals_unrolled():
  """fusion.train_scan_blocks (alike padded blocks as one lax.scan: the teacher's fused
  blocks, and its unfused r' = 0 branch) changes nothing but rounding, stochastic depth
  on, for every r'."""
  steps, results = {}, {}
  dtype, loose = "float32", False
  for scan in (True, False):
    config = small_config(train_scan_blocks=scan)   # blocks 1, 2 fuse: a scan of two
    config.model.update(drop_path_rate=0.3, dtype=dtype)
    model = mctf_jax.create_model(config)
    params = init_variables(model)["params"]
    tx = optax.sgd(1.0)
    steps[scan] = jax.jit(make_train_step(model, tx, config))
  for i in range(6):   # draws every r' in 0..2
    state = TrainState(jnp.asarray(i, jnp.int32), params, tx.init(params), None)
    for scan in (True, False):
      results[scan] = steps[scan](state, _batch(i))
    (new_scan, m_scan), (new_unrolled, m_unrolled) = results[True], results[False]
    for k in ("loss", "loss_student", "loss_teacher", "loss_consistency", "teacher_r"):
      np.testing.assert_allclose(m_scan[k], m_unrolled[k], rtol=2e-2 if loose else 1e-5,
                                 atol=2e-3 if loose else 1e-7, err_msg=k)
    if not loose:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                   new_scan.params, new_unrolled.params)
  assert {teacher_plan(model, 16).value_at(config.seed, i) for i in range(6)} == {0, 1, 2}


def _run(config, mesh, steps=3):
  """`steps` steps of train.py's own program (programs.train_program) on `mesh`."""
  program = programs.train_program(config, mesh, steps_per_epoch=2)
  variables = jax.jit(program.model.init, out_shardings=program.variables_shardings)(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  state = program.init_state(variables)
  history = []
  for i in range(steps):
    state, metrics = program.step(state, parallel.global_batch(_batch(10 + i), mesh))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_eight_devices_equal_one():
  """Four groups of the batch of 16 draw their own r', their examples split over the
  devices. (One r' per batch on several devices: test_entry_points' two processes.)"""
  config = small_config(teacher_group_size=4)
  one, h1 = _run(config, parallel.create_mesh(1, jax.devices()[:1]))
  # Data parallel over 4 and parameters sharded over 2: both kinds of parallelism at once.
  config.mesh.fsdp = 2
  mesh = parallel.create_mesh(2)
  assert mesh.devices.size == 8 and dict(mesh.shape) == {"data": 4, "fsdp": 2}
  eight, h8 = _run(config, mesh)
  for a, b in zip(h1, h8):
    assert float(a["teacher_r"]) == float(b["teacher_r"])
    for k in ("loss", "loss_student", "loss_teacher", "loss_consistency", "pass_rate",
              "grad_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-7, err_msg=k)
  # Adam divides by sqrt(v): a near-zero gradient turns reduction-order noise into
  # ~1e-6 absolute differences after a few steps at lr 5e-3 (parameters are ~1e-2).
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  jax.tree.map(close, one.params, eight.params)
  jax.tree.map(close, one.ema, eight.ema)


def test_fsdp_shards_parameters():
  mesh = parallel.create_mesh(2) if jax.device_count() >= 2 else None
  if mesh is None:
    pytest.skip("needs 2 devices")
  shapes = {"big": jax.ShapeDtypeStruct((384, 1152), jnp.float32),
            "bias": jax.ShapeDtypeStruct((1152,), jnp.float32),
            "odd": jax.ShapeDtypeStruct((3, 5, 7, 99), jnp.float32)}
  sh = parallel.tree_shardings(mesh, shapes)
  assert sh["big"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert sh["bias"].spec == jax.sharding.PartitionSpec()
  assert sh["odd"].spec == jax.sharding.PartitionSpec()
  with pytest.raises(mctf_jax.ConfigError, match=r"batch_size=12 is not divisible by the "
                                                r"number of devices \(8\)"):
    parallel.check_batch_size(12, parallel.create_mesh(1, jax.devices()[:8]))
  with pytest.raises(mctf_jax.ConfigError, match=r"mesh.fsdp=3 must be >= 1 and divide"):
    parallel.create_mesh(3, jax.devices()[:8])


def test_official_lr_schedule():
  c = default.get_config()   # 30 + 10 epochs, base 1.5e-5 per 512 -> 3e-5, min 1e-6
  assert optim.peak_lr(c) == pytest.approx(3e-5)
  sched = optim.make_schedule(c, steps_per_epoch=10)
  lrs = [float(sched(e * 10 + 3)) for e in range(40)]
  assert lrs[0] == lrs[1] == pytest.approx(3e-5)          # epoch e uses lr(e - 1)
  assert lrs[2] == pytest.approx(1e-6 + (3e-5 - 1e-6) * (1 + np.cos(np.pi / 30)) / 2)
  assert all(a >= b for a, b in zip(lrs, lrs[1:]))
  assert lrs[31:] == [pytest.approx(1e-6)] * 9             # cool-down at min_lr
  assert float(sched(5)) == float(sched(9))                # constant within an epoch
  c.warmup_epochs = 5
  sched = optim.make_schedule(c, steps_per_epoch=10)
  assert float(sched(10)) == pytest.approx(c.warmup_lr)
  assert float(sched(30)) == pytest.approx(c.warmup_lr + 2 * (3e-5 - c.warmup_lr) / 5)


def test_weight_decay_mask():
  model = mctf_jax.create_model(small_config())
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  mask = optim.weight_decay_mask(params, DeiT.NO_WEIGHT_DECAY)
  assert not mask["pos_embed"] and not mask["cls_token"]
  assert not mask["blocks_0"]["norm1"]["scale"] and not mask["head"]["bias"]
  assert mask["blocks_0"]["attn"]["qkv"]["kernel"] and mask["head"]["kernel"]
  assert mask["patch_embed"]["proj"]["kernel"]
