r"""Compile train.py's and eval.py's programs ahead of time for a TPU slice or NVIDIA GPUs, on
any machine.

    python -m mctf_jax.tools.compile --config=configs/deit_s.py --topology=v5e:4x4
    python -m mctf_jax.tools.compile --config=configs/deit_s.py --topology=v5e:2x2 \
        --config.batch_size=512 --programs=train --json=compiled.json
    python -m mctf_jax.tools.compile --config=configs/deit_s.py --topology=cpu:8
    python -m mctf_jax.tools.compile --config=configs/deit_s.py --topology=v5e:2x2 --max_batch
    python -m mctf_jax.tools.compile --config=configs/deit_s.py --topology=h100:8

The programs are the entry points' own (``mctf_jax.training.programs``): train.py's train
step (student and every teacher branch, the ``('data', 'fsdp')`` mesh of config.mesh,
the state's shardings, donation) and eval.py's forward at each ``eval.r_values``, lowered
from abstract shapes (nothing is allocated) and compiled by the real TPU compiler
(libtpu: ``pip install '.[tpu]'``) for the named topology, from a host without TPUs.
Beside each, the plain program (no fusion; for the train step also no teacher: a DeiT
fine-tuning step) for the ratios. ``fusion.merge_impl='auto'`` resolves for the target.

Per program: compile seconds; HBM per chip (arguments, outputs, temporaries, generated
code) against the chip's; XLA's FLOPs and bytes accessed per chip per step; the matrix
products' FLOPs counted from the traced program (2 per multiply-add; where a step holds a
``lax.switch``, its costliest branch: XLA's own FLOP count of a conditional cannot be
trusted); and XLA's time estimate (``optimal_seconds``), which TPU's cost model reports as
-1 s for every instruction it cannot cost (the ``ConcatBitcast`` custom calls that
bfloat16 attention's head layout produces): those count 0 here, and how many there were is
printed. Compiled figures, not run ones.

With ``--max_batch`` it finds instead the largest train batch per device whose train step
fits (``largest_train_batch``: a few compiles, each printed).

Topologies: ``v4:2x2x1`` (megacore chips), ``v5e:2x2`` (the smallest v5e slice a host can
describe), ``v5p:2x2x1``, ``v6e:2x2``, any larger slice of those (``v5e:16x16``);
``h100:N`` / ``h200:N`` (N NVIDIA GPUs, 8 per host beyond 8: ``h100:16`` is two hosts),
compiled by XLA's GPU compiler (jax's CUDA plugin: ``pip install '.[cuda]'``; no GPU, driver
or NVIDIA library needed; on a host without a GPU the plugin logs "Could not find cuda
drivers" as JAX starts), which gives memory figures and no cost analysis: the FLOPs are
the traced ones, and a program fits where it needs at most the share of the GPU's memory
that JAX's allocator takes (``XLA_PYTHON_CLIENT_MEM_FRACTION``, default 75%); and
``cpu:N`` (N of this host's CPU devices, XLA:CPU; set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` for more than one).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from typing import Callable

# Before JAX loads: compile-only TPU devices need no TPU runtime, and several processes may
# load libtpu to compile (the test suite's workers).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import mesh_utils, topologies  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import mctf_jax  # noqa: E402
from mctf_jax import cost, parallel  # noqa: E402
from mctf_jax.errors import ConfigError, MctfError  # noqa: E402
from mctf_jax.fusion.config import normalize_r  # noqa: E402
from mctf_jax.tools import cli, flops  # noqa: E402
from mctf_jax.training import programs  # noqa: E402

GiB = 1024 ** 3
# name in a topology: (HBM per chip in GiB, libtpu chip config, accelerator type prefix)
TPU_CHIPS = {"v4": (32, "megacore", "v4"), "v5e": (16, "default", "v5litepod"),
             "v5p": (95, "megacore", "v5p"), "v6e": (32, "default", "v6e")}
TPU_HOWTO = ("the TPU compiler comes with libtpu: pip install '.[tpu]' (or pip install "
             f"'jax[tpu]=={jax.__version__}')")
CUDA_HOWTO = ("XLA's GPU compiler comes with jax's CUDA plugin: pip install '.[cuda]' (or pip "
              f"install 'jax[cuda12-local]=={jax.__version__}'; no GPU or driver needed)")
# name in a topology: (name as the driver reports it, memory in bytes as the driver reports
# it, memory bandwidth in bytes/s, L2 cache bytes); both are compute capability 9.0 with 132
# SMs at 1.98 GHz (NVIDIA's published figures).
GPU_MODELS = {"h100": ("NVIDIA H100 80GB HBM3", 84_929_347_584, 3.35e12, 50 * 2 ** 20),
              "h200": ("NVIDIA H200", 150_754_820_096, 4.8e12, 50 * 2 ** 20)}
GPUS_PER_HOST = 8
# Without a GPU to autotune on, XLA cannot choose tiles for its Triton matrix products (it
# fails on some); cuBLAS's are compiled instead.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
NOT_FIT_REMEDY = ("shard the parameters and optimizer state over more chips "
                  "(--config.mesh.fsdp=N), recompute activations in the backward pass "
                  "(--config.model.remat_policy=dots_with_no_batch_dims), or a smaller "
                  "--config.batch_size")


class DoesNotFit(ConfigError):
  """A program needs more memory per device than the target has; need_bytes: how much, where
  the program compiled (None where the compiler refused it)."""

  def __init__(self, message: str, need_bytes: int | None = None):
    super().__init__(message)
    self.need_bytes = need_bytes


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile target: its name, devices (compile-only for TPUs) and memory per device."""
  name: str
  platform: str
  devices: tuple
  memory_bytes: int
  memory_name: str     # 'HBM' or 'host RAM'
  device_kind: str
  memory_note: str = ""   # how memory_bytes was reached, where it is not the whole memory

  @property
  def num_processes(self) -> int:
    return len({d.process_index for d in self.devices})

  def describe(self) -> str:
    hosts = f", {self.num_processes} hosts" if self.num_processes > 1 else ""
    note = f" ({self.memory_note})" if self.memory_note else ""
    return (f"{self.name}: {len(self.devices)} x {self.device_kind}{hosts}, "
            f"{self.memory_bytes / GiB:.4g} GiB {self.memory_name} per device{note}")


