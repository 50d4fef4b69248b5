"""Top-1 / top-5 over every example of a split, on any mesh (shared by train.py and eval.py).

Every process feeds its own padded batches (``mask`` False on padding); the jitted step
sums hits over the global batch, so each example counts exactly once whatever the number
of processes and devices.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
from tqdm import tqdm

from mctf_jax import parallel
from mctf_jax.errors import ConfigError


def check_image_outputs(model, script: str) -> None:
  """ConfigError where the model gives an output per token, not per image (big_vision's
  pool 'none'): the classification losses and accuracies of `script` need one per image."""
  if model.config.per_token_outputs:
    raise ConfigError(f"{script} trains and evaluates image classifiers, but "
                      f"model.pool_type={model.config.pool_type!r} gives an output per token "
                      f"(batch, tokens, num_classes); choose a pooling ('tok', 'gap', 'map', "
                      f"'0'), or run the encoder from Python (model.apply, ViT.grid_outputs)")


def make_eval_step(model, forward: Callable | None = None):
  """eval_step(variables, batch) -> summed top-1 / top-5 hits and the count of real
  examples; variables: {'params': ...} and the model's state collections, if any.
  forward(variables, images) -> logits: default ``model.apply``."""
  forward = model.apply if forward is None else forward

  def eval_step(variables, batch):
    logits = forward(variables, batch["image"]).astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    k = min(5, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    hits = top == batch["label"][:, None]
    return {"top1": jnp.sum(hits[:, 0] * mask), "top5": jnp.sum(jnp.any(hits, -1) * mask),
            "count": jnp.sum(mask)}
  return eval_step


def compile_eval_step(model, mesh, variable_shardings, forward: Callable | None = None):
  return jax.jit(make_eval_step(model, forward), in_shardings=(variable_shardings,
                                                      parallel.batch_sharding(mesh)))


def compiled_eval_step(model, mesh, variables, batch):
  """The evaluation step of `model` compiled for `variables` and the global `batch`
  (arrays, or ShapeDtypeStructs with their shardings, e.g. ``programs.eval_batch``).

  Compiled before its first use because that use is a collective (the sums over the
  global batch): the caller lets the processes meet (``processes.wait_for_all``) between
  compiling and running, as gloo (CPU processes) waits only 30 s in a collective's first
  use for a process still compiling."""
  shardings = jax.tree.map(lambda x: x.sharding, variables)
  return compile_eval_step(model, mesh, shardings).lower(variables, batch).compile()


def accuracy(eval_step: Callable, variables, batches: Iterable[dict], mesh, *,
             progress: str | None = None, total: int | None = None) -> dict:
  """{'top1': %, 'top5': %, 'images': n} of the model's `variables` over the local `batches`
  of every process.

  progress: a label for a progress bar on process 0 (None: no bar). total: batches expected.
  """
  if progress is not None and jax.process_index() == 0:
    batches = tqdm(batches, desc=progress, total=total, unit="batch", leave=False,
                   dynamic_ncols=True)
  totals = None
  for local in batches:
    sums = eval_step(variables, parallel.global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError("the evaluation split yielded no batches")
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"top1": 100 * float(totals["top1"]) / max(count, 1),
          "top5": 100 * float(totals["top5"]) / max(count, 1), "images": int(count)}
