"""Fusion at padded shapes (the train step's paths) against the exact-shape fusion and the
golden outputs of the official code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mctf_jax
from mctf_jax import convert, fusion
from mctf_jax.config import ConfigError
from mctf_jax.fusion import padded
from conftest import (EVAL_CASES, TRAIN_CASES, golden_config, golden_images, golden_state_dict,
                      init_variables, load_golden)

PRECISIONS = {"f64": ("float64", 1e-9), "f32": ("float32", 1e-4)}


def test_grid_and_layout():
  assert padded.token_grid(17, 4) == (17, 13, 9, 5, 1)
  assert padded.token_grid(17, 4, exact=(17, 15, 13)) == (17, 15, 13, 9, 5, 1)
  assert padded.pad_width(14, (17, 15, 13)) == 15
  assert padded.pad_width(15, (17, 15, 13)) == 15
  with pytest.raises(ValueError, match="holds 18 tokens"):
    padded.pad_width(18, (17, 15))
  with pytest.raises(ValueError, match="positive integer or None, got 0"):
    padded.token_grid(17, 0)
  model = mctf_jax.create_model({"model": dict(img_size=16, patch_size=4, embed_dim=32,
                                               depth=3, num_heads=2, num_classes=10),
                                 "fusion": dict(r=2, layers=(1, 2))})
  schedule = model.schedule(1)        # 17 -> 17 -> 16 -> 15 tokens
  layout = padded.layout_of(schedule, (17, 15, 13))
  assert layout.widths == (17, 17, 17, 15) and layout.fuses == (False, True, True)
  np.testing.assert_array_equal(padded.splits_of(schedule), [[0, 0], [0, 1], [0, 1]])
  assert padded.max_moved([schedule, model.schedule(2)]) == 2


def test_train_token_step_is_checked():
  for bad in (-1, 2.5, "16"):
    with pytest.raises(ConfigError, match=f"train_token_step must be None .*got {bad!r}"):
      mctf_jax.create_model({"model": {}, "fusion": dict(train_token_step=bad)})
  assert padded.token_grid(197, None) == (197,)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("real,width,num_protected", [(17, 17, 1), (13, 17, 1), (12, 21, 1),
                                                      (13, 17, 0), (12, 21, 2)])
def test_matching_equals_exact_on_real_tokens(bidirectional, real, width, num_protected):
  """Random scores of `real` tokens inside an array of `width`: the same destinations,
  anchors and merges as the exact matching of the real tokens alone."""
  rng = np.random.default_rng(real + width)
  batch, channels = 3, 8
  metric = rng.standard_normal((batch, width, channels)).astype(np.float32)
  size = rng.integers(1, 4, (batch, width)).astype(np.float32)
  received = rng.uniform(0.01, 1, (batch, width)).astype(np.float32)
  valid = np.arange(width)[None, :] < real
  size = np.where(valid, size, 0)
  n = (real - num_protected) // 2
  r_ab, r_ba = (n // 2, n - n // 2) if bidirectional else (n, 0)
  exact_scores = fusion.matching_scores(metric[:, :real], attn_received_BxT=received[:, :real],
                                        size_BxT=size[:, :real], num_protected=num_protected)
  exact = fusion.bipartite_matching(exact_scores, r_ab=r_ab, r_ba=r_ba,
                                    bidirectional=bidirectional, num_protected=num_protected)
  scores = fusion.matching_scores(metric, attn_received_BxT=received,
                                  size_BxT=np.where(valid, size, 1), num_protected=num_protected,
                                  valid_BxT=jnp.asarray(np.broadcast_to(valid, (batch, width))))
  np.testing.assert_allclose(np.asarray(scores)[:, :(real + 1) // 2, :real // 2],
                             np.asarray(exact_scores), rtol=1e-6)
  assert np.isneginf(np.asarray(scores)[:, (real + 1) // 2:]).all()
  assert np.isneginf(np.asarray(scores)[:, :, real // 2:]).all()
  num_out = real - r_ab - r_ba + 2       # two padding slots in the output
  match, valid_out = jax.jit(lambda s, v, a, b: fusion.bipartite_matching_padded(
      s, v, a, b, num_in=width, num_out=num_out, max_moved=n + 3, bidirectional=bidirectional,
      num_protected=num_protected))(scores, jnp.broadcast_to(valid, (batch, width)), r_ab, r_ba)
  out = real - r_ab - r_ba
  np.testing.assert_array_equal(valid_out, np.broadcast_to(np.arange(num_out) < out,
                                                           (batch, num_out)))
  np.testing.assert_array_equal(np.asarray(match.dest_BxT)[:, :real], exact.dest_BxT)
  np.testing.assert_array_equal(np.asarray(match.anchor_BxO)[:, :out], exact.anchor_BxO)
  moved = np.asarray(match.moved_BxR)
  np.testing.assert_array_equal(moved[:, :r_ab + r_ba], exact.moved_BxR)
  np.testing.assert_array_equal(np.asarray(match.moved_dest_BxR)[:, :r_ab + r_ba],
                                exact.moved_dest_BxR)
  assert (np.asarray(match.moved_dest_BxR)[:, r_ab + r_ba:] >= num_out).all()   # dropped
  # Merging real tokens with the padded fusion gives the exact merge.
  x = rng.standard_normal((batch, width, channels)).astype(np.float32)
  got = fusion.fuse_tokens(x, size, match, pooling="size")
  want = fusion.fuse_tokens(x[:, :real], size[:, :real], exact, pooling="size")
  np.testing.assert_allclose(np.asarray(got[0])[:, :out], want[0], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(got[1])[:, :out], want[1])


def _golden_padded(case, prec, step, merge_impl="scatter"):
  meta, data = load_golden(case)
  dtype, tol = PRECISIONS[prec]
  config = golden_config(meta, dtype, merge_impl=merge_impl)
  model = mctf_jax.create_model(config)
  params = convert.torch_to_flax(golden_state_dict(data), config)
  if case in TRAIN_CASES:   # the teacher path, at the r' of the golden step
    schedule = model.schedule(meta["train"]["teacher_r"])
    want = data[f"{prec}/x_teacher"]
  else:
    schedule = model.schedule()
    want = data[f"{prec}/logits"]
  layout = padded.layout_of(schedule, padded.token_grid(model.config.num_tokens, step))

  def run(params, images, splits, first):
    x = model.apply({"params": params}, images, method=model.embed)
    out = model.apply({"params": params}, x, layout, splits, first=first,
                      max_moved=padded.max_moved([schedule]), method=model.run_blocks_padded)
    return model.apply({"params": params}, out.tokens_BxTxC, out.size_BxT,
                       method=model.classify), out
  logits, out = jax.jit(run)(params, golden_images(data, dtype), padded.splits_of(schedule),
                             jnp.int32(0))
  return data, schedule, layout, logits, out, want, tol


# Float64, where the padded path is compared at rounding level (float32: the exact path's
# golden tests, and the padded path equals the exact one).
@pytest.mark.parametrize("prec", ["f64"])
@pytest.mark.parametrize("case", EVAL_CASES + TRAIN_CASES)
def test_padded_logits_equal_golden(case, prec, x64):
  """Grid step 3 pads most layers; 64 runs every block at the full 65 tokens."""
  for step in (3, 64):
    data, schedule, layout, logits, out, want, tol = _golden_padded(case, prec, step)
    assert layout.widths[-1] >= schedule.tokens_out
    np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=tol, err_msg=str(step))
    size = np.asarray(out.size_BxT)
    assert (size[:, schedule.tokens_out:] == 0).all()
    if case not in TRAIN_CASES:
      np.testing.assert_array_equal(size[:, :schedule.tokens_out], data[f"{prec}/size"])
    assert np.isfinite(np.asarray(out.tokens_BxTxC)).all()


def test_padded_matmul_merge_equals_golden(x64):
  *_, logits, _, want, tol = _golden_padded("tiny_default", "f64", 3, merge_impl="matmul")
  np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=tol)


def test_blocks_share_kernels():
  """Blocks that fuse at the same widths compile to the same kernels: the merge counts
  are runtime values (not constants folded into each block's kernels)."""
  config = {"model": dict(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2,
                          num_classes=10),
            "fusion": dict(r=1, layers=(1, 2, 3, 4, 5))}
  model = mctf_jax.create_model(config)
  schedule = model.schedule()
  layout = padded.layout_of(schedule, padded.token_grid(65, 64))   # every width 65
  assert set(layout.widths) == {65}
  variables = init_variables(model)

  def run(variables, x, splits, first):
    return model.apply(variables, x, layout, splits, first=first, max_moved=1, scan=False,
                       method=model.run_blocks_padded).tokens_BxTxC
  hlo = jax.jit(run).lower(variables, jnp.zeros((2, 65, 32)), padded.splits_of(schedule),
                           jnp.int32(0)).compile().as_text()
  # Every fused computation that mentions blocks 2..4 has a twin in another block.
  import collections
  import re
  bodies = collections.defaultdict(list)
  for comp in re.split(r"\n(?=\S)", hlo):
    head = comp.split("\n", 1)
    if len(head) < 2 or "fused" not in head[0]:
      continue
    blocks = set(re.findall(r"blocks_(\d+)", head[1]))
    body = re.sub(r", metadata=\{[^}]*\}", "", re.sub(r"%[\w.\-]+", "%x", head[1]))
    bodies[body].append(blocks)
  lonely = [blocks for group in bodies.values() if len(group) == 1 for blocks in group
            if blocks & {"2", "3", "4"}]
  assert not lonely, f"{len(lonely)} kernels of blocks 2-4 have no twin"


def test_alike_runs():
  layout = padded.PaddedLayout((65, 65, 65, 65, 49, 49, 49, 49), (False, True, True, True, False,
                                                              False, True))
  # Block 3 narrows the array: a run of its own; 4-5 do not fuse, 6 does.
  assert padded.alike_runs(layout) == [(0, 1), (1, 3), (3, 4), (4, 6), (6, 7)]
  assert padded.alike_runs(layout, start=2) == [(2, 3), (3, 4), (4, 6), (6, 7)]
  assert padded.alike_runs(padded.PaddedLayout((9, 7, 5), (True, True))) == [(0, 1), (1, 2)]


def test_scanned_blocks_equal_unrolled():
  """Alike padded blocks run as one lax.scan (several runs of them) give the unrolled
  blocks' tokens and gradients, stochastic depth included (the same keys, its rate a
  run-time value)."""
  deterministic = False
  config = {"model": dict(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2,
                          num_classes=10, drop_path_rate=0.5),
            "fusion": dict(r=3, layers=(1, 2, 3, 5))}
  model = mctf_jax.create_model(config)
  schedule = model.schedule()
  layout = padded.layout_of(schedule, padded.token_grid(65, None))
  assert padded.alike_runs(layout, 1) == [(1, 4), (4, 5), (5, 6)]
  params = init_variables(model)["params"]
  x = jax.random.normal(jax.random.key(1), (8, 65, 32))

  def run(params, scan):
    out = model.apply({"params": params}, x, layout, padded.splits_of(schedule), max_moved=3,
                      start=1, scan=scan, deterministic=deterministic,
                      method=model.run_blocks_padded, rngs={"dropout": jax.random.key(2)})
    return jnp.sum(out.tokens_BxTxC[:, 0] ** 2), out

  (_, unrolled), g_unrolled = jax.jit(jax.value_and_grad(lambda p: run(p, False),
                                                         has_aux=True))(params)
  (_, scanned), g_scanned = jax.jit(jax.value_and_grad(lambda p: run(p, True),
                                                       has_aux=True))(params)
  np.testing.assert_array_equal(scanned.size_BxT, unrolled.size_BxT)
  np.testing.assert_allclose(scanned.tokens_BxTxC, unrolled.tokens_BxTxC, atol=2e-5)
  for a, b in zip(jax.tree.leaves(g_scanned), jax.tree.leaves(g_unrolled)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  if not deterministic:   # stochastic depth did drop something
    still = jax.jit(lambda p: model.apply({"params": p}, x, layout, padded.splits_of(schedule),
                                          max_moved=3, start=1,
                                          method=model.run_blocks_padded))(params)
    assert float(jnp.max(jnp.abs(still.tokens_BxTxC - scanned.tokens_BxTxC))) > 0.1


def test_padded_step_reads_the_attention_received_from_the_probabilities_as_they_come():
  """In a 16-bit model the padded step (the train step's) reads the attention each token
  receives from the float32 probabilities, not from a 16-bit copy of them (one more (T, T)
  map per fusing block in a train step on TPUs)."""
  from mctf_jax.fusion.steps import PaddedStep, TokenState
  rng = np.random.default_rng(0)
  batch, tokens, heads, channels, r = 2, 9, 2, 8, 2
  x = jnp.asarray(rng.standard_normal((batch, tokens, channels)), jnp.bfloat16)
  size = jnp.ones((batch, tokens), jnp.float32).at[:, -1].set(0)   # one padding token
  probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((batch, heads, tokens, tokens)),
                                     jnp.float32) + jnp.log(size)[:, None, None, :], axis=-1)
  step = PaddedStep(config=fusion.FusionConfig(r=r, pooling="attn"), fuses=True,
                    splits=jnp.asarray([r // 2, r - r // 2]), width_out=tokens - r,
                    fusion_width=tokens, max_moved=r)
  _, merge = step(TokenState(x, size, None), x, probs)
  valid = size > 0

  def weights(received):
    received = jnp.asarray(received).astype(jnp.float32)
    return np.asarray(received * size / jnp.max(size, axis=-1, keepdims=True))

  read = fusion.attention_received(probs, valid)
  rounded = fusion.attention_received(probs.astype(jnp.bfloat16), valid)
  assert not np.allclose(weights(read), weights(rounded), rtol=1e-4, atol=0)
  np.testing.assert_allclose(np.asarray(merge.weights_BxT), weights(read), rtol=1e-6)
