"""The pure fusion functions: an independent NumPy re-implementation of the reference's
gather/scatter matching, invariants, and the one-step-ahead attention identity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mctf_jax import fusion
from mctf_jax.fusion import matching


def reference_fuse(x, size, scores, r_ab, r_ba, bidirectional):
  """The official merge for one example, written as its gathers and scatter-adds."""
  order = np.argsort(-scores.max(-1), kind="stable")
  best_b = scores.argmax(-1)
  src, unm = order[:r_ab], np.sort(order[r_ab:])
  xs, ss = x * size[:, None], size.copy()
  dst_x, dst_s = xs[1::2].copy(), ss[1::2].copy()
  for i in src:
    dst_x[best_b[i]] += xs[0::2][i]
    dst_s[best_b[i]] += ss[0::2][i]
  unm_x, unm_s = xs[0::2][unm].copy(), ss[0::2][unm].copy()
  if bidirectional:
    sub = scores[unm].T                      # (B, unmerged A)
    order2 = np.argsort(-sub.max(-1), kind="stable")
    best_a = sub.argmax(-1)
    for j in order2[:r_ba]:
      unm_x[best_a[j]] += dst_x[j]
      unm_s[best_a[j]] += dst_s[j]
    out_x = np.concatenate([unm_x, dst_x[order2[r_ba:]]])
    out_s = np.concatenate([unm_s, dst_s[order2[r_ba:]]])
  else:
    out_x, out_s = np.concatenate([unm_x, dst_x]), np.concatenate([unm_s, dst_s])
  return out_x / out_s[:, None], out_s


def _random_case(seed, batch=3, tokens=21, channels=5):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, tokens, channels))
  size = rng.integers(1, 4, (batch, tokens)).astype(np.float64)
  received = rng.uniform(0.01, 0.2, (batch, tokens))
  return x, size, received


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("tokens,r,impl,num_protected", [
    (21, 6, "scatter", 1), (20, 9, "scatter", 1), (17, 1, "scatter", 1), (65, 8, "scatter", 1),
    (21, 6, "matmul", 1), (20, 9, "matmul", 1), (17, 1, "matmul", 1), (65, 8, "matmul", 1),
    (21, 6, "scatter", 0), (20, 9, "scatter", 0)])
def test_matches_reference_merge(bidirectional, tokens, r, impl, num_protected, x64):
  """With a class token (protected, its row -inf) and without one (nothing protected)."""
  x, size, received = _random_case(tokens + r, tokens=tokens)
  scores = fusion.matching_scores(jnp.asarray(x), attn_received_BxT=jnp.asarray(received),
                                  size_BxT=jnp.asarray(size), num_protected=num_protected)
  assert np.isneginf(np.asarray(scores)[:, 0]).all() == (num_protected == 1)
  r_ab, r_ba = (r // 2, r - r // 2) if bidirectional else (r, 0)
  match = fusion.bipartite_matching(scores, r_ab=r_ab, r_ba=r_ba, bidirectional=bidirectional,
                                    num_protected=num_protected)
  assert match.num_out == tokens - r
  out, out_size, _, _ = fusion.fuse_tokens(jnp.asarray(x), jnp.asarray(size), match,
                                           pooling="size", impl=impl)
  for b in range(x.shape[0]):
    want_x, want_s = reference_fuse(x[b], size[b], np.asarray(scores[b]), r_ab, r_ba,
                                    bidirectional)
    np.testing.assert_allclose(out[b], want_x, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out_size[b], want_s)


def test_dest_is_a_valid_fusion_map():
  x, size, received = _random_case(0, batch=4, tokens=65)
  scores = fusion.matching_scores(jnp.asarray(x, jnp.float32),
                                  attn_received_BxT=jnp.asarray(received))
  match = fusion.bipartite_matching(scores, r_ab=4, r_ba=5)
  dest, anchor = np.asarray(match.dest_BxT), np.asarray(match.anchor_BxO)
  moved, moved_dest = np.asarray(match.moved_BxR), np.asarray(match.moved_dest_BxR)
  out = 65 - 9
  assert dest.min() >= 0 and dest.max() < out
  for b in range(4):
    assert set(dest[b]) == set(range(out))     # every output token holds something
    assert dest[b, 0] == 0                     # the class token stays first...
    assert np.sum(dest[b] == 0) == 1           # ...and alone
    # anchors and moved tokens partition the input; each anchor keeps its own place.
    assert sorted(anchor[b].tolist() + moved[b].tolist()) == list(range(65))
    np.testing.assert_array_equal(dest[b, anchor[b]], np.arange(out))
    np.testing.assert_array_equal(dest[b, moved[b]], moved_dest[b])
  for impl in ("scatter", "matmul"):
    fused_size = np.asarray(fusion.merge_sum(jnp.ones((4, 65)), match, impl))
    np.testing.assert_array_equal(fused_size.sum(-1), 65)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_protected", [2, 3])
def test_protected_tokens_keep_their_places(num_protected, bidirectional):
  """More protected tokens (a class and a distillation token, registers): they stay in
  front, alone, and the others match as they would behind two fewer protected tokens."""
  rng = np.random.default_rng(num_protected)
  tokens, r = 23, 8
  scores = np.asarray(fusion.matching_scores(jnp.asarray(rng.standard_normal((3, tokens, 6))),
                                             num_protected=num_protected))
  protected_a, protected_b = (num_protected + 1) // 2, num_protected // 2
  assert np.isneginf(scores[:, :protected_a]).all()
  assert np.isneginf(scores[:, :, :protected_b]).all()
  assert np.isfinite(scores[:, protected_a:, protected_b:]).all()
  r_ab, r_ba = (r // 2, r - r // 2) if bidirectional else (r, 0)
  match = fusion.bipartite_matching(jnp.asarray(scores), r_ab=r_ab, r_ba=r_ba,
                                    bidirectional=bidirectional, num_protected=num_protected)
  dest, anchor = np.asarray(match.dest_BxT), np.asarray(match.anchor_BxO)
  np.testing.assert_array_equal(dest[:, :num_protected], np.broadcast_to(
      np.arange(num_protected), (3, num_protected)))
  np.testing.assert_array_equal(anchor[:, :num_protected], dest[:, :num_protected])
  for b in range(3):   # nothing else is sent to a protected token
    assert set(dest[b, num_protected:]).isdisjoint(range(num_protected))
  assert (np.asarray(match.moved_BxR) >= num_protected).all()
  # The first A and B rows/columns out, two protected tokens fewer: the same matching.
  fewer = fusion.bipartite_matching(jnp.asarray(scores[:, 1:, 1:]), r_ab=r_ab, r_ba=r_ba,
                                    bidirectional=bidirectional,
                                    num_protected=num_protected - 2)
  np.testing.assert_array_equal(dest[:, 2:], np.asarray(fewer.dest_BxT) + 2)
  np.testing.assert_array_equal(anchor[:, 2:], np.asarray(fewer.anchor_BxO) + 2)
  np.testing.assert_array_equal(match.moved_BxR, np.asarray(fewer.moved_BxR) + 2)
  np.testing.assert_array_equal(match.moved_dest_BxR, np.asarray(fewer.moved_dest_BxR) + 2)


def test_scores_criteria_and_protection():
  x, size, received = _random_case(1, batch=2, tokens=9)
  full = fusion.matching_scores(jnp.asarray(x), attn_received_BxT=jnp.asarray(received),
                                size_BxT=jnp.asarray(size), tau_sim=1, tau_info=20, tau_size=40)
  assert np.all(np.isneginf(full[:, 0]))
  sim_only = fusion.matching_scores(jnp.asarray(x), tau_info=0, tau_size=0)
  a = x[:, ::2] / np.linalg.norm(x[:, ::2], axis=-1, keepdims=True)
  b = x[:, 1::2] / np.linalg.norm(x[:, 1::2], axis=-1, keepdims=True)
  want = (np.einsum("bic,bjc->bij", a, b) + 1) / 2
  np.testing.assert_allclose(sim_only[:, 1:], want[:, 1:], rtol=1e-6)
  # Without the size input the size criterion is left out (sizes are all one).
  no_size = fusion.matching_scores(jnp.asarray(x), attn_received_BxT=jnp.asarray(received))
  ones = fusion.matching_scores(jnp.asarray(x), attn_received_BxT=jnp.asarray(received),
                                size_BxT=jnp.ones((2, 9)))
  np.testing.assert_allclose(no_size[:, 1:], ones[:, 1:], rtol=1e-6)


def test_equal_and_zero_tokens_give_no_nan():
  x = jnp.ones((2, 33, 8))
  x = x.at[1, 5].set(0.0)  # a zero token too
  scores = fusion.matching_scores(x, attn_received_BxT=jnp.full((2, 33), 1 / 33),
                                  size_BxT=jnp.ones((2, 33)))
  assert not np.any(np.isnan(scores))
  match = fusion.bipartite_matching(scores, r_ab=7, r_ba=8)
  out, size, _, _ = fusion.fuse_tokens(x, jnp.ones((2, 33)), match)
  assert np.all(np.isfinite(out)) and np.all(np.asarray(size).sum(-1) == 33)


def explicit_merged_attention(probs, dest, weights, num_out, pooling):
  """The reference's way: sum key columns per group, then pool the query rows per group."""
  b, h, t, _ = probs.shape
  onehot = np.zeros((b, num_out, t))
  for i in range(b):
    onehot[i, dest[i], np.arange(t)] = 1
  cols = np.einsum("bhqk,bok->bhqo", probs, onehot)
  if pooling == "max":
    out = np.full((b, h, num_out, num_out), -np.inf)
    for i in range(b):
      for q in range(t):
        out[i, :, dest[i, q]] = np.maximum(out[i, :, dest[i, q]], cols[i, :, q])
    return out
  rows = np.einsum("bhqo,bpq->bhpo", cols * weights[:, None, :, None], onehot)
  return rows / np.einsum("bq,bpq->bp", weights, onehot)[:, None, :, None]


