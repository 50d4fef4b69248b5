"""Where a compiled program's time goes: kernel times from a jax.profiler trace, by part.

``profile_call(compiled, call)`` traces a few calls of a compiled function, reads the trace
(XSpace protobuf, as written by ``jax.profiler``), matches each kernel event to its HLO
instruction and that instruction's ``op_name`` metadata (the JAX name stack), and sums the
kernel time per part of the model. The parts are the named scopes that the fusion engine
sets (``mctf_jax.fusion.scopes``), whatever the backbone:

* the fusion's own steps, ``mctf_<step>`` scopes: ``fusion/scores`` (the matching
  scores), ``fusion/matching`` (bipartite matching), ``fusion/merge`` (merging tokens and
  sizes, source maps), ``fusion/attn_merge`` (the one-step-ahead attention merge, around
  the ordinary probs @ v product);
* the transformer's, ``vit_<part>`` scopes set by the block driver and the backbone:
  ``attention/qk+softmax`` (with the key bias of proportional attention),
  ``attention/probs@v``, ``attention/v``, ``attention/proj``, ``mlp``, ``norm``, ``embed``,
  ``head``; anything outside them is ``other``.

Backward-pass kernels (``transpose(...)`` in the name stack) get a ``/bwd`` suffix.
The kernel names are the HLO instruction names, which is how XLA's CPU and GPU runtimes
label their trace events. Instructions XLA creates without a name stack (e.g. the partial
reductions it splits a long reduction into) count for the part of the first instruction
that uses them; trace events that no instruction name matches (copies inserted by the
runtime, host callbacks) are left out.

``profile_compile(lowered)`` does the same for compile time on XLA:CPU: it traces one
compilation and reports its phases (HLO passes, kernel emission, machine code generation)
and, per part, how many distinct kernels were emitted and the CPU time their emission took.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from typing import Any, Callable

import jax

from mctf_jax.fusion.scopes import FUSION_PREFIX, PART_PREFIX, PARTS

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = ")
_OP_NAME = re.compile(r"op_name=\"([^\"]*)\"")
_OPERAND = re.compile(r"%([\w.\-]+)")
_FUSION_SCOPE = re.compile(re.escape(FUSION_PREFIX) + r"(\w+)")
_PART_SCOPE = re.compile(re.escape(PART_PREFIX) + r"(\w+)")


def part_of(op_name: str) -> str:
  """The part of the model an instruction with this ``op_name`` belongs to: the innermost
  fusion-step scope, else the innermost part scope, else 'other'."""
  suffix = "/bwd" if "transpose(" in op_name else ""
  steps = _FUSION_SCOPE.findall(op_name)
  if steps:
    return "fusion/" + steps[-1] + suffix
  for part in reversed(_PART_SCOPE.findall(op_name)):
    if part in PARTS:
      return PARTS[part] + suffix
  return "other" + suffix


def instruction_parts(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> part, from a compiled module's text (``compiled.as_text()``).

  An instruction without ``op_name`` metadata takes the part of its first user that has one
  (XLA names instructions uniquely within a module).
  """
  parts, users, unnamed = {}, {}, []
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name = m.group(1)
    op_name = _OP_NAME.search(line, m.end())
    if op_name:
      parts[name] = part_of(op_name.group(1))
    else:
      unnamed.append(name)
    for operand in _OPERAND.findall(line, m.end()):
      users.setdefault(operand, []).append(name)
  # Chains of unnamed instructions resolve from their named end, one link per pass.
  while unnamed:
    left = []
    for name in unnamed:
      part = next((parts[u] for u in users.get(name, ()) if u in parts), None)
      if part is None:
        left.append(name)
      else:
        parts[name] = part
    if len(left) == len(unnamed):
      break
    unnamed = left
  return parts


def _read_xspace(directory: str):
  try:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2   # here: TensorFlow's import is felt (~5 s)
  except ImportError as e:  # tensorflow is in requirements.txt (tf.data)
    raise ImportError("reading profiler traces needs tensorflow (pip install "
                      "tensorflow-cpu)") from e
  files = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))
  if not files:
    raise RuntimeError(f"jax.profiler wrote no trace under {directory}")
  space = xplane_pb2.XSpace()
  with open(files[-1], "rb") as f:
    space.ParseFromString(f.read())
  return space


