"""What mctf_jax raises on bad input, and the small checks that raise it.

Every error a user can cause (a config value, a checkpoint, a dataset, a run that cannot
go on, an output that cannot be written) is an ``MctfError``: train.py, eval.py and the
command-line tools print its message in one line and exit with status 1. Anything else is
a bug and keeps its traceback. The classes also derive from the built-in exception that
describes them (``ValueError``, ``FileNotFoundError``, ...), so callers may catch either.

This module imports nothing from the package: every layer may use it.
"""

from __future__ import annotations


class MctfError(Exception):
  """Base of every error mctf_jax raises on bad input."""


class ConfigError(MctfError, ValueError):
  """A configuration value that the model, the fusion or the training loop cannot take."""


class CheckpointError(MctfError, ValueError):
  """A checkpoint that cannot be read, or whose weights do not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """A checkpoint path that does not exist or holds no checkpoint."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint whose weights do not fit the model; lists every problem at once."""

  def __init__(self, missing=(), unexpected=(), wrong_shape=(), source: str = "checkpoint"):
    self.missing, self.unexpected = list(missing), list(unexpected)
    self.wrong_shape = list(wrong_shape)
    lines = [f"{source} does not fit the model config:"]
    if self.missing:
      lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
    if self.unexpected:
      lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
    for name, got, want in self.wrong_shape:
      lines.append(f"  wrong shape: {name} is {tuple(got)}, the config needs {tuple(want)}")
    super().__init__("\n".join(lines))


class FormatError(CheckpointError):
  """A file that is not a PyTorch checkpoint this reader understands (mctf_jax.torch_pickle)."""


class DataError(MctfError, ValueError):
  """A dataset that cannot be read as configured (missing, unprepared, empty, bad split)."""


class TrainingError(MctfError, RuntimeError):
  """A run that cannot go on (non-finite loss, incompatible workdir); the message says why."""


class OutputError(MctfError, OSError):
  """Results or checkpoints cannot be written where they are asked for."""


# ----------------------------------------------------------------------------- checks


def is_int(value) -> bool:
  """An int that is not a bool."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value, whole: bool = False) -> bool:
  """An int or float (an int only, with `whole`) that is not a bool."""
  return not isinstance(value, bool) and isinstance(value, int if whole else (int, float))