@pytest.mark.parametrize("pooling", ["size", "attn", "mean", "max"])
@pytest.mark.parametrize("impl", ["scatter", "matmul"])
def test_one_step_ahead_equals_merging_the_map(pooling, impl, x64):
  rng = np.random.default_rng(3)
  b, h, t, d, r = 2, 3, 17, 4, 5
  probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((b, h, t, t))), axis=-1)
  x, size, _ = _random_case(4, batch=b, tokens=t)
  received = fusion.attention_received(probs)
  scores = fusion.matching_scores(jnp.asarray(x), attn_received_BxT=received,
                                  size_BxT=jnp.asarray(size))
  match = fusion.bipartite_matching(scores, r_ab=2, r_ba=3)
  _, _, weights, norm = fusion.fuse_tokens(jnp.asarray(x), jnp.asarray(size), match,
                                           pooling=pooling, attn_received_BxT=received,
                                           impl=impl)
  v = jnp.asarray(rng.standard_normal((b, h, t - r, d)))
  got = fusion.merged_attention_output(probs, v, match, weights, norm, impl=impl)
  merged = explicit_merged_attention(np.asarray(probs), np.asarray(match.dest_BxT),
                                     None if weights is None else np.asarray(weights), t - r,
                                     pooling)
  want = np.einsum("bhqk,bhkd->bqhd", merged, np.asarray(v))
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_pooling_modes():
  x = jnp.asarray([[[0.0], [1.0], [2.0], [10.0], [4.0]]])
  # Tokens 2 and 3 merge into token 1: dest [0, 1, 1, 1, 2].
  match = fusion.Matching(dest_BxT=jnp.asarray([[0, 1, 1, 1, 2]]),
                          anchor_BxO=jnp.asarray([[0, 1, 4]]), moved_BxR=jnp.asarray([[2, 3]]),
                          moved_dest_BxR=jnp.asarray([[1, 1]]))
  size = jnp.asarray([[1.0, 1.0, 3.0, 1.0, 1.0]])
  received = jnp.asarray([[0.2, 0.1, 0.4, 0.2, 0.1]])
  fused = {p: fusion.fuse_tokens(x, size, match, pooling=p, attn_received_BxT=received)
           for p in ("size", "attn", "mean", "max")}
  np.testing.assert_allclose(fused["size"][0][0, 1, 0], (1 + 6 + 10) / 5)
  np.testing.assert_allclose(fused["mean"][0][0, 1, 0], 13 / 3)
  np.testing.assert_allclose(fused["max"][0][0, 1, 0], 10)
  w = np.array([0.1 * 1 / 3, 0.4 * 3 / 3, 0.2 * 1 / 3])
  np.testing.assert_allclose(fused["attn"][0][0, 1, 0], (w @ [1, 2, 10]) / w.sum(), rtol=1e-6)
  for p, (_, s, _, _) in fused.items():
    np.testing.assert_array_equal(s, [[1.0, 5.0, 1.0]])


