"""Profile attribution (mctf_jax.tools.profiling) and the benchmark scripts under benchmarks/."""

import json
import os
import time

import jax
import pytest

import mctf_jax
from conftest import launch_env, run, tiny_config
from mctf_jax.tools import benchmark, profiling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("op_name,part", [
    ("jit(f)/DeiT/blocks_3/vit_qk_softmax/attn.probs/qkv.qk/dot_general",
     "attention/qk+softmax"),
    ("jit(f)/DeiT/blocks_3/vit_probs_v/dot_general", "attention/probs@v"),
    ("jit(f)/DeiT/blocks_3/vit_probs_v/transpose", "attention/probs@v"),
    ("jit(f)/DeiT/blocks_3/vit_values/attn.values/dot_general", "attention/v"),
    ("jit(f)/DeiT/blocks_3/vit_proj/attn.output/proj/dot_general", "attention/proj"),
    ("jit(f)/DeiT/blocks_3/vit_mlp/mlp/fc1/dot_general", "mlp"),
    ("jit(f)/transpose(jvp(DeiT))/blocks_3/vit_mlp/mlp/fc1/dot_general", "mlp/bwd"),
    ("jit(f)/DeiT/blocks_3/vit_norm/norm2/reduce_sum", "norm"),
    ("jit(f)/DeiT/blocks_3/mctf_merge/reduce_sum", "fusion/merge"),
    ("jit(f)/DeiT/blocks_3/mctf_scores/mctf_matching/argmax", "fusion/matching"),
    ("jit(f)/transpose(jvp(DeiT))/blocks_1/mctf_attn_merge/mul", "fusion/attn_merge/bwd"),
    # A fusion step inside a part counts for the fusion.
    ("jit(f)/DeiT/blocks_1/vit_qk_softmax/mctf_scores/mul", "fusion/scores"),
    ("jit(f)/DeiT.embed/vit_embed/patch_embed/proj/conv", "embed"),
    ("jit(f)/DeiT.classify/vit_head/head/dot_general", "head"),
    # Module, class and method names alone attribute nothing: only the scopes do.
    ("jit(f)/VisionTransformer.embed/patch_embed/proj/conv", "other"),
    ("jit(f)/T2TViT/blocks_3/attn.probs/mlp/norm1/dot_general", "other"),
    ("jit(f)/add", "other"),
])
def test_part_of(op_name, part):
  assert profiling.part_of(op_name) == part


def test_instruction_parts_of_unnamed_instructions():
  # XLA's own instructions (no op_name) take the part of their first named user, through
  # chains of unnamed ones; one used by nothing named stays out.
  hlo = "\n".join([
      '%wrapped_reduce-window.5 = s32[4,2]{1,0} fusion(%p.1), kind=kLoop, calls=%c.5',
      '%copy.2 = s32[4,2]{1,0} copy(%wrapped_reduce-window.5)',
      '%wrapped_reduce.4 = s32[4]{0} fusion(%copy.2), kind=kLoop, calls=%c.4, '
      'metadata={op_name="jit(f)/VisionTransformer/blocks_1/mctf_matching/reduce_min"}',
      'ROOT %fusion.7 = f32[4,8]{1,0} fusion(%p.2), kind=kLoop, calls=%c.7, '
      'metadata={op_name="jit(f)/transpose(jvp(DeiT))/blocks_1/vit_mlp/mlp/add"}',
      '%orphan.1 = f32[4]{0} copy(%p.3)',
  ])
  parts = profiling.instruction_parts(hlo)
  assert parts == {"wrapped_reduce.4": "fusion/matching", "copy.2": "fusion/matching",
                   "wrapped_reduce-window.5": "fusion/matching", "fusion.7": "mlp/bwd"}


