"""The processes of a multi-process run watch each other: a lost one stops the rest.

Left to ``jax.distributed``, a process that dies leaves the others blocked in their next
collective. Gloo (CPUs) raises at once when the connection resets, after which JAX's exit
waits in its shutdown barrier; on a TPU pod nothing resets and the survivors wait. Either
way the coordination service notices only after its heartbeat timeout (100 s by default)
and then aborts every process from C++ (exit 134, pages of logs); JAX offers a Python
callback for that moment, but this jaxlib cannot call it (``std::bad_cast``).

``ProcessWatch`` gives each process a heartbeat of its own in the coordination service's
key-value store and a thread that reads the others' every ``timeout / 10`` seconds. When
another process has been silent for ``timeout`` seconds, has reported a failure, or the
coordinator (process 0) cannot be reached for that long, the thread prints one line naming
it and ends this process with exit code 1. JAX's heartbeat timeout is set well above
``timeout`` (``jax_heartbeat_timeout``), so this watch speaks first. A process that
finishes normally says so, and is not taken for lost while the others finish.

The watch cannot tell a hung process whose threads still run from a slow one: it catches
processes that die, lose their host or their network, not deadlocks.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback

import jax
from jax._src import distributed

from mctf_jax.errors import ConfigError, is_number

KEY = "mctf_jax/processes/{}"
DONE, FAILED = "done", "failed"
DEFAULT_TIMEOUT = 30.0   # seconds; configs/default.py: distributed.lost_process_timeout
# Errors raised by a collective or the coordination service when a peer is gone.
LOST_PEER_SIGNS = ("Gloo", "Connection reset by peer", "Connection closed by peer",
                   "Socket closed", "heartbeat timeout", "UNAVAILABLE", "DEADLINE_EXCEEDED")

_current: ProcessWatch | None = None


def timeout_from(config) -> float:
  """The config's distributed.lost_process_timeout (the default where a config has no
  such field), checked: ConfigError unless a number of seconds > 0."""
  value = config.get("distributed", {}).get("lost_process_timeout", DEFAULT_TIMEOUT)
  if not is_number(value) or not value > 0:
    raise ConfigError(f"distributed.lost_process_timeout={value!r}: expected a number of "
                      f"seconds > 0")
  return float(value)


def jax_heartbeat_timeout(timeout: float) -> int:
  """JAX's own heartbeat timeout for a watch of `timeout` seconds: late enough that the
  watch has named the lost process and exited before JAX aborts."""
  return int(max(100, 3 * timeout))


class ProcessWatch:
  """Heartbeats through `client` (a ``jax.distributed`` runtime client) for process `index`
  of `count`; see the module docstring. `clock` is for tests."""

  def __init__(self, client, index: int, count: int, timeout: float, *,
               interval: float | None = None, clock=time.monotonic):
    if not timeout > 0:
      raise ValueError(f"the lost-process timeout must be positive, got {timeout!r} s")
    self.client, self.index, self.count, self.timeout = client, index, count, float(timeout)
    self.interval = interval if interval is not None else max(self.timeout / 10, 0.1)
    self._clock = clock
    self._beats = 0
    now = clock()
    self._seen = {p: (None, now) for p in range(count) if p != index}
    self._unreachable_since = None
    self._stopping = threading.Event()
    self._thread = None

  # -- one round

  def check(self) -> str | None:
    """Beats once and reads the others; the reason to stop this process, or None."""
    now = self._clock()
    try:
      self._set(f"alive {self._beats}")
      self._beats += 1
      values = {p: self._get(p) for p in self._seen}
    except Exception as e:  # noqa: BLE001 - the runtime raises its own status errors
      self._unreachable_since = self._unreachable_since or now
      if now - self._unreachable_since >= self.timeout:
        return (f"process {self.index} of {self.count} lost contact with the coordinator "
                f"(process 0) for {self.timeout:.0f} s ({_first_line(e)}); stopping")
      return None
    self._unreachable_since = None
    for p, value in values.items():
      last, since = self._seen[p]
      if value == FAILED:
        return f"process {p} of {self.count} failed (its output says why); stopping"
      if value == DONE:
        continue
      if value != last:
        self._seen[p] = (value, now)
      elif now - since >= self.timeout:
        return (f"process {p} of {self.count} has given no sign of life for "
                f"{self.timeout:.0f} s (killed, lost its host or its network); stopping")
    return None

  def _set(self, value: str) -> None:
    self.client.key_value_set(KEY.format(self.index), value, allow_overwrite=True)

  def _get(self, p: int) -> str | None:
    try:
      return self.client.key_value_try_get(KEY.format(p))
    except Exception as e:  # noqa: BLE001
      if "NOT_FOUND" in str(e):   # not started yet: counts as silent since the watch began
        return None
      raise

  # -- the thread

  def start(self) -> ProcessWatch:
    self._set(f"alive {self._beats}")
    self._thread = threading.Thread(target=self._run, name="mctf_jax-process-watch",
                                     daemon=True)
    self._thread.start()
    return self

  def _run(self) -> None:
    while not self._stopping.wait(self.interval):
      reason = self.check()
      if reason:
        _exit_now(reason)

  def finish(self, ok: bool) -> None:
    """Stops watching and tells the others whether this process ended normally (they go on
    to their own end) or failed (they stop too)."""
    self._stopping.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()
    try:
      self._set(DONE if ok else FAILED)
    except Exception:  # noqa: BLE001 - the coordinator may be gone already
      pass

  def wait_for_verdict(self, seconds: float) -> None:
    """Blocks up to `seconds` while the watch decides whether a peer is lost (it then ends
    the process itself)."""
    if self._thread is not None:
      self._thread.join(seconds)


def _exit_now(reason: str) -> None:
  print(f"error: {reason}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  # Not sys.exit: JAX's exit handler would wait in the shutdown barrier for the lost process.
  os._exit(1)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  line = text[0] if text else type(error).__name__
  return line if len(line) <= 200 else line[:197] + "..."


def start(timeout: float) -> ProcessWatch | None:
  """Starts the watch of this process (after ``jax.distributed.initialize``); None in a
  single-process run."""
  global _current
  client = distributed.global_state.client
  if jax.process_count() == 1 or client is None:
    return None
  _current = ProcessWatch(client, jax.process_index(), jax.process_count(), timeout).start()
  return _current


def current() -> ProcessWatch | None:
  return _current


def wait_for_all(name: str, timeout: float = 3600.0) -> None:
  """Blocks until every process has called wait_for_all(name) (the coordination service's
  barrier; a no-op in a single-process run). Called before the first collective of a
  program that each process compiles on its own: gloo (CPU processes) gives the processes
  30 s to meet in a collective's first use, less than a busy machine's compile times may
  differ by. A lost process still ends the wait through the watch."""
  if _current is not None:
    _current.client.wait_at_barrier(f"mctf_jax/{name}", int(timeout * 1000))


def looks_like_lost_peer(error: BaseException) -> bool:
  text = f"{type(error).__name__}: {error}"
  return any(sign in text for sign in LOST_PEER_SIGNS)


def end() -> None:
  """The end of an entry point: tells the other processes this one finished normally."""
  if _current is not None:
    _current.finish(ok=True)


def fail(message: str | None = None, error: BaseException | None = None) -> None:
  """Ends this process with exit code 1 after an error: `message` as one line, or
  `error`'s traceback. With several processes, an error a collective raised because a peer
  is gone waits for the watch to name that peer (one line, no traceback); any other tells
  the other processes this one failed, so that they stop instead of waiting for it, and
  skips JAX's shutdown barrier."""
  watch = _current
  if watch is not None and error is not None and looks_like_lost_peer(error):
    watch.wait_for_verdict(watch.timeout + 3 * watch.interval)
    message = (f"process {watch.index} of {watch.count}: a collective failed "
               f"({_first_line(error)}); stopping")
  if message is not None:
    print(f"error: {message}", file=sys.stderr, flush=True)
  elif error is not None:
    traceback.print_exception(error)
  if watch is None:
    sys.exit(1)
  watch.finish(ok=False)
  if watch.index == 0:   # the coordinator: let the others read "failed" before it goes
    time.sleep(2 * watch.interval)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)