_TPU_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_GPU_TOPOLOGY = re.compile(r"^(" + "|".join(GPU_MODELS) + r"):(\d+)$")


def target(topology: str) -> Target:
  """The Target of a topology name (see the module docstring); ConfigError for a bad one."""
  topology = topology.strip()
  if topology.startswith("cpu:"):
    count = topology[4:]
    if not count.isdigit() or int(count) < 1:
      raise ConfigError(f"--topology={topology}: expected cpu:N with N >= 1")
    available = jax.devices("cpu")
    if int(count) > len(available):
      raise ConfigError(
          f"--topology={topology}: this process has {len(available)} CPU device(s); set "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before starting it")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Target(topology, "cpu", tuple(available[:int(count)]), memory, "host RAM", "CPU")
  gpu = _GPU_TOPOLOGY.match(topology)
  if gpu:
    return gpu_target(topology, gpu.group(1), int(gpu.group(2)))
  match = _TPU_TOPOLOGY.match(topology)
  if not match:
    raise ConfigError(f"--topology={topology}: expected a TPU slice such as v5e:2x2, v6e:4x4, "
                      f"v4:2x2x1, v5p:2x2x2 (chips {', '.join(TPU_CHIPS)}), GPUs such as "
                      f"h100:8 ({', '.join(GPU_MODELS)}), or cpu:N")
  chip, dims = match.group(1), match.group(2)
  hbm, chip_config, accelerator = TPU_CHIPS[chip]
  chips = int(np.prod([int(d) for d in dims.split("x")]))
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{accelerator}-{4 if chip in ('v5e', 'v6e') else 8}")
  try:
    desc = topologies.get_topology_desc(topology_name=f"{chip}:{dims}", platform="tpu",
                                        chip_config_name=chip_config)
  except Exception as e:  # noqa: BLE001 - libtpu missing or the topology refused
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "TPU support not installed" in message or "libtpu" in message.lower():
      raise ConfigError(f"cannot compile for {topology}: {TPU_HOWTO}") from None
    raise ConfigError(f"--topology={topology}: the TPU compiler refuses it ({message}); a "
                      f"slice must be a multiple of one host's chips (v5e:2x2 is the "
                      f"smallest v5e)") from None
  devices = tuple(desc.devices)
  if len(devices) != chips:
    raise ConfigError(f"--topology={topology}: libtpu describes {len(devices)} devices for "
                      f"{chips} chips")
  return Target(topology, "tpu", devices, hbm * GiB, "HBM", devices[0].device_kind)


def each_target(topologies):
  """(topology, Target) for each of a script's --topologies, each described as it comes; a
  bad one ends the script with its one-line error."""
  for topology in topologies:
    try:
      tgt = target(topology)
    except MctfError as e:
      cli.fail(str(e))
    print(tgt.describe(), flush=True)
    yield topology, tgt


def gpu_target_config(model: str) -> str:
  """XLA's description of a GPU model (a GpuTargetConfigProto, text format): what its GPU
  compiler would otherwise query from the device."""
  description, memory, bandwidth, l2 = GPU_MODELS[model]
  return f"""
gpu_device_info {{
  threads_per_block_limit: 1024  threads_per_warp: 32  threads_per_core_limit: 2048
  shared_memory_per_block: 49152  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472  registers_per_core_limit: 65536
  registers_per_block_limit: 65536  core_count: 132  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}  l2_cache_size: {l2}  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  cuda_compute_capability {{ major: 9  minor: 0 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9  minor: 8 }}
runtime_version {{ major: 12  minor: 8 }}
device_description_str: "{description}"
"""


def memory_fraction() -> float:
  """The share of a GPU's memory JAX's allocator takes (``XLA_PYTHON_CLIENT_MEM_FRACTION``,
  default 0.75)."""
  value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
  try:
    fraction = float(value)
  except ValueError:
    fraction = -1.0
  if not 0 < fraction <= 1:
    raise ConfigError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value}: expected a fraction in (0, 1]")
  return fraction