def test_profile_of_a_fused_forward():
  model = mctf_jax.create_model(tiny_config())
  variables = benchmark.random_variables(model)
  images = benchmark.random_images(model, 4)
  compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).compile()
  prof = profiling.profile_call(compiled, lambda: compiled(variables, images), iters=2)
  parts = prof["parts"]
  assert prof["kernel_s"] > 0 and prof["wall_s"] > 0
  assert abs(sum(parts.values()) - prof["kernel_s"]) < 1e-9
  # Every fusion step and the main parts of the transformer show up.
  for part in ("fusion/scores", "fusion/matching", "fusion/merge", "fusion/attn_merge",
               "attention/qk+softmax", "attention/probs@v", "mlp"):
    assert parts.get(part, 0) > 0, (part, parts)
  assert 0 < profiling.fusion_share(prof) < 1
  text = profiling.format_profile(prof, "tiny: ")
  assert text.startswith("tiny: wall") and "fusion/merge" in text
  # Without fusion, nothing is attributed to it.
  plain = model.with_fusion(r=0)
  compiled = jax.jit(lambda v, x: plain.apply(v, x)).lower(variables, images).compile()
  prof = profiling.profile_call(compiled, lambda: compiled(variables, images), iters=1)
  assert profiling.fusion_share(prof) == 0
  with pytest.raises(ValueError, match="iters must be >= 1"):
    profiling.profile_call(compiled, lambda: compiled(variables, images), iters=0)


def _plane(space, name, lines):
  """Adds a trace plane: lines {line name: [(event name, display name, seconds,
  hlo_op stat or None)]}."""
  plane = space.planes.add(name=name)
  plane.stat_metadata[1].id, plane.stat_metadata[1].name = 1, "hlo_op"
  for line_name, events in lines.items():
    line = plane.lines.add(name=line_name)
    for name, display, seconds, hlo_op in events:
      meta_id = len(plane.event_metadata) + 1
      meta = plane.event_metadata[meta_id]
      meta.id, meta.name, meta.display_name = meta_id, name, display
      event = line.events.add(metadata_id=meta_id, duration_ps=int(seconds * 1e12))
      if hlo_op:  # as GPU traces intern it: a reference to a stat metadata entry's name
        stat_id = len(plane.stat_metadata) + 1
        plane.stat_metadata[stat_id].id, plane.stat_metadata[stat_id].name = stat_id, hlo_op
        event.stats.add(metadata_id=1, ref_value=stat_id)
  return plane


def test_kernel_events_of_accelerator_traces():
  """GPU kernels are named by their kernel (sanitised fusion names, cuBLAS's): their
  instruction is the hlo_op stat; TPU ops by the metadata; host events do not count beside
  a device plane, nor kernel lines beside a derived "XLA Ops" line. (Built traces: no real
  GPU or TPU trace was available.)"""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  instructions = {"fusion.1": "mlp", "custom-call.2": "mlp", "fusion.3": "fusion/merge"}
  host = {"thread": [("fusion.1", "", 5.0, None)]}
  gpu = xplane_pb2.XSpace()
  _plane(gpu, "/host:CPU", host)
  _plane(gpu, "/device:GPU:0", {"Stream #13": [
      ("loop_add_fusion_1", "", 1.0, "fusion.1"),
      ("sm90_xmma_gemm_f32f32_tn", "", 2.0, "custom-call.2"),
      ("input_reduce_fusion_3", "", 0.5, "fusion.3"),
      ("memcpy", "", 0.25, None)]})
  assert sorted(profiling.kernel_events(gpu, instructions)) == [
      ("custom-call.2", 2.0), ("fusion.1", 1.0), ("fusion.3", 0.5), ("memcpy", 0.25)]
  derived = xplane_pb2.XSpace()
  _plane(derived, "/device:GPU:0", {
      "Stream #13": [("loop_add_fusion_1", "", 1.0, "fusion.1")],
      "XLA Ops": [("fusion.1", "", 1.0, None)]})
  assert list(profiling.kernel_events(derived, instructions)) == [("fusion.1", 1.0)]
  tpu = xplane_pb2.XSpace()
  _plane(tpu, "/device:TPU:0", {"XLA Ops": [("fusion.3.1", "%fusion.3", 0.75, None)]})
  assert list(profiling.kernel_events(tpu, instructions)) == [("fusion.3", 0.75)]
  # XLA:CPU: kernels are host events named by their instruction.
  cpu = xplane_pb2.XSpace()
  _plane(cpu, "/host:CPU", host)
  assert list(profiling.kernel_events(cpu, instructions)) == [("fusion.1", 5.0)]