def _events(space):
  """Every event of a trace: (name, seconds, event, stat names of its plane)."""
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
    for line in plane.lines:
      for event in line.events:
        yield names.get(event.metadata_id, ""), event.duration_ps * 1e-12, event, stat_names


def _event_stats(event, stat_names: dict) -> dict:
  """An event's stats as {name: value}."""
  values = {}
  for stat in event.stats:
    if stat.str_value:
      value = stat.str_value
    elif stat.ref_value:  # an interned string: the name of a stat metadata entry
      value = stat_names.get(stat.ref_value)
    else:
      value = stat.int64_value or stat.uint64_value or stat.double_value
    values[stat_names.get(stat.metadata_id)] = value
  return values


_DEVICE_PLANE = re.compile(r"/device:(GPU|TPU):\d+$")


def kernel_events(space, instructions=()):
  """(HLO instruction or event name, seconds) of each kernel event of a trace; a name in
  `instructions` is preferred where an event has several.

  XLA:CPU runs its kernels on host threads, as events named by their instruction: every
  event counts (those that name no instruction are left out by the caller). On GPUs and
  TPUs the kernels are the events of the device planes (``/device:GPU:0``), whose names are
  a kernel's (sanitised fusion names, cuBLAS / cuDNN kernels): their instruction comes from
  the event's ``hlo_op`` stat (GPU) or the metadata's display name (TPU). Where such a
  plane has an "XLA Ops" line (TPU, or GPU traces with derived lines), only that line
  counts, so that no kernel is counted twice. (Not yet checked on a real GPU or TPU
  trace: the tests build one.)
  """
  devices = [plane for plane in space.planes if _DEVICE_PLANE.match(plane.name)]
  if not devices:
    for name, seconds, _, _ in _events(space):
      yield name, seconds
    return
  for plane in devices:
    stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
    lines = [line for line in plane.lines if line.name == "XLA Ops"] or plane.lines
    for line in lines:
      for event in line.events:
        meta = plane.event_metadata.get(event.metadata_id)
        stats = _event_stats(meta, stat_names) if meta is not None else {}
        stats.update(_event_stats(event, stat_names))
        names = [str(stats.get("hlo_op") or "")] + (
            [meta.display_name.lstrip("%"), meta.name] if meta is not None else [])
        yield next((n for n in names if n in instructions), names[-1]), \
            event.duration_ps * 1e-12


