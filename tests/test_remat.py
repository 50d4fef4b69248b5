"""Rematerialisation of the blocks (``model.remat_policy``): in float64, the same outputs and
gradients as without it, bit for bit, on the exact path, on the padded path with its scan
and through the train step; the checkpoints are in the traced programs, with their policy,
on every kind of block; a bad name is a one-line ConfigError.

Each program is compiled once (XLA's compilation, not the running, is what these tests
spend their time on): the jaxpr checks read the programs the comparisons run."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mctf_jax
from mctf_jax import models, recipes
from mctf_jax.config import ConfigError
from mctf_jax.fusion import padded, stack
from mctf_jax.training.plan import teacher_plan
from mctf_jax.training.train_step import TrainState, make_train_step
from configs import default

POLICIES = ("dots_with_no_batch_dims",)   # big_vision's usual one (each policy costs a compile)
TOYS = ("toy_backbones:DistilledViT", "toy_backbones:RegistersViT")
# Two blocks of width 16 on 17 tokens; stochastic depth 0.5 on block 1 (block 0's is 0).
TINY = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=10,
            drop_path_rate=0.5, dtype="float64", param_dtype="float64")
BATCH = 4


def _model(policy="none", layers=(1,)):
  return mctf_jax.create_model({"model": dict(TINY, remat_policy=policy),
                                "fusion": dict(r=2, layers=layers, teacher_r_max=2)})


def _params(model):
  """Random parameters of the model's shapes (no compiled init)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), model.dummy_images(1, jnp.float64))
  leaves, tree = jax.tree.flatten(shapes["params"])
  rng = np.random.default_rng(0)
  return jax.tree.unflatten(tree, [jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype)
                                   for s in leaves])