def test_compile_profile_of_a_fused_forward():
  model = mctf_jax.create_model(tiny_config())
  variables = benchmark.random_variables(model)
  images = benchmark.random_images(model, 4)
  # A constant of its own keeps the program out of the test session's compilation cache.
  nonce = float(time.time_ns() % 999_983) + 1.0
  profiles = {}
  for name, m in (("fused", model), ("plain", model.with_fusion(r=0))):
    lowered = jax.jit(lambda v, x, m=m: m.apply(v, x) * nonce).lower(variables, images)
    profiles[name] = prof = profiling.profile_compile(lowered)
    assert prof["compile_s"] > 0
    assert set(prof["phases"]) == {p for p, _ in profiling.COMPILE_PHASES}, prof["phases"]
    assert sum(prof["phases"].values()) <= prof["compile_s"]
    # The profiled executable is the program.
    assert prof["compiled"](variables, images).shape == (4, 10)
  fused, plain = profiles["fused"]["kernels"], profiles["plain"]["kernels"]
  for part in ("fusion/scores", "fusion/matching", "fusion/merge", "fusion/attn_merge", "mlp"):
    assert fused.get(part, {}).get("count", 0) > 0, (part, fused)
  assert not any(p.startswith("fusion/") for p in plain), plain
  # Fusing makes every block's width its own: more distinct kernels for the same parts.
  assert fused["norm"]["count"] > plain["norm"]["count"]
  text = profiling.format_compile_profile(profiles["fused"], "tiny: ")
  assert text.startswith("tiny: compile") and "fusion/matching" in text
  # What a cached program (nothing compiled) prints.
  empty = {"compile_s": 0.01, "phases": {}, "kernels": {}}
  assert "persistent compilation cache" in profiling.format_compile_profile(empty)


def _script(*args, timeout=600):
  return run(list(args), launch_env(), timeout=timeout)