def profile_call(compiled, call: Callable[[], Any], *, iters: int = 3,
                 trace_dir: str | None = None) -> dict:
  """Kernel time per part of the model for one call of `compiled` (run as `call()`).

  compiled: the ``jax.stages.Compiled`` that `call` runs (its HLO names the kernels); the
  call must be warm. Returns {'wall_s': seconds per call, 'kernel_s': kernel seconds per
  call, 'parts': {part: kernel seconds per call}, 'top': [(seconds, instruction, part), ...]
  the 15 slowest instructions}. Kernel seconds can exceed wall seconds where the runtime
  runs independent kernels side by side.
  """
  if iters < 1:
    raise ValueError(f"iters must be >= 1, got {iters}")
  parts_of = instruction_parts(compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    directory = trace_dir or tmp
    jax.block_until_ready(call())
    jax.profiler.start_trace(directory)
    start = time.perf_counter()
    for _ in range(iters):
      jax.block_until_ready(call())
    wall = (time.perf_counter() - start) / iters
    jax.profiler.stop_trace()
    space = _read_xspace(directory)
  per_instruction: collections.Counter = collections.Counter()
  for name, seconds in kernel_events(space, parts_of):
    if name in parts_of:
      per_instruction[name] += seconds / iters
  parts: collections.Counter = collections.Counter()
  for name, seconds in per_instruction.items():
    parts[parts_of[name]] += seconds
  if not parts:
    raise RuntimeError("no kernel of the trace matched an HLO instruction; this backend's "
                       "trace names kernels differently")
  top = [(s, n, parts_of[n]) for n, s in per_instruction.most_common(15)]
  return {"wall_s": wall, "kernel_s": sum(parts.values()), "parts": dict(parts), "top": top}


def fusion_share(profile: dict) -> float:
  """The fraction of kernel time spent in the fusion's own steps."""
  fusion = sum(s for p, s in profile["parts"].items() if p.startswith("fusion/"))
  return fusion / profile["kernel_s"]


def format_profile(profile: dict, title: str = "") -> str:
  total = profile["kernel_s"]
  lines = [f"{title}wall {profile['wall_s'] * 1e3:.1f} ms/call, kernels "
           f"{total * 1e3:.1f} ms/call; fusion steps {100 * fusion_share(profile):.1f}% "
           f"of kernel time"]
  for part, seconds in sorted(profile["parts"].items(), key=lambda kv: -kv[1]):
    lines.append(f"  {part:<26s} {seconds * 1e3:9.2f} ms  {100 * seconds / total:5.1f}%")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- compile time

# Phases of an XLA:CPU compilation, as its trace names them (event-name prefixes). The
# machine-code phase compiles the emitted kernels with LLVM in unnamed tasks, so only the
# emission is attributed to kernels.
COMPILE_PHASES = (
    ("HLO passes", ("HLO passes through layout assignment",
                    "HLO passes after layout assignment")),
    ("kernel emission", ("ThunkEmitter::EmitEntryComputation", "ThunkEmitter::ConsumeKernels")),
    ("machine code (LLVM)", ("JitCompiler::Compile",)),
)
_KERNEL_EVENT = "FusionCompiler::Compile"


def profile_compile(lowered, *, trace_dir: str | None = None) -> dict:
  """Compiles `lowered` (a ``jax.stages.Lowered``) under jax.profiler: where the time goes.

  Returns {'compiled': the executable, 'compile_s': wall seconds, 'phases': {phase: wall
  seconds} (``COMPILE_PHASES``; empty on backends whose trace has no such events), 'kernels':
  {part: {'count': distinct kernels emitted, 'cpu_s': CPU seconds of their emission}}}.
  Emission runs on several compiler threads, so its CPU seconds can exceed its wall time.
  Kernels are matched to parts by their HLO instruction (``instruction_parts``), which
  XLA:CPU names their modules after (``<instruction>_kernel_module`` or
  ``__compute_module_<instruction>``); any other counts as 'unattributed'.
  Needs a cold compile: with JAX's persistent compilation cache on, a cached program
  compiles nothing (phases and kernels come back empty).
  """
  with tempfile.TemporaryDirectory() as tmp:
    directory = trace_dir or tmp
    jax.profiler.start_trace(directory)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    jax.profiler.stop_trace()
    space = _read_xspace(directory)
  parts_of = instruction_parts(compiled.as_text())
  phases: collections.Counter = collections.Counter()
  kernels: dict[str, dict] = {}
  for name, seconds, event, stat_names in _events(space):
    for phase, prefixes in COMPILE_PHASES:
      if name.startswith(prefixes):
        phases[phase] += seconds
    if name == _KERNEL_EVENT:
      module = str(_event_stats(event, stat_names).get("module") or "")
      instruction = re.sub(r"^__compute_module_|_kernel_module$", "", module)
      part = parts_of.get(instruction, "unattributed")
      entry = kernels.setdefault(part, {"count": 0, "cpu_s": 0.0})
      entry["count"] += 1
      entry["cpu_s"] += seconds
  return {"compiled": compiled, "compile_s": compile_s, "phases": dict(phases),
          "kernels": kernels}


def format_compile_profile(profile: dict, title: str = "") -> str:
  phases = profile["phases"]
  lines = [f"{title}compile {profile['compile_s']:.1f} s"]
  if not phases and not profile["kernels"]:
    return lines[0] + (" (no XLA:CPU compile events in the trace: another backend, or the "
                       "program came from JAX's persistent compilation cache)")
  lines[0] += ": " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
  kernels = profile["kernels"]
  count = sum(k["count"] for k in kernels.values())
  cpu = sum(k["cpu_s"] for k in kernels.values())
  fusion = [k for p, k in kernels.items() if p.startswith("fusion/")]
  lines.append(f"  {count} distinct kernels emitted in {cpu:.1f} CPU-s; the fusion steps' "
               f"{sum(k['count'] for k in fusion)} took "
               f"{sum(k['cpu_s'] for k in fusion):.1f} CPU-s")
  for part, k in sorted(kernels.items(), key=lambda kv: -kv[1]["cpu_s"]):
    lines.append(f"  {part:<26s} {k['count']:6d} kernels {k['cpu_s']:7.2f} CPU-s")
  return "\n".join(lines)