def test_source_tracking():
  dest1 = jnp.asarray([[0, 1, 1, 2, 3]])          # 5 -> 4 tokens
  dest2 = jnp.asarray([[0, 1, 1, 2]])             # 4 -> 3 tokens
  token_map = jnp.arange(5)[None]
  token_map = fusion.update_token_map(fusion.update_token_map(token_map, dest1), dest2)
  np.testing.assert_array_equal(token_map, [[0, 1, 1, 1, 2]])
  source = fusion.source_map(token_map, 3)
  np.testing.assert_array_equal(source[0], [[1, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 1]])


@pytest.mark.parametrize("axis", [-1, 1])
def test_max_argmax_equals_jnp_with_ties_and_inf(axis):
  """The two-reduction argmax gives jnp.argmax's first index, ties and -inf rows included."""
  rng = np.random.default_rng(axis + 5)
  values = rng.integers(0, 4, (3, 7, 6)).astype(np.float32)   # many ties
  values[:, 0, :] = -np.inf                                   # a protected row
  values[1, :, 2] = -np.inf
  top, index = jax.jit(lambda v: matching.max_argmax(v, axis=axis))(values)
  np.testing.assert_array_equal(top, np.max(values, axis=axis))
  np.testing.assert_array_equal(index, np.argmax(values, axis=axis))
  assert index.dtype == jnp.int32
  hits = rng.random((4, 5, 9)) < 0.2
  hits[0, 0] = False                                          # no hit: 0, as argmax
  np.testing.assert_array_equal(matching.first_index(jnp.asarray(hits)), np.argmax(hits, axis=-1))