def test_forward_benchmark_script(tmp_path):
  out = tmp_path / "forward.json"
  proc = _script("benchmarks/forward.py", "--configs=tests/configs/tiny.py", "--batch_size=4",
                 "--repeats=2", f"--json={out}", f"--plot={tmp_path / 'speedups.png'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  from PIL import Image
  assert Image.open(tmp_path / "speedups.png").format == "PNG"
  again = _script("benchmarks/forward.py", f"--plot={tmp_path / 'again.png'}",
                  f"--plot_from={out}")
  assert again.returncode == 0 and "(1 points)" in again.stdout, again.stderr[-3000:]
  assert "summary (batch 4, float32" in proc.stdout
  assert "tiny fused forward: wall" in proc.stdout
  result = json.loads(out.read_text())["results"]["tiny"]
  assert result["speedup"] > 0 and 0 < result["profile"]["fusion_share"] < 1
  # The tiny config has no speed-up target of its own: 90% of its FLOP ratio; the fusion
  # share's applies to every config.
  share_met = result["profile"]["fusion_share"] <= 0.10
  target = 0.9 * result["flop_ratio"]
  assert result["targets"] == {"speedup": {"min": target, "met": result["speedup"] >= target},
                               "fusion_share": {"max": 0.10, "met": share_met}}
  assert f"fusion share {'yes' if share_met else 'NO'}" in proc.stdout
  assert "targets at float32, batch 32" in proc.stdout
  # At batch 1 a config is held to its batch-1 target (else: no slower than plain), not to
  # the batch-32 one.
  code = ("import forward; print([forward.speedup_target(n, b, 1.8) for n, b in "
          "[('deit_s', 1), ('deit_t', 1), ('lvvit_s', 1), ('deit_s', 32), ('lvvit_s', 32), "
          "('lvvit_s', 4)]])")
  done = _script("-c", f"import sys; sys.path.insert(0, 'benchmarks'); {code}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split("\n")[-2] == str([1.45, 1.35, 1.0, 1.65, 0.9 * 1.8, 0.9 * 1.8])
  # Every config name and the --json path are checked before the first config is timed.
  proc = _script("benchmarks/forward.py", "--configs=tests/configs/tiny.py,nonexistent")
  assert proc.returncode != 0 and "no config configs/nonexistent.py" in proc.stderr
  assert "compiling" not in proc.stdout
  proc = _script("benchmarks/forward.py", "--configs=tests/configs/tiny.py",
                 f"--json={tmp_path}/missing/forward.json")
  assert proc.returncode != 0 and "compiling" not in proc.stdout
  assert f"the directory {tmp_path}/missing does not exist" in proc.stderr
  proc = _script("benchmarks/forward.py", "--configs=tests/configs/tiny.py", "--steps_free",
                 "--batch_sizes=1,2")
  assert proc.returncode != 0 and "--steps_free times one batch size" in proc.stderr


@pytest.mark.benchmark   # a minute of compilation; pytest -m benchmark runs it
def test_train_step_benchmark_script(tmp_path):
  out = tmp_path / "train.json"
  # Two blocks, the second fused: the script's compilations are most of this test's time.
  proc = _script("benchmarks/train_step.py", "--config=tests/configs/tiny.py",
                 "--config.model.depth=2", "--config.fusion.layers=(1,)", "--batch_size=4",
                 "--repeats=1", "--compiles=1", "--compile_profile",
                 f"--json={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ratios MCTF / plain: time" in proc.stdout
  result = json.loads(out.read_text())
  # teacher_r_max=4: r' = 0..3, each timed; the teacher at full width: r' = 1..3 share one
  # branch, r' = 0 does not fuse.
  assert sorted(result["mctf"]["step_s_per_teacher_r"]) == ["0", "1", "2", "3"]
  assert result["mctf"]["padded"] and result["mctf"]["teacher_branches"] == 2
  for key in ("time", "compile", "memory", "flops"):
    assert result["ratios"][key] > 0
  for key, limit in (("time", 1.4), ("compile", 3.0), ("memory", 1.5)):
    target = result["targets"][key]
    assert target == {"max_ratio": limit, "met": result["ratios"][key] <= limit}
    assert f"{key} <= {limit}x {'met' if target['met'] else 'NOT met'}" in proc.stdout
  assert result["ratios"]["flops"] > 1
  # Compiled --compiles times each; the shortest counts.
  for name in ("plain", "mctf"):
    assert len(result[name]["compile_s_each"]) == 1
    assert result[name]["compile_s"] == min(result[name]["compile_s_each"])
  # --compile_profile: the plain step, the student alone and the MCTF step.
  assert "where compile time goes" in proc.stdout
  profiles = result["compile_profile"]
  assert sorted(profiles) == ["mctf", "plain", "student alone"]
  count = lambda name, prefix: sum(k["count"] for p, k in profiles[name]["kernels"].items()
                                   if p.startswith(prefix))
  assert count("plain", "fusion/") == 0
  assert 0 < count("student alone", "fusion/") <= count("mctf", "fusion/")
  assert count("plain", "") < count("student alone", "") <= count("mctf", "")
  proc = _script("benchmarks/train_step.py", "--config=tests/configs/tiny.py",
                 f"--json={tmp_path}")
  assert proc.returncode != 0 and "compiling" not in proc.stdout
  assert f"--json={tmp_path} is a directory" in proc.stderr
  proc = _script("benchmarks/train_step.py", "--config=tests/configs/tiny.py", "--batch_size=6",
                 "--config.fusion.teacher_group_size=4")
  assert proc.returncode != 0 and "compiling" not in proc.stdout
  assert "batch_size=6 is not a multiple of fusion.teacher_group_size=4" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = _script("benchmarks/train_step.py", "--config=tests/configs/tiny.py", "--block=0")
  assert proc.returncode != 0 and "flag --block=0: 0 is not a positive integer" in proc.stderr
