"""What the command-line tools and benchmark scripts share: one-line errors, the --json
output file (checked before the work, written after it), and a script's first steps.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app

from mctf_jax import parallel


def fail(message: str):
  """A bad command-line value: one line on stderr, exit status 1 (no usage wall)."""
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(1)


def check_output_file(path: str, flag: str = "--json") -> None:
  """Raises ValueError, naming `flag`, where no file can be written at `path`: checked
  before a long run so that it does not end in that error after its work is done."""
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ValueError(f"{flag}={path} is a directory; expected the path of a file to write")
  if not os.path.isdir(directory):
    raise ValueError(f"{flag}={path}: the directory {directory} does not exist")
  if not os.access(directory, os.W_OK):
    raise ValueError(f"{flag}={path}: the directory {directory} is not writable")


def write_json(path: str, data: Any, flag: str = "--json") -> None:
  """Writes `data` as indented JSON (what JSON has no type for as its str) and says so; an
  unwritable path fails as ``fail``."""
  try:
    with open(path, "w") as f:
      json.dump(data, f, indent=1, default=str)
  except OSError as e:
    fail(f"cannot write {flag}={path}: {e}")
  print(f"wrote {path}")


def begin_script(argv, flag_values) -> None:
  """The first steps of a benchmark script's absl main: no stray arguments, the libraries'
  INFO lines only with --verbosity, and a --json path (if the script has one) that can be
  written, checked before the work; bad values raise app.UsageError."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  parallel.quiet_library_logs(flag_values)
  path = getattr(flag_values, "json", None)
  if path:
    try:
      check_output_file(path)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
