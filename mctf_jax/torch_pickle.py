"""Reads PyTorch checkpoint files (.pth, zip format of torch >= 1.6) without PyTorch.

A .pth file is a zip archive holding ``<name>/data.pkl`` (the pickled object, tensors
replaced by references to storages) and ``<name>/data/<key>`` (raw little-endian storage
bytes). This reader unpickles with a restricted unpickler: tensors become numpy arrays,
known containers are rebuilt, and every other class becomes an inert placeholder, so no
code from the file is ever run (unlike ``torch.load(weights_only=False)``).
"""

from __future__ import annotations

import collections
import pickle
import zipfile

import numpy as np

try:  # bfloat16 for numpy; ships with jax
  import ml_dtypes
  _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  _BFLOAT16 = None

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": _BFLOAT16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": _BFLOAT16, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype) if dtype is not None else None


class _Placeholder:
  """Stands in for any object the reader does not rebuild (optimizer state, args, ...)."""

  def __init__(self, *args, **kwargs):
    self.args = args

  def __setstate__(self, state):
    self.state = state

  def __call__(self, *args, **kwargs):
    return _Placeholder(*args)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  if not isinstance(storage, np.ndarray):
    raise pickle.UnpicklingError("tensor without a readable storage")
  size, stride = tuple(size), tuple(stride)
  if not size:
    return storage[offset].copy()
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)  # contiguous copy


def _rebuild_parameter(data, *unused):
  return data


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name]) if _TORCH_DTYPES[name] is not None else None
    if module == "torch.storage" and name in ("UntypedStorage", "_LegacyStorage"):
      return _StorageType(np.uint8)
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "builtins" and name in ("set", "frozenset", "slice", "complex"):
      return {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex}[name]
    return _Placeholder

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _location, _numel = pid[:5]
    if key not in self._storages:
      dtype = getattr(storage_type, "dtype", None)
      if dtype is None:
        raise pickle.UnpicklingError(f"storage {key} has an unsupported dtype "
                                     f"({storage_type!r}); install ml_dtypes or torch")
      raw = self._archive.read(f"{self._prefix}data/{key}")
      self._storages[key] = np.frombuffer(raw, dtype.newbyteorder("<"))
    return self._storages[key]


def is_zip_checkpoint(path: str) -> bool:
  return zipfile.is_zipfile(path)


def load(path: str):
  """The object saved by torch.save at `path`, with tensors as numpy arrays."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path!r} is not a zip-format PyTorch checkpoint (saved by torch >= 1.6); "
                     f"the legacy format needs torch itself to read")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if not pickles:
      raise ValueError(f"{path!r} is a zip file but holds no data.pkl: not a PyTorch checkpoint")
    name = min(pickles, key=len)
    prefix = name[: -len("data.pkl")]
    with archive.open(name) as f:
      return _Unpickler(f, archive, prefix).load()
