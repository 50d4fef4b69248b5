"""The ahead-of-time compile tool (mctf_jax.tools.compile): train.py's and eval.py's
programs compiled for a TPU slice by the real TPU compiler (libtpu), and for CPU devices."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import launch_env, run
from mctf_jax import load_config
from mctf_jax.errors import ConfigError
from mctf_jax.tools import compile as aot
from mctf_jax import cost
from mctf_jax.training import programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.py")


def _config(**changes):
  """A small DeiT (width 96, depth 2, 65 tokens) fusing 24 tokens in block 1, which removes
  8% of the products; batch 32 per chip on v5e:2x2 (small, to compile in seconds)."""
  config = load_config(TINY)
  config.model.update(dict(img_size=64, patch_size=8, embed_dim=96, num_heads=2, depth=2))
  config.fusion.update(dict(r=24.0, layers=(1,)))
  config.batch_size = config.eval_batch_size = 128
  config.eval.r_values = (24, 0)
  for key, value in changes.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  return config


@pytest.fixture(scope="module")
def v5e():
  return aot.target("v5e:2x2")


def test_topologies(v5e):
  assert v5e.platform == "tpu" and len(v5e.devices) == 4
  assert v5e.device_kind == "TPU v5 lite" and v5e.memory_bytes == 16 * aot.GiB
  v4 = aot.target("v4:2x2x1")   # megacore: one device per chip
  assert len(v4.devices) == 4 and v4.memory_bytes == 32 * aot.GiB
  assert aot.target("v5e:4x4").num_processes == 4
  assert len(aot.target("cpu:8").devices) == 8
  for bad, words in (("v5e:1x1", "refuses it"), ("v9:2x2", "expected a TPU slice"),
                     ("cpu:0", "cpu:N"), ("cpu:64", "xla_force_host_platform_device_count")):
    with pytest.raises(ConfigError, match=words) as info:
      aot.target(bad)
    assert bad in str(info.value) and "\n" not in str(info.value)


def test_merge_impl_auto_follows_the_target(v5e):
  config = _config()
  assert config.fusion.merge_impl == "auto"
  tpu = programs.model_for_mesh(config, aot.make_mesh(config, v5e))
  cpu = programs.model_for_mesh(config, aot.make_mesh(config, aot.target("cpu:8")))
  assert jax.default_backend() == "cpu"
  assert tpu.fusion.merge_impl == "matmul" and cpu.fusion.merge_impl == "scatter"


def test_tpu_train_step_fits(v5e):
  """train.py's step of the tiny config at depth 3 (student + teacher branches, batch 16 per
  chip) compiles for v5e:2x2 and fits; XLA's estimate would leave its lax.switch out, so
  none is given, and the matrix products come from the traced step."""
  config = load_config(TINY)
  config.model.depth = 3
  config.fusion.update(dict(layers=(1, 2), teacher_r_max=2.0))
  config.batch_size = 64
  train = aot.compile_train(config, v5e)
  assert 0 < train.hbm_bytes < v5e.memory_bytes and train.temp_bytes > 0
  assert train.estimate_s is None and "conditional" in train.estimate_note
  # XLA's FLOPs and bytes miss the branches (and the scanned blocks' loop) too, and the
  # ratios say so.
  assert train.uncounted == "conditional and while"
  unlooped = dataclasses.replace(train, name="no branches", uncounted="")
  assert ("XLA's counts miss part of the conditional and while bodies"
          in aot.format_ratios(train, unlooped))
  assert "miss part" not in aot.format_ratios(unlooped, unlooped)
  # Student, teacher (its costliest branch) and their backward passes: more than three
  # forward passes of the student, less than three of the plain model, both paths.
  per_chip = config.batch_size // len(v5e.devices)
  forward = 2 * per_chip * cost.count_flops(config, r=0, implementation="mctf_jax").matmul
  assert 2 * forward < train.traced_flops < 6 * forward


def test_tpu_forward_fusion_saves(v5e):
  """eval.py's forward, fused against plain, for v5e:2x2: fewer FLOPs; the bytes accessed
  are held below 1.6x the plain forward's (1.43x when this test was written: the 0/1
  products of the merges and the fusion's reductions still cost more bytes than the fused
  block saves at this size; docs/speed.md), and XLA's estimate is given for both."""
  results = aot.compile_all(_config(), v5e, ("eval",), say=lambda s: None)
  fused, plain = results
  assert (fused.name, plain.name) == ("forward r=24", "forward r=0")
  for c in results:
    assert 0 < c.hbm_bytes < v5e.memory_bytes and c.estimate_s > 0
  q = aot.ratios(fused, plain)
  assert q["traced_flops"] < 0.95 and q["xla_flops"] < 0.95
  assert q["bytes_accessed"] < 1.6
  text = aot.report(results, v5e)
  assert "forward r=24 / forward r=0" in text and "compiled (not run)" in text
  # At this width the fusion costs more than it saves, and the report says so.
  slower = "slower than the plain program by XLA's estimate"
  assert (slower in text) == (q["estimated_speedup"] < 1)


