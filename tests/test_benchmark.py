"""Throughput benchmark: the timing loop, the library function and the command line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mctf_jax
from conftest import launch_env, run, tiny_config
from mctf_jax import cost
from mctf_jax.tools import benchmark, flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_time_calls_interleaves_and_repeats():
  order = []

  def make(name):
    def call():
      order.append(name)
      return jnp.zeros(())
    return call

  timings = benchmark.time_calls({"a": make("a"), "b": make("b")}, repeats=3,
                                 seconds_per_call={"a": 0.01, "b": 0.1}, min_repeat_s=0.04,
                                 settle=0)
  # a: ceil(0.04 / 0.01) = 4 calls per repetition, b: 1; repetitions alternate.
  assert order == (["a"] * 4 + ["b"]) * 3
  order.clear()
  benchmark.time_calls({"a": make("a"), "b": make("b")}, repeats=2,
                       seconds_per_call={"a": 0.01, "b": 0.1}, min_repeat_s=0.04, settle=2)
  # Two untimed settling calls start every repetition.
  assert order == (["a"] * 6 + ["b"] * 3) * 2
  assert timings["a"][1] == 4 and timings["b"][1] == 1
  assert all(len(times) == 3 and min(times) > 0 for times, _ in timings.values())
  with pytest.raises(ValueError, match="repeats >= 1"):
    benchmark.time_calls({"a": make("a")}, repeats=0)
  with pytest.raises(ValueError, match="settle=-1"):
    benchmark.time_calls({"a": make("a")}, settle=-1)


@pytest.fixture(scope="module")
def tiny_variables():
  return benchmark.random_variables(mctf_jax.create_model(tiny_config()))


def test_random_variables_fit_the_model(tiny_variables):
  from mctf_jax import convert
  flat = convert.flax_to_torch(tiny_variables["params"], tiny_config())
  want = convert.expected_shapes(tiny_config())
  assert {k: v.shape for k, v in flat.items()} == want


def test_benchmark_forward_tiny(tiny_variables):
  # The plain model (quick to compile); the fused one is timed by the tests below.
  model = mctf_jax.create_model(tiny_config(r=0))
  variables = tiny_variables
  result = benchmark.benchmark_forward(model, variables, 4, repeats=3, warmup=1,
                                       min_repeat_s=0.01)
  assert result["img_per_s"] > 0 and result["batch_size"] == 4
  assert result["img_per_s"] == pytest.approx(4 / result["median_s"])
  assert len(result["times_s"]) == 3 and result["min_s"] <= result["median_s"] <= result["max_s"]
  assert result["compile_s"] > 0 and result["trace_s"] > 0
  assert result["platform"] == jax.devices()[0].platform and result["dtype"] == "float32"
  memory = result["memory"]
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(variables))
  image_bytes = 4 * 32 * 32 * 3 * 4
  assert memory["argument_size_bytes"] >= param_bytes + image_bytes
  assert memory["estimated_peak_bytes"] >= memory["argument_size_bytes"]
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    benchmark.benchmark_forward(model, variables, 0)


def test_compare_bfloat16_and_r_override(tiny_variables):
  config = tiny_config(trace_source=False, layers=(1,))
  config["model"]["dtype"] = "bfloat16"
  result = benchmark.compare(config, tiny_variables, batch_size=2, r=4, repeats=2, warmup=1,
                             min_repeat_s=0)
  fused, plain = result["fused"], result["plain"]
  assert fused["dtype"] == plain["dtype"] == "bfloat16"
  assert (fused["r"], fused["tokens_in"], fused["tokens_out"]) == (4, 65, 61)
  assert (plain["r"], plain["tokens_out"]) == (0, 65)
  expected = cost.count_flops(config, r=4).gflops
  assert fused["gflops"] == pytest.approx(expected)
  assert result["speedup"] == pytest.approx(fused["img_per_s"] / plain["img_per_s"])
  pairs = result["speedup_pairs"]
  assert len(pairs) == fused["repeats"] and pairs == sorted(pairs)
  assert pairs[0] <= result["speedup_quartiles"][1] <= pairs[-1]
  assert result["flop_ratio"] == pytest.approx(plain["gflops"] / fused["gflops"])
  text = benchmark.format_result(result)
  assert "MCTF r=4" in text and "no fusion (r=0)" in text and "speed-up" in text

  none = benchmark.compare(config, tiny_variables, batch_size=2, r=0, repeats=1, warmup=1,
                           min_repeat_s=0)
  assert none["fused"] is None and none["speedup"] is None and none["plain"]["img_per_s"] > 0
  assert "speed-up" not in benchmark.format_result(none)


def test_steps_free_forward_runs_the_blocks_at_the_fused_token_counts(tiny_variables):
  """Its matrix products are the fused forward's but for the fusion steps' own (the cosine
  similarity of each fusing block, merges by scatter): the blocks run at the fused widths.
  Without fusion in the schedule it is the plain forward."""
  model = mctf_jax.create_model(tiny_config(merge_impl="scatter"))
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  steps_free = benchmark.steps_free_forward(model)
  traced = flops.jaxpr_macs(jax.make_jaxpr(steps_free)(tiny_variables, images))
  cosine = sum(((p.tokens_in + 1) // 2) * (p.tokens_in // 2) * 64
               for p in model.schedule().layers if p.fuses)
  assert traced == flops.traced_matmul_flops(model, 2) - 2 * cosine
  plain = model.with_fusion(r=0)
  x = benchmark.random_images(plain, 2)
  want = jax.jit(plain.apply)(tiny_variables, x)
  got = jax.jit(benchmark.steps_free_forward(plain))(tiny_variables, x)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # Probabilities sliced to the kept tokens: the values' products shrink from (T, T) to
  # (O, O) per head in each fusing block, and nothing else changes.
  sliced = flops.jaxpr_macs(jax.make_jaxpr(benchmark.steps_free_forward(model, slice_probs=True))(
      tiny_variables, images))
  head_dim = model.config.embed_dim // model.config.num_heads
  shrink = sum(2 * model.config.num_heads * head_dim * (p.tokens_in ** 2 - p.tokens_out ** 2)
               for p in model.schedule().layers if p.fuses)
  assert shrink > 0 and sliced == traced - shrink
  got = jax.jit(benchmark.steps_free_forward(plain, slice_probs=True))(tiny_variables, x)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="one_step_ahead='off'"):
    benchmark.steps_free_forward(mctf_jax.create_model(tiny_config(one_step_ahead="off")))
  result = benchmark.compare(tiny_config(), tiny_variables, batch_size=2, repeats=2,
                             min_repeat_s=0, warmup=1, steps_free=True)
  free = result["steps_free"]
  assert result["speedup_steps_free"] == pytest.approx(free["img_per_s"] /
                                                       result["plain"]["img_per_s"])
  assert result["steps_share"] == pytest.approx(1 - free["median_s"] /
                                                result["fused"]["median_s"])
  assert "without the fusion steps' own work" in benchmark.format_result(result)


def test_compare_keeps_the_timings_where_the_profile_fails(monkeypatch, tiny_variables):
  from mctf_jax.tools import profiling

  def unreadable(*args, **kwargs):
    raise RuntimeError("no kernel of the trace matched an HLO instruction")
  monkeypatch.setattr(profiling, "profile_call", unreadable)
  result = benchmark.compare(tiny_config(), tiny_variables, batch_size=2, repeats=1,
                             min_repeat_s=0, warmup=1, profile=True)
  assert result["speedup"] > 0 and "profile" not in result["fused"]
  assert "no kernel of the trace matched" in result["fused"]["profile_error"]


def _cli(*args):
  return run(["-m", "mctf_jax.tools.benchmark", *args], launch_env(), timeout=300)


def test_cli_json(tmp_path):
  out = tmp_path / "bench.json"
  # Fusing in one block only (r=8: 65 -> 57 tokens) keeps the compilation short.
  run = _cli("--config=tests/configs/tiny.py", "--config.fusion.layers=(3,)", "--batch_size=4",
             "--repeats=2", "--warmup=1", "--min_repeat_s=0", f"--json={out}")
  assert run.returncode == 0, run.stderr
  lines = run.stdout.splitlines()
  assert any(l.startswith("MCTF r=8") and "65->57" in l for l in lines)
  assert any(l.startswith("no fusion (r=0)") for l in lines)
  assert any(l.startswith("speed-up") and "FLOP ratio 1.0" in l for l in lines)
  data = json.loads(out.read_text())
  for key in ("fused", "plain"):
    row = data[key]
    assert row["img_per_s"] > 0 and row["batch_size"] == 4 and len(row["times_s"]) == 2
    assert row["compile_s"] > 0 and row["memory"]["estimated_peak_bytes"] > 0
  assert data["speedup"] == pytest.approx(data["fused"]["img_per_s"] / data["plain"]["img_per_s"])
  assert data["flop_ratio"] > 1 and data["num_devices"] >= 1


def test_cli_bad_values():
  run = _cli("--config=tests/configs/tiny.py", "--batch_size=0")
  assert run.returncode == 1 and "--batch_size must be >= 1" in run.stderr
  run = _cli("--config=tests/configs/tiny.py", "--r=2.5")
  assert run.returncode == 1 and "token count and must be a whole number" in run.stderr
  assert "Traceback" not in run.stderr
  run = _cli("--config=tests/configs/tiny.py", "--json=/nonexistent/bench.json")
  assert run.returncode == 1 and "the directory /nonexistent does not exist" in run.stderr
