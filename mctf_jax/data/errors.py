"""What mctf_jax.data raises, importable without TensorFlow (train.py and eval.py catch it
before anything has loaded the input pipeline)."""


class DataError(ValueError):
  """A dataset that cannot be read as configured (missing, unprepared, empty, bad split)."""
