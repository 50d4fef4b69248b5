"""Devices, mesh and shardings: data parallel over every device, optional FSDP.

The mesh has two axes, ``('data', 'fsdp')``. The batch is split over both; parameters (and
optimizer state, EMA) are either replicated (fsdp=1) or split along one dimension over the
``fsdp`` axis, and XLA inserts the all-gathers. Multi-host runs call
``jax.distributed.initialize()`` first (``maybe_initialize_distributed``); each process then
feeds its own slice of the global batch (``global_batch``).
"""

from __future__ import annotations

import logging

import os
import sys
import warnings

import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mctf_jax import processes
from mctf_jax.config import ConfigError
from mctf_jax.errors import MctfError

BATCH_AXES = ("data", "fsdp")

def _several_processes() -> bool:
  """Whether the environment describes a multi-process job jax.distributed can join."""
  env = os.environ
  return bool(env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS")
              or "," in env.get("TPU_WORKER_HOSTNAMES", "")
              or int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
              or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def distributed_requested(flag_values) -> bool:
  """Whether ``setup_runtime`` will start the distributed runtime for these flags."""
  mode = flag_values.distributed
  return mode == "true" or (mode == "auto" and (flag_values.coordinator_address is not None
                                                or _several_processes()))


def process_label(flag_values) -> str:
  """'process I of N' as the flags give them (a cluster's environment tells JAX, not us)."""
  if flag_values.process_id is not None:
    return f"process {flag_values.process_id} of {flag_values.num_processes}"
  return "this process"


def maybe_initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 lost_process_timeout: float = processes.DEFAULT_TIMEOUT
                                 ) -> bool:
  """jax.distributed.initialize() when asked ('true'), when a coordinator is given, or, for
  'auto', when the environment describes several processes (a TPU pod slice, SLURM, Open
  MPI, or JAX_COORDINATOR_ADDRESS). On CPUs the processes talk through gloo. The processes
  then watch each other (``processes.ProcessWatch``): one silent for `lost_process_timeout`
  seconds stops the others, with exit code 1."""
  if mode not in ("auto", "true", "false"):
    raise ValueError(f"--distributed must be auto, true or false, got {mode!r}")
  explicit = coordinator_address is not None
  if mode == "false" or (mode == "auto" and not explicit and not _several_processes()):
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if explicit:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=processes.jax_heartbeat_timeout(
      lost_process_timeout))
  processes.start(lost_process_timeout)
  return True


def default_compilation_cache() -> str:
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "mctf_jax", "xla")


def enable_compilation_cache(path: str | None) -> None:
  """Keeps compiled programs on disk, so that a resumed run or a second evaluation of the
  same model starts without compiling again (MCTF's many static shapes compile slowly)."""
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def define_runtime_flags() -> None:
  """The command-line flags of train.py and eval.py that set up the JAX runtime:
  --distributed, --coordinator_address, --num_processes, --process_id, --compilation_cache."""
  flags.DEFINE_string("compilation_cache", None, "Directory of JAX's persistent compilation "
                      "cache (default: $JAX_COMPILATION_CACHE_DIR or ~/.cache/mctf_jax/xla); "
                      "'' turns it off.")
  flags.DEFINE_enum("distributed", "auto", ["auto", "true", "false"],
                    "Call jax.distributed.initialize() (auto: when running on several hosts).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process "
                      "runs without a cluster manager (with --num_processes, --process_id).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with "
                       "--coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")

  def check(values):
    address, count, index = (values["coordinator_address"], values["num_processes"],
                             values["process_id"])
    if address is None:
      if count is not None or index is not None:
        raise flags.ValidationError("--num_processes and --process_id go with "
                                    "--coordinator_address=host:port, which is missing")
      return True
    if count is None or index is None:
      raise flags.ValidationError(f"--coordinator_address={address} needs --num_processes "
                                  f"and --process_id")
    if count < 1:
      raise flags.ValidationError(f"--num_processes={count} must be at least 1")
    if not 0 <= index < count:
      raise flags.ValidationError(f"--process_id={index} must lie in [0, --num_processes="
                                  f"{count})")
    return True

  flags.register_multi_flags_validator(
      ["coordinator_address", "num_processes", "process_id"], check)


def quiet_library_logs(flag_values) -> None:
  """The libraries' INFO logs (JAX's backend search, Orbax's saves and restores) only when
  absl's --verbosity asks for them; for train.py, eval.py and the tools."""
  if not flag_values["verbosity"].present:
    for name in ("absl", "jax"):
      logging.getLogger(name).setLevel(logging.WARNING)
    # Orbax logs a failed save or restore as errors from its threads; train.py and eval.py
    # report it themselves, in one line.
    logging.getLogger("absl").addFilter(
        lambda record: record.levelno >= logging.CRITICAL or "orbax" not in record.pathname)


def run_entry_point(flag_values, body) -> None:
  """The frame of train.py and eval.py around `body()`: with several processes, the
  supervising parent (``processes.supervise``); the config's lost-process timeout checked
  and the runtime started (``setup_runtime``); an MctfError as one line and exit code 1; with
  several processes, any error of one process stopping the others (``processes.fail``)."""
  if distributed_requested(flag_values) and not processes.supervised():
    sys.exit(processes.supervise(sys.argv, process_label(flag_values)))
  try:
    setup_runtime(flag_values, processes.timeout_from(flag_values.config))
    body()
  except MctfError as e:
    # A failed asynchronous checkpoint write can leave orbax's write coroutines unawaited;
    # the failure is in this one line, so Python's warning about them at exit is noise.
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                            category=RuntimeWarning)
    processes.fail(str(e))
  except Exception as e:  # noqa: BLE001 - with several processes, the others must stop too
    if processes.current() is None:
      raise
    processes.fail(error=e)
  processes.end()


def setup_runtime(flag_values, lost_process_timeout: float = processes.DEFAULT_TIMEOUT
                  ) -> None:
  """Starts the distributed runtime and the compilation cache as ``define_runtime_flags``'
  flags say, with the libraries' logs quiet (``quiet_library_logs``)."""
  quiet_library_logs(flag_values)
  maybe_initialize_distributed(flag_values.distributed, flag_values.coordinator_address,
                               flag_values.num_processes, flag_values.process_id,
                               lost_process_timeout)
  cache = flag_values.compilation_cache
  enable_compilation_cache(default_compilation_cache() if cache is None else cache)


def create_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ConfigError(f"mesh.fsdp={fsdp} must be >= 1 and divide the number of devices "
                      f"({len(devices)})")
  grid = np.asarray(devices, dtype=object).reshape(len(devices) // fsdp, fsdp)
  return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _leaf_spec(shape, fsdp: int) -> P:
  """Split the largest dimension divisible by fsdp; replicate small or indivisible leaves."""
  if fsdp == 1 or not shape or int(np.prod(shape)) < 2 ** 14:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, tree):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs): FSDP where it applies."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(tuple(x.shape), fsdp)), tree)


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size"):
  n = mesh.devices.size
  if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or \
      global_batch_size < 1:
    raise ConfigError(f"{what}={global_batch_size!r}: expected an int >= 1")
  if global_batch_size % n:
    raise ConfigError(f"{what}={global_batch_size} is not divisible by the number of "
                      f"devices ({n}); choose a multiple of {n}")
  if global_batch_size % jax.process_count():
    raise ConfigError(f"{what}={global_batch_size} is not divisible by the number of "
                      f"processes ({jax.process_count()})")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's numpy slice into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