def gpu_target(topology: str, model: str, count: int) -> Target:
  """N GPUs of `model`, compile-only (XLA's GPU compiler through jax's CUDA plugin)."""
  if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
    raise ConfigError(f"--topology={topology}: expected {model}:N with 1 <= N <= "
                      f"{GPUS_PER_HOST} (one host) or N a multiple of {GPUS_PER_HOST} (hosts "
                      f"of {GPUS_PER_HOST} GPUs)")
  try:
    plugin = importlib.util.find_spec("jax_plugins.xla_cuda12")
  except ModuleNotFoundError:   # no jax_plugins package at all
    plugin = None
  if plugin is None:
    raise ConfigError(f"cannot compile for {topology}: {CUDA_HOWTO}")
  fraction = memory_fraction()
  hosts, per_host = max(1, count // GPUS_PER_HOST), min(count, GPUS_PER_HOST)
  desc = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                      target_config=gpu_target_config(model))
  devices = tuple(desc.devices)
  memory = GPU_MODELS[model][1]
  return Target(topology, "gpu", devices, int(fraction * memory), "memory",
                devices[0].device_kind,
                f"{fraction * 100:.4g}% of {memory / GiB:.4g} GiB, as JAX's allocator takes it: "
                f"XLA_PYTHON_CLIENT_MEM_FRACTION")


def make_mesh(config, tgt: Target) -> Mesh:
  """The mesh train.py and eval.py build (``parallel.create_mesh``) over the target's
  devices, in the order the TPU topology lays them out."""
  devices = tgt.devices
  if tgt.platform == "tpu":
    devices = mesh_utils.create_device_mesh((len(devices),), list(devices)).reshape(-1)
  return parallel.create_mesh(config.mesh.fsdp, devices)


# ----------------------------------------------------------------------------- figures