# ----------------------------------------------------------------------------- supervision
#
# When the coordinator (process 0) goes, JAX's runtime in every other process aborts from
# C++ as soon as its error polling fails (SIGABRT, a fatal log line and a stack dump): no
# Python code runs. So a multi-process train.py or eval.py runs as a thin parent that starts
# the real process as its child, relays its output, forwards SIGTERM, and turns that abort
# into one line and exit code 1.

SUPERVISED_ENV = "MCTF_JAX_SUPERVISOR_PID"
# The runtime's own logs of a lost coordinator (glog lines from these files), held back
# while the child runs: relayed if it ends otherwise, dropped if it aborted for that reason.
_RUNTIME_LOG = re.compile(rb"^[EWF]\d{4} [\d:.]+\s+\d+ (coordination_service_agent|client|"
                          rb"preemption_sync_manager|coordination_service)\.(cc|h):\d+\]")
_COORDINATOR_LOST = b"Terminating process because the JAX distributed service detected"


def supervised() -> bool:
  """Whether this process is the child of ``supervise``. The child dies with its parent."""
  parent = os.environ.get(SUPERVISED_ENV)
  if not parent:
    return False
  if sys.platform.startswith("linux"):
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != int(parent):   # the parent went before the line above took effect
    os._exit(1)
  return True


def supervise(argv: list[str], process_label: str) -> int:
  """Runs ``python argv`` as a child process (see above) and returns the exit code to end
  with: the child's, or 1 (with one line) when the runtime aborted it for a lost
  coordinator."""
  env = dict(os.environ, **{SUPERVISED_ENV: str(os.getpid())})
  child = subprocess.Popen([sys.executable] + argv, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
  held: list[bytes] = []
  lost = threading.Event()

  def relay(source, target, runtime_logs: bool):
    for line in iter(source.readline, b""):
      if runtime_logs and lost.is_set():   # the abort's stack dumps
        continue
      if runtime_logs and _RUNTIME_LOG.match(line):
        if _COORDINATOR_LOST in line:
          lost.set()
        else:
          held.append(line)
        continue
      target.write(line)
      target.flush()

  # SIGTERM (a preemption notice, a job manager's stop) goes on to the child, which saves
  # and stops. SIGINT from a terminal reaches the child directly (same process group).
  previous = {signal.SIGTERM: signal.signal(signal.SIGTERM,
                                            lambda s, f: child.send_signal(signal.SIGTERM)),
              signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
  threads = [threading.Thread(target=relay, args=(child.stdout, sys.stdout.buffer, False)),
             threading.Thread(target=relay, args=(child.stderr, sys.stderr.buffer, True))]
  for t in threads:
    t.start()
  try:
    code = child.wait()
    for t in threads:
      t.join()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  if lost.is_set() and code == -signal.SIGABRT:
    print(f"error: {process_label} lost the coordinator (process 0): it is gone (killed, "
          f"lost its host or its network); stopping", file=sys.stderr, flush=True)
    return 1
  for line in held:
    sys.stderr.buffer.write(line)
  sys.stderr.flush()
  if code < 0:
    print(f"error: {process_label} was ended by {signal.Signals(-code).name}",
          file=sys.stderr, flush=True)
    return 128 - code
  return code
