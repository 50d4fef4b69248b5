"""TensorFlow for the input pipeline, on the CPU only: the first import of this module
hides the GPUs/TPUs from TensorFlow so that it never takes accelerator memory. Every module
of mctf_jax.data takes `tf` from here.

TensorFlow's C++ logging prints its start-up lines (oneDNN, CPU features) to stderr before
it reads TF_CPP_MIN_LOG_LEVEL; the import below applies that level to them: with level 1
its INFO lines are dropped, with 2 also its WARNING lines (train.py and eval.py default to
2). Everything else it prints, and every line at level 0, reaches stderr as before.
"""

import contextlib
import os
import re
import sys
import tempfile
import warnings

_GLOG_LINE = re.compile(r"^([IWEF])\d{4} ")
_LEVELS = {"I": 0, "W": 1, "E": 2, "F": 3}
_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


@contextlib.contextmanager
def _stderr_at_level(level: int):
  """Captures what is written to file descriptor 2 and writes back only the log lines at
  `level` or above (glog severities I=0, W=1, E=2, F=3) and the lines that are not log
  lines."""
  if level <= 0:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines(keepends=True):
        match = _GLOG_LINE.match(line)
        if (match and _LEVELS[match.group(1)] < level) or line.strip() == _BANNER:
          continue
        sys.stderr.write(line)
      sys.stderr.flush()


def _min_log_level() -> int:
  try:
    return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
  except ValueError:
    return 0


# TensorFlow's __init__ imports Keras' optimizers eagerly, inside a `try` that passes over an
# ImportError; nothing here uses Keras, and that import (Keras with the scikit-learn and
# SciPy modules behind its wrappers) is ~1.3 s of CPU at every start of train.py and eval.py.
# A None entry in sys.modules makes it fail at once; it is removed after the import, so
# tf.keras still loads in full on first use.
_KERAS_EAGER = "keras.src.optimizers"
_skip_keras = _KERAS_EAGER not in sys.modules
if _skip_keras:
  sys.modules[_KERAS_EAGER] = None
try:
  with _stderr_at_level(_min_log_level()):
    import tensorflow as tf
finally:
  if _skip_keras and sys.modules.get(_KERAS_EAGER, 0) is None:
    del sys.modules[_KERAS_EAGER]


def _hide_accelerators():
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except ValueError:     # no such device type
      pass
    except RuntimeError:   # TensorFlow had set up its devices before this import
      if tf.config.get_visible_devices(kind):
        warnings.warn(f"TensorFlow was initialised before mctf_jax.data was imported and "
                      f"sees {kind}s, whose memory it may take; import mctf_jax.data first")


_hide_accelerators()