@dataclasses.dataclass
class ProgramCost:
  """One compiled program's figures, per device (chip) and step."""
  name: str
  r: object
  compile_s: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  xla_flops: float
  bytes_accessed: float
  traced_flops: float          # matrix products, 2 per multiply-add
  estimate_s: float | None     # XLA's optimal_seconds with uncosted instructions at 0
  uncosted: int                # instructions XLA's TPU cost model reported as -1 s
  estimate_note: str = ""      # why there is no estimate
  uncounted: str = ""          # bodies XLA's counts miss part of ("conditional and while")

  @property
  def hbm_bytes(self) -> int:
    """What the program holds on a device: arguments + outputs (less the donated ones
    they alias) + temporaries + code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  def as_dict(self) -> dict:
    return dict(dataclasses.asdict(self), hbm_bytes=self.hbm_bytes)


_CUSTOM_CALL = re.compile(r"custom-call\(.*custom_call_target=\"(\w+)\"")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_FUSION_CALLS = re.compile(r" fusion\(.*calls=%([\w.\-]+)")


def uncosted_instructions(hlo_text: str) -> int:
  """Custom calls outside fused computations that carry no cost estimate in a compiled TPU
  module: XLA's TPU cost model adds -1 s to ``optimal_seconds`` for each."""
  lines = hlo_text.splitlines()
  fused = {m.group(1) for line in lines for m in [_FUSION_CALLS.search(line)] if m}
  count, inside = 0, None
  for line in lines:
    computation = _COMPUTATION.match(line)
    if computation:
      inside = computation.group(1)
    elif inside not in fused and _CUSTOM_CALL.search(line) and "estimated_cycles" not in line:
      count += 1
  return count


def compiled_cost(compiled) -> dict:
  """XLA's cost analysis of a compiled program (per device), as a flat dict."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return dict(analysis or {})


def measure(name: str, r, lower, traced_flops: float, num_devices: int,
            tgt: Target) -> ProgramCost:
  """Compiles `lower()` (a jax.stages.Lowered) and reads its figures; a TPU program that
  does not fit raises ConfigError naming the need, the capacity and the remedy."""
  t0 = time.time()
  lowered = lower()
  # JAX's persistent cache cannot load a program compiled for devices that are not here:
  # none is written for compile-only targets (the entry could only fail to load later).
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  if tgt.platform != "cpu":
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  try:
    compiled = lowered.compile(GPU_COMPILER_OPTIONS if tgt.platform == "gpu" else None)
  except Exception as e:  # noqa: BLE001 - XLA's out-of-memory is a runtime error
    raise _memory_error(name, tgt, str(e)) or e from None
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
  seconds = time.time() - t0
  stats = compiled.memory_analysis()
  xla = compiled_cost(compiled)
  estimate, uncosted, note, uncounted = None, 0, "", ""
  if tgt.platform == "tpu" and "optimal_seconds" in xla:
    text = compiled.as_text()
    loops = [kind for kind in ("conditional", "while") if f" {kind}(" in text]
    if loops:
      # XLA's TPU cost analysis does not count a lax.switch's branches or a loop's body in
      # full (its estimate, FLOPs and bytes alike), which would flatter the program.
      uncounted = " and ".join(loops)
      note = (f"no estimate: XLA's does not count the {uncounted} bodies in full (nor its "
              f"FLOPs and bytes)")
    else:
      uncosted = uncosted_instructions(text)
      estimate = float(xla["optimal_seconds"]) + uncosted
  elif tgt.platform == "gpu":
    note = ("no FLOPs, bytes or estimate from XLA: it has no cost analysis for GPU "
            "programs (the FLOPs are the traced ones)")
  result = ProgramCost(
      name=name, r=r, compile_s=seconds,
      argument_bytes=int(stats.argument_size_in_bytes),
      output_bytes=int(stats.output_size_in_bytes),
      alias_bytes=int(stats.alias_size_in_bytes), temp_bytes=int(stats.temp_size_in_bytes),
      code_bytes=int(stats.generated_code_size_in_bytes),
      xla_flops=float(xla.get("flops", float("nan"))),
      bytes_accessed=float(xla.get("bytes accessed", float("nan"))),
      traced_flops=traced_flops / num_devices, estimate_s=estimate, uncosted=uncosted,
      estimate_note=note, uncounted=uncounted)
  if result.hbm_bytes > tgt.memory_bytes:
    raise DoesNotFit(
        f"{name} does not fit on {tgt.name}: it needs {result.hbm_bytes / GiB:.2f} GiB of "
        f"{tgt.memory_name} per device, {tgt.device_kind} has {tgt.memory_bytes / GiB:.4g} "
        f"GiB{f' ({tgt.memory_note})' if tgt.memory_note else ''}; {NOT_FIT_REMEDY}",
        need_bytes=result.hbm_bytes)
  return result


_HBM_NEED = re.compile(r"required for HLO temporaries \(([\d.]+)(\w)\) exceeds available "
                       r"HBM \(([\d.]+)(\w)\)")


def _memory_error(name: str, tgt: Target, message: str) -> DoesNotFit | None:
  if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
    return None
  need = _HBM_NEED.search(message)
  figures = (f"its temporaries alone need {need.group(1)} {need.group(2)}iB of HBM per chip, "
             f"{need.group(3)} {need.group(4)}iB are available" if need else
             "it needs more HBM per chip than there is")
  return DoesNotFit(f"{name} does not fit on {tgt.name} ({tgt.device_kind}, "
                     f"{tgt.memory_bytes / GiB:.4g} GiB HBM): {figures}; {NOT_FIT_REMEDY}")


def traced_step_flops(fn, *args) -> float:
  """2 x the multiply-adds of the matrix products in fn's jaxpr (a ``lax.switch`` counts its
  costliest branch, a scan its length times its body)."""
  return 2.0 * flops.jaxpr_macs(jax.make_jaxpr(fn)(*args))


# ----------------------------------------------------------------------------- programs


def plain_config(config):
  """The config's plain counterpart: no fused block, no teacher (a DeiT fine-tuning step)."""
  plain = config.copy_and_resolve_references()
  plain.fusion.r = 0.0
  plain.fusion.teacher_r_max = 0.0
  plain.fusion.target_gflops = 0.0
  plain.fusion.target_fraction = 0.0
  return plain