def test_does_not_fit_is_one_line(v5e):
  config = _config(eval_batch_size=4 * 2 ** 19)
  with pytest.raises(ConfigError) as info:
    aot.compile_forward(config, v5e, 0)
  message = str(info.value)
  assert "\n" not in message and "does not fit on v5e:2x2" in message
  assert "16 GiB HBM" in message and "--config.mesh.fsdp" in message
  assert "GiB of HBM per chip" in message


def test_compile_all_without_the_plain_step(monkeypatch, v5e):
  """--noplain compiles the fused train step only; by default its plain counterpart (no
  fusion, no teacher) follows it."""
  compiled = []

  def compile_train(config, tgt, name="train step"):
    compiled.append((name, config.fusion.r, config.fusion.teacher_r_max))
    return name

  monkeypatch.setattr(aot, "compile_train", compile_train)
  monkeypatch.setattr(aot, "format_cost", str)
  config = _config()
  config.fusion.teacher_r_max = 4.0
  aot.compile_all(config, v5e, ("train",), plain=False, say=lambda s: None)
  assert compiled == [("train step", config.fusion.r, 4.0)]
  compiled.clear()
  aot.compile_all(config, v5e, ("train",), say=lambda s: None)
  assert compiled == [("train step", config.fusion.r, 4.0), ("train step, plain", 0.0, 0.0)]


def test_memory_error_message():
  text = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
          "space hbm. Used 24.16G of 15.75G hbm. Exceeded hbm capacity by 8.41G.\nTotal hbm "
          "usage >= 24.41G: ... the total memory required for HLO temporaries (24.16G) "
          "exceeds available HBM (15.75G)")
  tgt = aot.Target("v5e:2x2", "tpu", (), 16 * aot.GiB, "HBM", "TPU v5 lite")
  error = aot._memory_error("train step", tgt, text)
  assert "24.16 GiB of HBM per chip, 15.75 GiB are available" in str(error)
  assert aot._memory_error("train step", tgt, "INTERNAL: something else") is None


def test_uncosted_instructions_counts_top_level_custom_calls():
  hlo = "\n".join([
      "%fused_computation (p: bf16[4]) -> bf16[4] {",
      '  %c = bf16[4] custom-call(%p), custom_call_target="GatherScatterIndicesBitpacked"',
      "}",
      "ENTRY %main (a: bf16[4]) -> bf16[4] {",
      '  %f = bf16[4] fusion(%a), kind=kCustom, calls=%fused_computation, '
      'backend_config={"estimated_cycles":"10"}',
      '  %x = bf16[4] custom-call(%f), custom_call_target="ConcatBitcast", backend_config={}',
      '  ROOT %y = bf16[4] custom-call(%x), custom_call_target="ConcatBitcast", '
      'backend_config={"estimated_cycles":"3"}',
      "}"])
  assert aot.uncosted_instructions(hlo) == 1


