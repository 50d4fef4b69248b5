"""The watch that stops a multi-process run when one process is lost (mctf_jax.processes),
on a key-value store and a clock of our own; train.py's processes killed for real:
tests/test_entry_points.py."""

import subprocess
import sys
import textwrap

import pytest

from mctf_jax import processes
from conftest import ROOT


class Store:
  """The coordination service's key-value store as the runtime client shows it."""

  def __init__(self):
    self.values, self.reachable = {}, True

  def key_value_set(self, key, value, allow_overwrite=False):
    self._check()
    assert allow_overwrite
    self.values[key] = value

  def key_value_try_get(self, key):
    self._check()
    if key not in self.values:
      raise RuntimeError(f"NOT_FOUND: Config key {key} not found.")
    return self.values[key]

  def _check(self):
    if not self.reachable:
      raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service.")


class Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _watches(count=3, timeout=10.0):
  store, clock = Store(), Clock()
  return store, clock, [processes.ProcessWatch(store, i, count, timeout, clock=clock)
                        for i in range(count)]


def _round(clock, watches, seconds, skip=()):
  clock.now += seconds
  return [None if i in skip else w.check() for i, w in enumerate(watches)]


def test_a_silent_process_is_named_after_the_timeout_and_not_before():
  store, clock, watches = _watches()
  for _ in range(5):   # all beating: nothing to say, however long
    assert _round(clock, watches, 4.0) == [None] * 3
  # Process 2's last beat (in the round above, after 0 and 1 had read) is first seen in the
  # next round: silence counts from then.
  for _ in range(3):
    assert _round(clock, watches, 4.0, skip={2}) == [None] * 3
  verdict = _round(clock, watches, 2.5, skip={2})   # 10.5 s since its last beat was seen
  assert verdict[:2] == ["process 2 of 3 has given no sign of life for 10 s (killed, lost "
                         "its host or its network); stopping"] * 2


def test_a_process_that_never_beats_counts_as_silent_from_the_start():
  store, clock, watches = _watches(count=2)
  assert watches[0].check() is None
  clock.now += 10.0
  assert watches[0].check().startswith("process 1 of 2 has given no sign of life")


def test_finished_and_failed_processes():
  store, clock, watches = _watches()
  _round(clock, watches, 1.0)
  watches[1].finish(ok=True)      # ends normally: the others go on to their own end
  for _ in range(4):
    assert _round(clock, watches, 5.0, skip={1}) == [None, None, None]
  watches[2].finish(ok=False)
  assert watches[0].check() == "process 2 of 3 failed (its output says why); stopping"


def test_an_unreachable_coordinator():
  store, clock, watches = _watches(count=2)
  assert watches[1].check() is None
  store.reachable = False
  assert _round(clock, watches, 6.0, skip={0}) == [None, None]
  store.reachable = True           # a blip: forgotten once it answers again
  assert _round(clock, watches, 6.0, skip={0})[1].startswith("process 0 of 2 has given")
  store.reachable = False
  _round(clock, watches, 0.0, skip={0})
  verdict = _round(clock, watches, 10.0, skip={0})[1]
  assert verdict.startswith("process 1 of 2 lost contact with the coordinator (process 0) "
                            "for 10 s (UNAVAILABLE: Failed to send RPC"), verdict


@pytest.mark.parametrize("value", [0, -3, "30", None])
def test_the_timeout_is_checked(value):
  from ml_collections import ConfigDict
  from mctf_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=r"distributed.lost_process_timeout=.*: expected a "
                     r"number of seconds > 0"):
    processes.timeout_from(ConfigDict({"distributed": {"lost_process_timeout": value}}))
  assert processes.jax_heartbeat_timeout(30.0) == 100   # JAX's own comes after ours
  assert processes.jax_heartbeat_timeout(60.0) == 180


def test_the_supervisor_turns_the_runtime_abort_into_one_line():
  """A child that logs as JAX's runtime does when the coordinator is gone, then aborts:
  its output up to then comes through, the runtime's lines do not, and the parent ends
  with exit code 1 and one line. A child that ends otherwise keeps its output and code."""
  child = textwrap.dedent('''
      import os, sys, signal
      print("step 5/10", flush=True)
      print("E1206 12:02:30.911554   29482 coordination_service_agent.cc:289] Polled an "
            "error from coordination service", file=sys.stderr, flush=True)
      if sys.argv[1] == "abort":
        print("F1206 12:02:30.911567   29482 client.h:80] Terminating process because the JAX "
              "distributed service detected fatal errors.", file=sys.stderr, flush=True)
        print("*** Check failure stack trace: ***", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGABRT)
      sys.exit(int(sys.argv[1]))
  ''')
  script = textwrap.dedent(f'''
      import sys
      from mctf_jax import processes
      sys.exit(processes.supervise(["-c", {child!r}, sys.argv[1]], "process 1 of 2"))
  ''')
  for arg, code, err in (
      ("abort", 1, "error: process 1 of 2 lost the coordinator (process 0): it is gone "
                   "(killed, lost its host or its network); stopping\n"),
      ("3", 3, "E1206 12:02:30.911554   29482 coordination_service_agent.cc:289] Polled an "
               "error from coordination service\n")):
    done = subprocess.run([sys.executable, "-c", script, arg], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (code, "step 5/10\n", err)