def compile_train(config, tgt: Target, *, name: str = "train step") -> ProgramCost:
  """train.py's train step of `config` on the target's mesh."""
  mesh = make_mesh(config, tgt)
  parallel.check_batch_size(config.batch_size, mesh)
  # The learning-rate schedule's length changes constants in the step, not its program.
  program = programs.train_program(config, mesh, steps_per_epoch=1000)
  batch = programs.train_batch(config, program.model, mesh)
  traced = traced_step_flops(program.step, program.abstract_state, batch)
  return measure(name, program.model.fusion.r, lambda: program.lower(batch), traced,
                 mesh.devices.size, tgt)


def compile_forward(config, tgt: Target, r, *, name: str | None = None,
                    forward_of: Callable | None = None) -> ProgramCost:
  """eval.py's evaluation step at `r` on the target's mesh; with `forward_of`, the same step
  around forward_of(model) (a function of (variables, images)) instead of ``model.apply``."""
  mesh = make_mesh(config, tgt)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  model = programs.model_for_mesh(config, mesh).with_fusion(r=r)
  variables = programs.abstract_variables(model, mesh)
  batch = programs.eval_batch(config, model, mesh)
  step = programs.eval_program(model, mesh, jax.tree.map(lambda x: x.sharding, variables),
                               None if forward_of is None else forward_of(model))
  traced = traced_step_flops(step, variables, batch)
  return measure(name or f"forward r={r}", r, lambda: step.lower(variables, batch), traced,
                 mesh.devices.size, tgt)


def eval_r_values(config) -> tuple:
  """eval.py's r values (config.eval.r_values, else fusion.r and 0), with 0 included."""
  fusion = mctf_jax.fusion_config(config)
  r = cost.apply_budget(mctf_jax.model_config(config), fusion).r
  values = tuple(config.eval.r_values) or ((r, 0) if r else (0,))
  values = tuple(normalize_r(v, "eval.r_values", fusion.method) for v in values)
  return values if 0 in values else values + (0,)