def _remat_policies(jaxpr) -> list:
  """The policy of every remat (jax.checkpoint) equation of `jaxpr` and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if "remat" in eqn.primitive.name or eqn.primitive.name == "checkpoint":
      found.append(eqn.params["policy"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _remat_policies(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _remat_policies(sub)
  return found


def _compare_policies(loss_of, params, x):
  """loss_of(policy) -> loss(params, x, key) -> (scalar, aux): the loss, aux and gradients
  (with respect to params and x) of every policy equal those without remat, bit for bit; the
  gradient's program has checkpoints of the policy, and none without remat. Returns the
  results without remat and their compiled function (of params, x, key)."""
  key = jax.random.key(2)
  results, compiled = {}, {}
  for policy in ("none",) + POLICIES:
    traced = jax.jit(jax.value_and_grad(loss_of(policy), argnums=(0, 1),
                                        has_aux=True)).trace(params, x, key)
    found = _remat_policies(traced.jaxpr.jaxpr)
    if policy == "none":
      assert not found
    else:
      assert found and all(p is stack.REMAT_POLICIES[policy] for p in found), found
    compiled[policy] = traced.lower().compile()
    results[policy] = compiled[policy](params, x, key)
  for policy in POLICIES:
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(results[policy]),
                            jax.tree.leaves(results["none"])):
      np.testing.assert_array_equal(a, b, err_msg=f"{policy}{jax.tree_util.keystr(path)}")
  return results["none"], compiled["none"]


def test_exact_path_equals_no_remat(x64):
  """The blocks at exact token counts in training (block 0 plain, block 1 fusing, with
  stochastic depth), as ``model(images, train=True)`` runs them."""
  params = _params(_model())
  x = jax.random.normal(jax.random.key(1), (BATCH, 17, 16), jnp.float64)

  def loss_of(policy):
    model = _model(policy)

    def loss(params, x, key):
      out = model.apply({"params": params}, x, model.schedule(), deterministic=False,
                        method=model.run_blocks, rngs={"dropout": key})
      return jnp.sum(jnp.sin(out.tokens_BxTxC)), out.tokens_BxTxC
    return loss

  ((_, tokens), _), run = _compare_policies(loss_of, params, x)
  assert tokens.shape == (BATCH, 15, 16)   # block 1 merged two tokens
  other = run(params, x, jax.random.key(3))[0][1]
  assert not np.array_equal(other, tokens)   # stochastic depth dropped other examples


def test_padded_scan_equals_no_remat(x64):
  """Both blocks fusing on arrays of the full width, one lax.scan over the two
  (``run_blocks_padded`` as the train step runs its teacher), stochastic depth on."""
  model = _model(layers=(0, 1))
  schedule = model.schedule()
  layout = padded.layout_of(schedule, padded.token_grid(17, None))
  assert padded.alike_runs(layout) == [(0, 2)]
  params = _params(model)
  x = jax.random.normal(jax.random.key(1), (BATCH, 17, 16), jnp.float64)

  def loss_of(policy):
    model = _model(policy, layers=(0, 1))

    def loss(params, x, key):
      out = model.apply({"params": params}, x, layout, padded.splits_of(schedule),
                        max_moved=padded.max_moved([schedule]), deterministic=False,
                        method=model.run_blocks_padded, rngs={"dropout": key})
      return jnp.sum(jnp.sin(out.tokens_BxTxC)), out
    return loss

  ((_, out), _), run = _compare_policies(loss_of, params, x)
  assert (np.asarray(out.size_BxT)[:, -4:] == 0).all()   # each block merged two tokens
  other = run(params, x, jax.random.key(3))[0][1]
  assert not np.array_equal(other.tokens_BxTxC, out.tokens_BxTxC)   # stochastic depth


def test_train_step_equals_no_remat(x64):
  """The jitted train step (the shared block, the padded teacher in its switch, the
  student), stochastic depth on, for both r' the teacher draws: the same parameters,
  optimizer state and metrics."""
  steps = {}
  for policy in ("none", "dots_with_no_batch_dims"):
    config = default.get_config()
    config.model.update(dict(TINY, remat_policy=policy))
    config.fusion.update(dict(r=2.0, layers=(1,), teacher_r_max=2.0))
    config.batch_size = 8
    model = mctf_jax.create_model(config)
    tx = optax.adamw(1e-3, weight_decay=0.05)
    steps[policy] = jax.jit(make_train_step(model, tx, config))
  plan = teacher_plan(model, 8)
  assert plan.padded and plan.shared == 1
  params = _params(model)
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((8, 16, 16, 3)),
           "label": rng.integers(0, 10, 8).astype(np.int32)}
  drawn = set()
  for i in range(3):
    drawn.add(plan.value_at(config.seed, i))
    state = TrainState(jnp.asarray(i, jnp.int32), params, tx.init(params), None)
    want, got = [steps[p](state, batch) for p in steps]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b, err_msg=f"step {i}{jax.tree_util.keystr(path)}")
  assert drawn == {0, 1}


@pytest.mark.parametrize("arch", ("deit", "lvvit", "t2t_vit"))   # their own block classes
def test_every_block_class_remats(arch):
  """One checkpoint per block in the training pass of the blocks of each block class
  (big_vision's ViT and the toys use DeiT's)."""
  model = mctf_jax.create_model({
      "model": dict(models.get(arch).TINY, arch=arch, drop_path_rate=0.1,
                    remat_policy="dots_with_no_batch_dims"),
      "fusion": dict(r=2, layers=(1, 2))})
  variables = jax.eval_shape(model.init, jax.random.key(0), model.dummy_images())
  cfg = model.config
  x = jax.ShapeDtypeStruct((2, cfg.num_tokens, cfg.embed_dim), jnp.float32)
  blocks = jax.make_jaxpr(lambda v, x: model.apply(
      v, x, model.schedule(), deterministic=False, method=model.run_blocks,
      rngs={"dropout": jax.random.key(1)}))
  found = _remat_policies(blocks(variables, x).jaxpr)
  assert found == [jax.checkpoint_policies.dots_with_no_batch_dims_saveable] * cfg.depth


def test_bad_policy_is_a_config_error():
  for bad in ("bogus", "everything", None, 1):
    with pytest.raises(ConfigError, match=rf"^model.remat_policy must be one of \('none', "
                                          rf"'full', .*\), got {bad!r}$"):
      mctf_jax.create_model({"model": dict(remat_policy=bad)})
  for arch in tuple(models.names()) + TOYS:
    cls, tiny = models.get(arch).config_class, models.get(arch).TINY
    assert cls(**tiny).remat_policy == "none"
    for name in stack.REMAT_POLICIES:
      assert cls(**tiny, remat_policy=name).remat_policy == name
    with pytest.raises(ConfigError, match="'dot'"):
      cls(**tiny, remat_policy="dot")
  sections = (recipes.deit_model("tiny"), recipes.vit_model("S/16", "gap"),
              recipes.lvvit_model("tiny"), recipes.t2t_vit_model("7"))
  assert [s.remat_policy for s in sections] == ["none"] * 4