def test_cli_on_cpu(tmp_path):
  """The command line on XLA:CPU devices: a table, the ratios, the JSON."""
  out = tmp_path / "compiled.json"
  proc = run(["-m", "mctf_jax.tools.compile", f"--config={TINY}", "--topology=cpu:8",
              "--config.batch_size=64", "--config.eval_batch_size=64", "--programs=eval",
              f"--json={out}"], launch_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "cpu:8: 8 x CPU" in proc.stdout and "forward r=8 / forward r=0" in proc.stdout
  data = json.loads(out.read_text())
  assert data["topology"] == "cpu:8" and data["devices"] == 8
  assert [p["name"] for p in data["programs"]] == ["forward r=8", "forward r=0"]
  fused, plain = data["programs"]
  assert fused["traced_flops"] < plain["traced_flops"]
  assert fused["estimate_s"] is None   # XLA:CPU gives no time estimate
  bad = run(["-m", "mctf_jax.tools.compile", f"--config={TINY}", "--topology=tpu9"],
            launch_env(), timeout=300)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("error: --topology=tpu9")


def test_benchmark_script_on_cpu(tmp_path):
  """benchmarks/tpu_compile.py runs its sweep (here: the digits config's forwards on two
  CPU devices) and writes the ratios."""
  out = tmp_path / "sweep.json"
  proc = run([os.path.join(ROOT, "benchmarks", "tpu_compile.py"), "--configs=digits",
              "--topologies=cpu:2", "--programs=eval", "--batch_per_chip=2", f"--json={out}"],
             launch_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  (row,) = json.loads(out.read_text())
  assert row["config"] == "digits" and row["topology"] == "cpu:2"
  assert row["dtype"] == "bfloat16" and row["batch_per_chip"] == 2
  assert 0.5 < row["forward_ratios"]["traced_flops"] < 0.8
  assert "forward r=10 / forward r=0" in proc.stdout


def test_limit_benchmark_on_cpu(tmp_path):
  """benchmarks/tpu_limit.py compiles the plain, fused and steps-free forwards and bare
  train steps (here the digits config's, on two CPU devices): the steps-free program, the
  fused widths without the fusion steps, has fewer products than the fused one and fewer
  bytes; a config without MCTF's one-step-ahead attention is skipped with the reason."""
  out = tmp_path / "limit.json"
  proc = run([os.path.join(ROOT, "benchmarks", "tpu_limit.py"), "--configs=tome,digits",
              "--topologies=cpu:2", "--programs=eval,train", "--batch_per_chip=4",
              "--train_batch_per_chip=2", f"--json={out}"], launch_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "tome: skipped: the steps-free program follows MCTF's one-step-ahead" in proc.stdout
  (row,) = json.loads(out.read_text())
  assert row["config"] == "digits"
  for program in ("eval", "train"):
    figures = row[program]["programs"]
    assert (figures["steps free"]["traced_flops"] < figures["fused"]["traced_flops"]
            < figures["plain"]["traced_flops"])
    assert figures["steps free"]["bytes_accessed"] < figures["fused"]["bytes_accessed"]
    assert row[program]["steps_free_ratios"]["bytes_accessed"] < 1
  assert "forward, steps free / forward, plain: FLOPs" in proc.stdout
  assert "train step, steps free / train step, plain: FLOPs" in proc.stdout


def test_benchmark_configs_with_and_without_the_teacher():
  """The sweep's configs: its dtype and batch per chip, and with --noteacher no teacher
  branch (the fused train step that XLA's estimate covers)."""
  code = ("import runpy, sys\n"
          "sweep = runpy.run_path(sys.argv[1], run_name='sweep')\n"
          "for teacher in (True, False):\n"
          "  c = sweep['config_for']('deit_s', 4, dtype='bfloat16', batch_per_chip=128,\n"
          "                          teacher=teacher)\n"
          "  print(c.model.dtype, c.model.param_dtype, c.batch_size, c.eval_batch_size,\n"
          "        c.fusion.teacher_r_max, tuple(c.eval.r_values))\n")
  proc = subprocess.run([sys.executable, "-c", code,
                         os.path.join(ROOT, "benchmarks", "tpu_compile.py")], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  recipe = load_config(os.path.join(ROOT, "configs", "deit_s.py"))
  assert recipe.fusion.teacher_r_max > 0
  assert proc.stdout.split("\n")[:2] == [
      f"bfloat16 bfloat16 512 512 {recipe.fusion.teacher_r_max} ()",
      "bfloat16 bfloat16 512 512 0.0 ()"]


@pytest.mark.parametrize("told", [False, True])
@pytest.mark.parametrize("fixed,per_image,wobble", [
    (0.7, 0.0864, 0.0), (0.7, 0.0864, 0.3), (2.0, 0.011, 0.0), (15.0, 0.02, 0.0),
    (20.0, 0.001, 0.0), (0.1, 0.00001, 0.0)])
def test_the_batch_search_finds_the_largest_batch_that_fits(fixed, per_image, wobble, told):
  """On memory models in GiB per device, linear (the TPU compiler's figures are close to
  it: 13.1 GiB of temporaries at 128 images per chip for DeiT-S's step, 24.2 at 256) or
  with a step every 64 images: the largest fitting multiple of the step, in few compiles;
  0 when nothing fits, the limit when everything does. told: a batch that does not fit
  says what it needs (a GPU program compiles and is then found too big; the TPU compiler
  refuses without the total)."""
  capacity = 16 * aot.GiB

  def need(b):
    return int((fixed + per_image * b + wobble * (b // 64)) * aot.GiB)

  def probe(b):
    fits = need(b) <= capacity
    return aot.Probe(b, fits, need(b) if fits or told else None)

  best, probes = aot.search_largest_batch(probe, capacity=capacity, start=32, step=8,
                                          limit=4096)
  fitting = [b for b in range(8, 4097, 8) if need(b) <= capacity]
  assert best == (max(fitting) if fitting else 0)
  assert len({p.batch_per_device for p in probes}) == len(probes) <= 12
  assert all(p.fits == (need(p.batch_per_device) <= capacity) for p in probes)


def test_a_batch_that_does_not_fit_and_says_its_need_saves_compiles():
  """The H200 search of docs/speed.md (DeiT-S's step: 63.92 GiB at 368 per GPU, 115.39 at
  736; 105.3 available, steps of 16), on its line: with the need of the batch that does not
  fit, the line through it and the one that fits finds 656 in 4 compiles; without, 5 (the
  real search, whose memory is not quite linear, took 7 without it)."""
  capacity = int(105.3 * aot.GiB)

  def need(b):
    return int((63.92 + (b - 368) * (115.39 - 63.92) / 368) * aot.GiB)

  counts = {}
  for told in (False, True):
    def probe(b):
      fits = need(b) <= capacity
      return aot.Probe(b, fits, need(b) if fits or told else None)
    best, probes = aot.search_largest_batch(probe, capacity=capacity, start=368, step=16,
                                            limit=4096)
    assert best == 656
    counts[told] = len(probes)
  assert counts[True] < counts[False] and counts[True] <= 4, counts


def test_the_batch_step_keeps_every_teacher_group_whole(v5e):
  assert aot.batch_step(_config(**{"fusion.teacher_group_size": 0}), v5e) == 8
  # 128 images a group on 4 chips: a multiple of 32 per chip.
  assert aot.batch_step(_config(**{"fusion.teacher_group_size": 128,
                                   "fusion.teacher_r_max": 8.0}), v5e) == 32


# ----------------------------------------------------------------------------- GPUs

# jax's CUDA plugin, which the Makefile installs beside the test environment (in it, it
# would log at every JAX start-up of the suite).
CUDA_COMPILE = os.path.join(sys.prefix, "cuda-compile")


def test_gpu_topologies_are_checked_before_the_compiler(monkeypatch):
  for bad in ("h100:0", "h100:12", "h300:8"):
    with pytest.raises(ConfigError, match=r"h100:N|expected a TPU slice") as info:
      aot.target(bad)
    assert bad in str(info.value) and "\n" not in str(info.value)
  # This process does not see the plugin: how to get it, in one line.
  with pytest.raises(ConfigError, match=r"cannot compile for h100:8: XLA's GPU compiler comes "
                     r"with jax's CUDA plugin: pip install '.\[cuda\]'"):
    aot.target("h100:8")
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.5")
  with pytest.raises(ConfigError, match="XLA_PYTHON_CLIENT_MEM_FRACTION=1.5: expected"):
    aot.memory_fraction()


def test_gpu_train_step_compiles_without_a_gpu(tmp_path):
  """--topology=h100:2: train.py's step of a small config (student and teacher branches),
  compiled by XLA's GPU compiler on this CPU host, fits the share of an H100's memory that
  JAX's allocator takes, with memory figures and the traced FLOPs (XLA has no cost analysis
  for GPU programs); with that share cut to 0.01%, a forward does not fit, in one line."""
  assert os.path.isdir(CUDA_COMPILE), f"{CUDA_COMPILE} is missing: run make venv"
  out = tmp_path / "gpu.json"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, CUDA_COMPILE]))
  args = [sys.executable, "-m", "mctf_jax.tools.compile", f"--config={TINY}",
          "--topology=h100:2", "--config.model.depth=2", "--config.fusion.layers=(1,)",
          "--config.fusion.teacher_r_max=2.0", "--config.batch_size=64"]
  proc = subprocess.run(args + ["--programs=train", f"--json={out}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert ("h100:2: 2 x NVIDIA H100 80GB HBM3, 59.32 GiB memory per device (75% of 79.1 GiB"
          in proc.stdout)
  assert "no cost analysis for GPU programs" in proc.stdout
  data = json.loads(out.read_text())
  assert data["memory_bytes_per_device"] == int(0.75 * aot.GPU_MODELS["h100"][1])
  fused, plain = data["programs"]
  assert (fused["name"], plain["name"]) == ("train step", "train step, plain")
  for p in (fused, plain):
    assert 0 < p["hbm_bytes"] < data["memory_bytes_per_device"] and p["temp_bytes"] > 0
    assert p["estimate_s"] is None and p["traced_flops"] > 0
  # The teacher's branches and backward passes: more than the plain step.
  assert fused["traced_flops"] > plain["traced_flops"]
  small = subprocess.run(args + ["--programs=eval", "--config.eval.r_values=(0,)",
                                  "--config.eval_batch_size=2048"], cwd=ROOT, capture_output=True,
                         env=dict(env, XLA_PYTHON_CLIENT_MEM_FRACTION="0.0001"), text=True,
                         timeout=600)
  assert small.returncode == 1
  last = small.stderr.strip().splitlines()[-1]
  assert last.startswith("error: forward r=0 does not fit on h100:2: it needs ") and \
      "NVIDIA H100 80GB HBM3 has 0.00791 GiB (0.01% of 79.1 GiB" in last, last
