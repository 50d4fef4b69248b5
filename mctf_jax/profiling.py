"""Where a compiled program's time goes: kernel times from a jax.profiler trace, by part.

``profile_call(compiled, call)`` traces a few calls of a compiled function, reads the trace
(XSpace protobuf, as written by ``jax.profiler``), matches each kernel event to its HLO
instruction and that instruction's ``op_name`` metadata (the JAX name stack), and sums the
kernel time per part of the model:

* the fusion's own steps, marked by named scopes in ``mctf_jax.fusion``:
  ``fusion/scores`` (the matching scores), ``fusion/matching`` (bipartite matching),
  ``fusion/merge`` (merging tokens and sizes, source maps), ``fusion/attn_merge`` (the
  one-step-ahead attention merge, around the ordinary probs @ v product);
* the model's: ``attention/qk+softmax`` (with the size bias of proportional attention),
  ``attention/probs@v``, ``attention/v``,
  ``attention/proj``, ``mlp``, ``norm``, ``embed``, ``head``, and ``other``.

Backward-pass kernels (``transpose(...)`` in the name stack) get a ``/bwd`` suffix.
The kernel names are the HLO instruction names, which is how XLA's CPU and GPU runtimes
label their trace events; time spent in kernels that no instruction name matches (copies
inserted by the runtime, host callbacks) is counted as ``unattributed``.
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

from mctf_jax.fusion import SCOPE_PREFIX

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")

def _component_part(component: str) -> str | None:
  """The model part one name-stack component (a Flax module or method, a named scope)
  stands for, if any."""
  name = component.split(".")[-1] if component.startswith("VisionTransformer.") else component
  if component.startswith("attn.probs") or component.endswith("._attn_size"):
    return "attention/qk+softmax"
  if component in ("attn.attend", "attend"):
    return "attention/probs@v"
  if component.startswith("attn.values"):
    return "attention/v"
  if component.startswith("attn.output"):
    return "attention/proj"
  if component == "mlp":
    return "mlp"
  if re.fullmatch(r"norm\d*", component):
    return "norm"
  if component == "patch_embed" or name == "embed":
    return "embed"
  if component == "head" or name == "classify":
    return "head"
  return None


def part_of(op_name: str) -> str:
  """The part of the model an instruction with this ``op_name`` belongs to."""
  suffix = "/bwd" if "transpose(" in op_name else ""
  scopes = re.findall(re.escape(SCOPE_PREFIX) + r"(\w+)", op_name)
  if scopes:
    return "fusion/" + scopes[-1] + suffix
  # The innermost component that names a part wins.
  for component in reversed(re.split(r"[/()]", op_name)):
    part = _component_part(component)
    if part is not None:
      return part + suffix
  return "other" + suffix


def instruction_parts(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> part, from a compiled module's text (``compiled.as_text()``)."""
  parts = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      parts[m.group(1)] = part_of(m.group(2))
  return parts


def _read_xspace(directory: str):
  try:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
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
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      for event in line.events:
        name = names.get(event.metadata_id)
        if name in parts_of:
          per_instruction[name] += event.duration_ps * 1e-12 / iters
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
