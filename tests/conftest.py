"""Shared test helpers: the golden cases of the official PyTorch code, tiny configs."""

import json
import os

# Multi-device behaviour is tested on 8 simulated CPU devices (set before JAX starts).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's time is mostly XLA compiling many small programs, which LLVM's optimisation
# level 0 does ~30% faster; the numerics are the same (no fast-math either way). The
# train.py/eval.py subprocesses get it too: their runs are small (tests/configs/
# digits_tiny.py) and compiling dominates them. Benchmarks run at the default.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + FAST_COMPILE

import fcntl
import subprocess
import tempfile

import jax
import numpy as np
import pytest

import forkserver
from mctf_jax import FusionConfig

# One persistent compilation cache for the test session, shared by the xdist workers and
# the train.py/eval.py subprocesses: many tests compile the same programs.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "mctf_jax_test_xla_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

_VARIABLES = {}


def init_variables(model, seed: int = 0):
  """``jax.jit(model.init)(jax.random.key(seed), model.dummy_images())``, computed once per
  backbone config and seed in the test session: fusion adds no variable, so every fusion
  config of a backbone shares them (the unfused model is initialised: it traces faster;
  test_backbones.py checks that the variables are the fused model's). Fresh containers,
  shared arrays."""
  key = (type(model), model.config, seed)
  if key not in _VARIABLES:
    plain = model.clone(fusion=FusionConfig(r=0.0))
    _VARIABLES[key] = jax.jit(plain.init)(jax.random.key(seed), plain.dummy_images())
  return jax.tree.map(lambda x: x, _VARIABLES[key])


GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
EVAL_CASES = ("tiny_default", "tiny_ratio", "tiny_no_osa", "tiny_tome_like",
              "tiny_recipe_pool_attn")
TRAIN_CASES = ("tiny_train", "tiny_recipe_train")


def load_golden(case: str):
  with open(os.path.join(GOLDEN_DIR, f"{case}.json")) as f:
    meta = json.load(f)
  data = np.load(os.path.join(GOLDEN_DIR, f"{case}.npz"))
  return meta, {k: data[k] for k in data.files}


def golden_config(meta, dtype="float32", **fusion_changes):
  """The JAX config of a golden case: the JSON's model/fusion fields map one to one."""
  fusion = dict(meta["fusion"], **fusion_changes)
  return {"model": dict(meta["model"], dtype=dtype, param_dtype=dtype), "fusion": fusion}


def golden_state_dict(data):
  return {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}


def golden_images(data, dtype):
  return np.asarray(data["images"].transpose(0, 2, 3, 1), dtype)


def timm_model_config(meta, dtype):
  """The model config of a reference case made on timm's VisionTransformer (ToMe's,
  PiToMe's): its constructor arguments as the json records them."""
  kw = meta["timm_vision_transformer_kwargs"]
  model = {k: kw[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads",
                              "num_classes", "qkv_bias")}
  return dict(model, layer_norm_eps=meta["layer_norm_eps"], dtype=dtype, param_dtype=dtype)


def run_timm_case(config, data, dtype):
  """(model, logits, encoder outputs) of a reference case made on timm's ViT (ToMe's,
  PiToMe's): its weights converted, its images run through the model of `config`."""
  import mctf_jax
  from mctf_jax import convert
  model = mctf_jax.create_model(config)
  params = convert.torch_to_flax(golden_state_dict(data), config)
  images = golden_images(data, dtype)
  logits, out = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method=model.encode)))(
      {"params": params}, images)
  return model, np.asarray(logits), out


def assert_gradients_match_differences(model, params, images, rtol=1e-6):
  """Float64 gradients of a random projection of the logits equal central differences
  along a random direction of every parameter (the merge decisions fixed under the step)."""
  import jax.numpy as jnp
  weights = jax.random.normal(jax.random.key(0), (images.shape[0], model.config.num_classes),
                              jnp.float64)

  def loss(p):
    return jnp.sum(model.apply({"params": p}, images) * weights)

  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  direction = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])
  eps = 1e-6
  shifted = jax.jit(lambda p, s: loss(jax.tree.map(lambda a, d: a + s * eps * d, p, direction)))
  numeric = (shifted(params, 1.0) - shifted(params, -1.0)) / (2 * eps)
  grads = jax.jit(jax.grad(loss))(params)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads),
                                                 jax.tree.leaves(direction)))
  np.testing.assert_allclose(analytic, numeric, rtol=rtol)
  return grads


def tiny_config(**fusion):
  """A small model for fast tests (the golden architecture, 65 tokens)."""
  base = dict(r=8, layers=(1, 2, 3), one_step_ahead="approx", pooling="size",
              trace_source=True, teacher_r_max=4)
  base.update(fusion)
  return {"model": dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                        num_classes=10), "fusion": base}


def jit_apply(model, **kwargs):
  """model.apply({'params': p}, images, **kwargs), jitted (eager Flax is slow on CPU)."""
  return jax.jit(lambda params, images, rngs=None: model.apply(
      {"params": params}, images, rngs=rngs, **kwargs))


@pytest.fixture
def x64():
  """Runs a test with float64 enabled (and restores the setting)."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


# ----------------------------------------------------------------------------- entry points

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_TINY = "tests/configs/digits_tiny.py"


def launch_env(**changes) -> dict:
  """The environment of the suite's launches of train.py, eval.py, the tools and the
  benchmarks: this process's (8 CPU devices), with tests/ on the path (for the toy
  backbones) and TensorFlow's logs quiet; `changes` on top. Launches that differ from
  each other only in XLA's variables share the fork server's imports (`run`)."""
  return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
              JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", **changes)


@pytest.fixture(scope="session")
def env():
  """The environment of train.py / eval.py runs: `launch_env` with one CPU device, unless a
  test asks for more."""
  return launch_env(XLA_FLAGS=FAST_COMPILE)


_LAUNCHER = forkserver.Launcher(launch_env(XLA_FLAGS=FAST_COMPILE))


def pytest_sessionfinish():
  _LAUNCHER.close()   # in every xdist worker too


def run(args, env, timeout=600, cwd=ROOT) -> subprocess.CompletedProcess:
  """``python ARGS`` in `cwd` with `env`, its output captured; forked from a server that has
  made the imports once where that is the same as a fresh interpreter (tests/forkserver.py)."""
  return _LAUNCHER.run(args, env, cwd, timeout)


def digits_config(arch=None) -> str:
  """The --config flag of the end-to-end runs: digits_tiny, or ARCH's TINY size on it."""
  return f"--config={DIGITS_TINY}" + (f":{arch}" if arch else "")


def run_once(tmp_path_factory, name: str, make) -> tuple[str, str]:
  """(directory, text): make(directory) -> text run once per test session for every xdist
  worker (the first to take the lock runs it and keeps its text; the others read it)."""
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent
  directory, text = shared / name, shared / f"{name}.out"
  with open(shared / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not text.exists():
      text.write_text(make(directory))
  return str(directory), text.read_text()


@pytest.fixture(scope="session")
def trained(tmp_path_factory, env):
  """trained(arch=None) -> (workdir, stdout) of one uninterrupted train.py run of
  ``digits_config(arch)``, shared by the tests of every xdist worker (``run_once``)."""

  def get(arch=None):
    def train(workdir):
      done = run(["train.py", digits_config(arch), f"--workdir={workdir}"], env)
      assert done.returncode == 0, done.stdout + done.stderr
      return done.stdout
    name = "uninterrupted" + (f"_{arch.replace(':', '_')}" if arch else "")
    return run_once(tmp_path_factory, name, train)

  return get