def compile_all(config, tgt: Target, what=("train", "eval"), *, plain: bool = True,
                say=print) -> list:
  """Every program of `what` and (with `plain`) the train step's plain counterpart, in that
  order; the forward's plain counterpart is the one at r=0 among eval.py's r values."""
  results = []
  if "train" in what:
    say(f"compiling the train step for {tgt.name} ...")
    results.append(compile_train(config, tgt))
    say(format_cost(results[-1]))
    if plain:
      say("compiling the plain train step (no fusion, no teacher) ...")
      results.append(compile_train(plain_config(config), tgt, name="train step, plain"))
      say(format_cost(results[-1]))
  if "eval" in what:
    for r in eval_r_values(config):
      say(f"compiling the forward at r={r} ...")
      results.append(compile_forward(config, tgt, r))
      say(format_cost(results[-1]))
  return results


# ----------------------------------------------------------------------------- batch search


@dataclasses.dataclass(frozen=True)
class Probe:
  """One compile of the batch search: its batch per device, whether it fit, and what it
  needs per device (None where the compiler refused it without saying)."""
  batch_per_device: int
  fits: bool
  hbm_bytes: int | None = None


def search_largest_batch(probe, *, capacity: int, start: int, step: int,
                         limit: int) -> tuple[int, list[Probe]]:
  """The largest multiple of `step` (at most `limit`) for which ``probe(b) -> Probe`` fits,
  and the probes made, in order; 0 when not even `step` fits.

  Memory grows about linearly with the batch, so once two batches are measured each next
  probe goes where their line meets `capacity` (then one step past it, to confirm): the
  largest batch that fits and the smallest that does not where the latter's need is known
  (a compiled program over the capacity), else the two largest that fit; before that it
  doubles from `start`, and where the line misleads it bisects between the largest batch
  that fits and the smallest that does not."""
  probes: dict[int, Probe] = {}
  lo, hi = 0, limit + step   # lo fits (0: nothing yet), hi does not
  b = min(max(step, start // step * step), limit)
  while True:
    if b not in probes:
      probes[b] = probe(b)
    if probes[b].fits:
      lo = b
    else:
      hi = b
    if hi - lo <= step:
      return lo, list(probes.values())
    nxt = 2 * lo if hi > limit else (lo + hi) // 2
    measured = sorted((p.batch_per_device, p.hbm_bytes) for p in probes.values()
                      if p.hbm_bytes is not None)
    below = [m for m in measured if m[0] <= lo]
    above = [m for m in measured if m[0] >= hi]
    pair = ((below[-1], above[0]) if below and above else
            (below[-2], below[-1]) if len(below) >= 2 else None)
    if pair and pair[1][1] > pair[0][1]:
      (b1, m1), (b2, m2) = pair
      nxt = int(b1 + (capacity - m1) * (b2 - b1) / (m2 - m1))
    b = min(max(nxt // step * step, lo + step), hi - step)


def batch_step(config, tgt: Target, multiple: int = 8) -> int:
  """The granularity of the batch search: a multiple of `multiple` whose global batch
  (times the devices) every teacher group size divides, so that every batch searched is
  one train.py accepts."""
  devices = len(tgt.devices)
  group = int(config.fusion.teacher_group_size or 0)
  if group and config.fusion.teacher_r_max:
    need = group // np.gcd(group, devices)
    return int(np.lcm(multiple, need))
  return multiple


def largest_train_batch(config, tgt: Target, *, start: int = 32, limit: int = 4096,
                        say=print) -> tuple[int, list[Probe]]:
  """The largest train batch per device whose train step (``compile_train``) fits the
  target's memory, found by compiling (``search_largest_batch``)."""
  step = batch_step(config, tgt)
  devices = len(tgt.devices)

  def probe(b):
    trial = config.copy_and_resolve_references()
    trial.batch_size = b * devices
    say(f"compiling the train step at {b} per device (global batch {b * devices}) ...")
    try:
      result = compile_train(trial, tgt)
    except DoesNotFit as e:
      say(f"  does not fit: {e}")
      return Probe(b, False, e.need_bytes)
    say(f"  fits: {result.hbm_bytes / GiB:.2f} GiB of {tgt.memory_bytes / GiB:.4g} per device "
        f"(compiled in {result.compile_s:.0f} s)")
    return Probe(b, True, result.hbm_bytes)

  return search_largest_batch(probe, capacity=tgt.memory_bytes, start=start, step=step,
                              limit=limit)


# ----------------------------------------------------------------------------- output


HEADER = (f"{'program':<20s} {'compile':>8s} {'HBM/dev':>8s} {'(args':>7s} {'out':>6s} "
          f"{'temp':>6s} {'code)':>6s} {'GFLOP':>9s} {'traced':>9s} {'GB':>8s} "
          f"{'est. ms':>8s}")


def _gb(n: float) -> str:
  return f"{n / GiB:.2f}"


def _figure(value, scale: float, width: int, digits: int) -> str:
  """value / scale, or '-' where XLA gave none (None or NaN)."""
  if value is None or math.isnan(value):
    return f"{'-':>{width}s}"
  return f"{value / scale:{width}.{digits}f}"


def format_cost(c: ProgramCost) -> str:
  return (f"{c.name:<20s} {c.compile_s:7.1f}s {_gb(c.hbm_bytes):>8s} "
          f"{_gb(c.argument_bytes):>7s} {_gb(c.output_bytes - c.alias_bytes):>6s} "
          f"{_gb(c.temp_bytes):>6s} {_gb(c.code_bytes):>6s} {_figure(c.xla_flops, 1e9, 9, 1)} "
          f"{c.traced_flops / 1e9:9.1f} {_figure(c.bytes_accessed, 1e9, 8, 2)} "
          f"{_figure(c.estimate_s, 1e-3, 8, 2)}")


def ratios(fused: ProgramCost, plain: ProgramCost) -> dict:
  """fused / plain: FLOPs (XLA's and traced), bytes accessed, compile time, HBM; and the
  speed-up XLA's estimate implies (plain / fused), where both have one."""
  out = {"xla_flops": fused.xla_flops / plain.xla_flops,
         "traced_flops": fused.traced_flops / plain.traced_flops,
         "bytes_accessed": fused.bytes_accessed / plain.bytes_accessed,
         "compile": fused.compile_s / plain.compile_s,
         "hbm": fused.hbm_bytes / plain.hbm_bytes}
  if fused.estimate_s and plain.estimate_s:
    out["estimated_speedup"] = plain.estimate_s / fused.estimate_s
  return out


def format_ratios(fused: ProgramCost, plain: ProgramCost) -> str:
  q = ratios(fused, plain)
  speed = (f", XLA's estimated speed-up {q['estimated_speedup']:.2f}x"
           if "estimated_speedup" in q else "")
  if q.get("estimated_speedup", 1.0) < 1.0:
    # The fusion's own costs outweigh what it saves (docs/speed.md, "On TPUs").
    speed += (": slower than the plain program by XLA's estimate (fewer FLOPs saved than "
              "the fusion costs here: a larger r, or fusion.method='tome')")
  xla = (f" (XLA's {q['xla_flops']:.3f}), bytes accessed {q['bytes_accessed']:.3f}"
         if not math.isnan(q["xla_flops"]) else "")   # (NaN: no cost analysis)
  uncounted = " and ".join(dict.fromkeys(
      kind for c in (fused, plain) for kind in c.uncounted.split(" and ") if kind))
  if xla and uncounted:
    xla += f" (XLA's counts miss part of the {uncounted} bodies)"
  return (f"{fused.name} / {plain.name}: FLOPs {q['traced_flops']:.3f}{xla}, compile "
          f"{q['compile']:.2f}x, HBM {q['hbm']:.2f}x{speed}")


def report(results: list, tgt: Target) -> str:
  lines = [tgt.describe(), "figures per device and step, compiled (not run); HBM/dev = "
           "arguments + outputs (not donated) + temporaries + code; GFLOP: XLA's count; "
           "traced: the matrix products", HEADER]
  lines += [format_cost(c) for c in results]
  notes = {}
  for c in results:
    if c.estimate_note:
      notes.setdefault(c.estimate_note, []).append(c.name)
  lines += [f"{', '.join(names)}: {note}" for note, names in notes.items()]
  by_name = {c.name: c for c in results}
  if "train step" in by_name and "train step, plain" in by_name:
    lines.append(format_ratios(by_name["train step"], by_name["train step, plain"]))
  plain = next((c for c in results if c.name == "forward r=0"), None)
  for c in results:
    if plain is not None and c.name.startswith("forward") and c is not plain:
      lines.append(format_ratios(c, plain))
  uncosted = max((c.uncosted for c in results), default=0)
  if uncosted:
    lines.append(f"(XLA's estimate leaves out up to {uncosted} instructions its TPU cost "
                 f"model cannot cost, custom calls such as ConcatBitcast, which it reports "
                 f"as -1 s each)")
  return "\n".join(lines)


def main(argv=None):

  flags_ = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_s.py; "
                                  "fields may be overridden: --config.batch_size=512.")
  flags.DEFINE_string("topology", "v5e:2x2", "TPU slice (v5e:2x2, v6e:4x4, v4:2x2x1, "
                      "v5p:2x2x2, ...), NVIDIA GPUs (h100:8, h200:16, ...) or cpu:N.")
  flags.DEFINE_list("programs", ["train", "eval"], "Which programs: train, eval.")
  flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
  flags.DEFINE_bool("max_batch", False, "Instead of the programs, find the largest train "
                    "batch per device whose train step fits (compiles it several times).")
  flags.DEFINE_bool("plain", True, "Also compile the plain train step (no fusion, no "
                    "teacher) for the fused/plain ratios; --noplain only checks the fused "
                    "step (whether it fits, its figures).")
  flags.DEFINE_integer("start_batch", 32, "With --max_batch: the first batch per device "
                       "to compile (a batch known to fit saves the compiles below it).")
  flags.mark_flags_as_required(["config"])

  def run(argv):
    cli.begin_script(argv, flags_)
    unknown = set(flags_.programs) - {"train", "eval"}
    if unknown:
      cli.fail(f"--programs={','.join(flags_.programs)}: expected train and/or eval")
    config = flags_.config
    say = lambda s: print(s, flush=True)  # noqa: E731
    try:
      tgt = target(flags_.topology)
      print(tgt.describe(), flush=True)
      if flags_.max_batch:
        if flags_.start_batch < 1:
          cli.fail(f"--start_batch={flags_.start_batch}: expected a batch per device >= 1")
        best, probes = largest_train_batch(config, tgt, start=flags_.start_batch, say=say)
      else:
        results = compile_all(config, tgt, tuple(flags_.programs), plain=flags_.plain,
                              say=say)
    except MctfError as e:
      cli.fail(str(e))
    if flags_.max_batch:
      failed = min((p.batch_per_device for p in probes if not p.fits), default=None)
      print(f"\nlargest train batch that fits on {tgt.name}: {best} per device (global "
            f"{best * len(tgt.devices)})" + (f"; {failed} per device does not fit"
                                              if failed is not None else "") +
            f" ({len(probes)} compiles)")
      if flags_.json:
        cli.write_json(flags_.json, {
            "topology": tgt.name, "devices": len(tgt.devices),
            "memory_bytes_per_device": tgt.memory_bytes, "largest_batch_per_device": best,
            "probes": [dataclasses.asdict(p) for p in probes]})
      return
    print()
    print(report(results, tgt))
    if flags_.json:
      by_name = {c.name: c for c in results}
      data = {"topology": tgt.name, "device_kind": tgt.device_kind,
              "devices": len(tgt.devices), "memory_bytes_per_device": tgt.memory_bytes,
              "jax": jax.__version__, "programs": [c.as_dict() for c in results]}
      if "train step" in by_name and "train step, plain" in by_name:
        data["train_ratios"] = ratios(by_name["train step"], by_name["train step, plain"])
      if "forward r=0" in by_name:
        data["forward_ratios"] = {c.name: ratios(c, by_name["forward r=0"]) for c in results
                                  if c.name.startswith("forward") and c.r != 0}
      cli.write_json(flags_.json, data)

  app.run(run, argv=argv)


if __name__ == "__main__":
  main(sys.argv)
