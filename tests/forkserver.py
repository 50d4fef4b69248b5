"""Launches of train.py, eval.py and the `-m` tools for the tests, forked from one
interpreter that has already imported what they import.

A fresh interpreter spends seconds of CPU importing JAX, Flax, Orbax, TensorFlow and the
package before a test's tiny run starts, and the suite launches dozens. `Launcher` keeps
one server process per test process (started on first use, in the environment the
launches share) that imports those modules once and, for every launch, forks a child
that becomes the script: its own process group, working directory, environment,
``sys.argv`` and ``sys.path``, its stdout and stderr in files, the script run as
``__main__`` (``runpy``), its exit code the script's, its ``atexit`` handlers run. The
server never starts a JAX backend, so each child creates its own, from its own
``XLA_FLAGS``.

A launch goes through the server only where that is the same as a fresh interpreter:
``script.py ...`` or ``-m module ...`` whose environment differs from the server's in
nothing read at import time (``NOT_READ_AT_IMPORT``: variables read when a backend
starts, pytest's own). Anything else runs as a plain subprocess. ``MCTF_TEST_FORK=0``
turns the server off; ``MCTF_TEST_FORK_LOG=FILE`` lists the launches that were not forked
(and the variables that differed) in FILE at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

# Not read when the server's modules are imported: XLA's, JAX's and libtpu's variables are
# read when a backend starts (mctf_jax.tools.compile, imported by some tests, sets the TPU
# ones in their process), Intel OpenMP's when that library loads (Keras's import, which the
# server's TensorFlow skips, sets them in the test process), pytest's name the current test.
# A child may set them otherwise.
NOT_READ_AT_IMPORT = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_", "TPU_", "ALLOW_MULTIPLE_LIBTPU_LOAD",
                      "KMP_", "PYTEST_")

# What the launched scripts import (train.py, eval.py, the tools): the server's imports.
PRELOAD = ("jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "tensorboardX",
           "absl.app", "ml_collections.config_flags", "mctf_jax", "mctf_jax.training.trainer",
           "mctf_jax.data._tf")


def is_script(args) -> bool:
  """Whether `args` run a script or a module (`script.py ...`, `-m module ...`), which the
  server can become; `-c` code and the like run as plain subprocesses."""
  return bool(args) and (args[0].endswith(".py") or (args[0] == "-m" and len(args) > 1))


def differences(env, server_env, set_by_imports=None) -> list[str]:
  """The variables that `env` sets otherwise than the server's and that may be read at
  import. set_by_imports: {name: value} the server's imports set (TensorFlow's
  TF2_BEHAVIOR, ...): the same imports set them in the test process too, so `env` may hold
  them, or not, as long as it holds the same value."""
  set_by_imports = set_by_imports or {}

  def same(k):
    if k in set_by_imports and env.get(k) in (None, set_by_imports[k]):
      return True
    return env.get(k) == server_env.get(k)
  return sorted(k for k in set(env) | set(server_env)
                if not k.startswith(NOT_READ_AT_IMPORT) and not same(k))


class Launcher:
  """``run(args, env, cwd, timeout)`` -> ``subprocess.CompletedProcess`` of
  ``[sys.executable] + args``, forked from the server where it runs a script (`is_script`)
  in the server's environment (no `differences`). server_env: the server's environment
  (that of most launches), whatever launch comes first."""

  def __init__(self, server_env: dict):
    self._server = None
    self._env = dict(server_env)
    self._set_by_imports = None   # {name: value}, once the server has started
    self.forked = 0   # launches the server ran
    self.fallbacks = []   # (args, the variables that differed) of the others
    atexit.register(self.close)

  def _start(self):
    self._server = subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=self._env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = self._server.stdout.readline()
    if not ready.startswith("ready "):
      raise RuntimeError(f"the test launch server did not start: {ready!r}")
    after = json.loads(ready[len("ready "):])
    self._set_by_imports = {k: v for k, v in after.items() if self._env.get(k) != v}

  def close(self):
    log = os.environ.get("MCTF_TEST_FORK_LOG")   # where to list the launches not forked
    if log and self.fallbacks:
      with open(log, "a") as f:
        f.writelines(f"{json.dumps(args)} {' '.join(keys)}\n" for args, keys in self.fallbacks)
      self.fallbacks = []
    if self._server is not None and self._server.poll() is None:
      self._server.stdin.close()
      self._server.wait(timeout=30)
    self._server = None

  def run(self, args, env, cwd, timeout):
    cmd = [sys.executable] + list(args)
    if os.environ.get("MCTF_TEST_FORK", "1") == "0":
      return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if self._server is None or self._server.poll() is not None:
      self._start()
    differing = differences(env, self._env, self._set_by_imports)
    if differing or not is_script(args):
      self.fallbacks.append((list(args), differing))
      return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="launch") as tmp:
      out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
      request = dict(args=list(args), env=dict(env), cwd=str(cwd), timeout=timeout,
                     stdout=out, stderr=err)
      self._server.stdin.write(json.dumps(request) + "\n")
      self._server.stdin.flush()
      reply = json.loads(self._server.stdout.readline())
      with open(out, errors="replace") as f, open(err, errors="replace") as g:
        stdout, stderr = f.read(), g.read()
    self.forked += 1
    if reply["timed_out"]:
      raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(cmd, reply["returncode"], stdout, stderr)


# ---------------------------------------------------------------------------------- server

def _become_script(request) -> int:
  """In the forked child: the interpreter `python ARGS` would be, then run it."""
  import runpy
  os.setpgid(0, 0)
  # A fresh interpreter's handlers (the imports may have set others; SIGPIPE stays ignored).
  signal.signal(signal.SIGINT, signal.default_int_handler)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
    file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(file, fd)
    os.close(file)
  os.close(0)
  os.open(os.devnull, os.O_RDONLY)
  sys.stdin = open(0, closefd=False)
  sys.stdout = open(1, "w", buffering=1, closefd=False)
  sys.stderr = open(2, "w", buffering=1, closefd=False)
  os.chdir(request["cwd"])
  os.environ.clear()
  os.environ.update(request["env"])
  args = request["args"]
  site = sys.path[1:]   # PYTHONPATH, the standard library, site-packages (not this file's dir)
  try:
    if args[0] == "-m":
      sys.argv = [args[1]] + args[2:]
      sys.path[:] = [os.getcwd()] + site
      runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
      sys.argv = list(args)
      sys.path[:] = [os.path.dirname(os.path.realpath(args[0]))] + site
      runpy.run_path(args[0], run_name="__main__")
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if e.code is not None and not isinstance(e.code, int):
      print(e.code, file=sys.stderr)
  except BaseException as e:  # noqa: BLE001 - as the interpreter: the traceback, exit 1
    import traceback
    tb = e.__traceback__   # from the script's frame on, as a fresh interpreter prints it
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__,
                                                                "<frozen runpy>"):
      tb = tb.tb_next
    traceback.print_exception(type(e), e, tb)
    code = 1
  atexit._run_exitfuncs()   # noqa: SLF001 - what the interpreter runs at exit
  sys.stdout.flush()
  sys.stderr.flush()
  return code


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
  deadline = time.monotonic() + timeout
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status), False
    if time.monotonic() > deadline:
      os.killpg(pid, signal.SIGKILL)
      os.waitpid(pid, 0)
      return -signal.SIGKILL, True
    time.sleep(0.02)


def serve() -> None:
  import importlib
  for module in PRELOAD:
    importlib.import_module(module)
  from jax._src import xla_bridge
  assert not xla_bridge._backends, "the server must not start a JAX backend"  # noqa: SLF001
  reply = sys.stdout
  print("ready", json.dumps(dict(os.environ)), file=reply, flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
      code = 1
      try:
        code = _become_script(request)
      finally:
        os._exit(code)
    returncode, timed_out = _wait(pid, request["timeout"])
    print(json.dumps(dict(returncode=returncode, timed_out=timed_out)), file=reply,
          flush=True)


if __name__ == "__main__":
  serve()
