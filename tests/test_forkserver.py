"""The suite's launches forked from a server (tests/forkserver.py) behave as fresh
interpreters: what a script sees and prints, its exit code and its devices."""

import os
import subprocess
import sys

import pytest

import conftest
import forkserver
from conftest import FAST_COMPILE, launch_env, run

pytestmark = pytest.mark.skipif(os.environ.get("MCTF_TEST_FORK") == "0",
                                reason="MCTF_TEST_FORK=0: launches are fresh interpreters")

PROBE = """\
import atexit, os, sys
import jax
atexit.register(lambda: print("at exit"))
print(__name__, sys.argv, os.getcwd(), sys.path[0] == os.path.dirname(os.path.realpath(__file__)))
print(os.environ.get("PROBE"), jax.device_count())
print("to stderr", file=sys.stderr)
if sys.argv[1] == "raise":
  raise ValueError("probe")
sys.exit(int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1])
"""


@pytest.mark.parametrize("arg", ["0", "3", "raise", "a message"])
def test_a_forked_launch_is_what_a_fresh_interpreter_gives(arg, tmp_path, env):
  probe = tmp_path / "probe.py"
  probe.write_text(PROBE)
  two = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}")
  forked_before = conftest._LAUNCHER.forked
  forked = run([str(probe), arg], two, timeout=120, cwd=tmp_path)
  assert conftest._LAUNCHER.forked == forked_before + 1, conftest._LAUNCHER.fallbacks[-1:]
  fresh = subprocess.run([sys.executable, str(probe), arg], cwd=tmp_path, env=two,
                         capture_output=True, text=True, timeout=120)
  assert (forked.returncode, forked.stdout, forked.stderr) == \
      (fresh.returncode, fresh.stdout, fresh.stderr)
  assert forked.stdout.splitlines()[1] == "None 2" and forked.stdout.endswith("at exit\n")
  assert forked.returncode == {"0": 0, "3": 3}.get(arg, 1)


def test_launches_the_server_cannot_make_run_fresh(tmp_path, env):
  """An environment the imports would read differently runs a real interpreter; `-m` runs
  a module; a launch past its timeout is killed."""
  probe = tmp_path / "probe.py"
  probe.write_text(PROBE)
  from mctf_jax.tools import compile as _  # noqa: F401 - sets libtpu's variables here
  import tensorflow as _  # noqa: F401,F811 - sets TF2_BEHAVIOR and others here
  run([str(probe), "0"], launch_env(), timeout=120)   # (the server started)
  assert forkserver.differences(launch_env(), conftest._LAUNCHER._env,
                                conftest._LAUNCHER._set_by_imports) == []   # they fork too
  before = conftest._LAUNCHER.forked
  other = run([str(probe), "0"], dict(env, JAX_ENABLE_X64="1", PROBE="x"), timeout=120)
  assert other.returncode == 0 and other.stdout.splitlines()[1] == "x 1"
  assert conftest._LAUNCHER.forked == before
  module = run(["-m", "json.tool", "--help"], env, timeout=60)
  assert module.returncode == 0 and "usage:" in module.stdout
  assert conftest._LAUNCHER.forked == before + 1
  (tmp_path / "slow.py").write_text("import time\ntime.sleep(60)\n")
  with pytest.raises(subprocess.TimeoutExpired):
    run([str(tmp_path / "slow.py")], env, timeout=2)
  assert run([str(probe), "3"], env, timeout=120).returncode == 3   # the server lives on
