"""Reads PyTorch checkpoint files (.pth) without PyTorch, in both formats torch.save writes.

- The zip format (torch >= 1.6, the default since): a zip archive holding
  ``<name>/data.pkl`` (the pickled object, tensors replaced by references to storages) and
  ``<name>/data/<key>`` (each storage's raw bytes, little-endian).
- The legacy format (torch < 1.6, or ``_use_new_zipfile_serialization=False``): one stream of
  pickles, a magic number, a protocol version (1001) and the saving machine's byte order,
  then the object (storages again as references), then the list of storage keys, then each
  storage in that order as an int64 element count followed by its raw bytes.

Both are unpickled with a restricted unpickler: tensors become numpy arrays, known
containers are rebuilt, and every other class becomes an inert placeholder, so no code
from the file is ever run (unlike ``torch.load(weights_only=False)``). The tar format of
torch < 0.4 is not read.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import numpy as np

from mctf_jax.errors import FormatError

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


_PLACEHOLDER_CLASSES: dict[str, type] = {}


def _placeholder_class(module: str, name: str) -> type:
  """A _Placeholder subclass that remembers which class of the file it stands for."""
  qualified = f"{module}.{name}"
  if qualified not in _PLACEHOLDER_CLASSES:
    _PLACEHOLDER_CLASSES[qualified] = type(name, (_Placeholder,), {"stands_for": qualified})
  return _PLACEHOLDER_CLASSES[qualified]


def describe(obj) -> str:
  """What a loaded object is, for error messages: 'a torch.nn.modules.linear.Linear
  object' for a class the reader did not rebuild."""
  return f"a {getattr(obj, 'stands_for', type(obj).__name__)} object"


def _rebuild_tensor(storage, offset, size, stride, *unused):
  if not isinstance(storage, np.ndarray):
    raise pickle.UnpicklingError("tensor without a readable storage")
  size, stride = tuple(size), tuple(stride)
  if 0 in size:
    return np.zeros(size, storage.dtype)
  itemsize = storage.dtype.itemsize
  if offset < 0 or min(stride, default=0) < 0 or (
      offset + sum((n - 1) * s for n, s in zip(size, stride)) >= len(storage)):
    raise FormatError(f"tensor of size {size} at offset {offset} runs past the end of its "
                      f"storage ({len(storage)} elements)")
  if not size:
    return storage[offset].copy()
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)  # contiguous copy


def _rebuild_parameter(data, *unused):
  return data


def _skipped(*unused):
  return None


class _Unpickler(pickle.Unpickler):
  """Unpickles torch.save's object. read_storage(key, dtype, numel) returns a storage's
  elements as a 1-D array; None skims the pickle instead, noting each storage's dtype in
  ``self.storage_dtypes`` and building no tensor."""

  def __init__(self, file, read_storage=None):
    super().__init__(file)
    self._read_storage = read_storage
    self._storages: dict[str, np.ndarray] = {}
    self.storage_dtypes: dict[str, np.dtype] = {}

  def find_class(self, module, name):
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor",
                                             "_rebuild_parameter",
                                             "_rebuild_parameter_with_state"):
      if self._read_storage is None:
        return _skipped
      return _rebuild_tensor if name.startswith("_rebuild_tensor") else _rebuild_parameter
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
    return _placeholder_class(module, name)

  def persistent_load(self, pid):
    kind = pid[0].decode("ascii") if isinstance(pid, tuple) and isinstance(pid[0], bytes) \
        else (pid[0] if isinstance(pid, tuple) and pid else None)
    if kind == "module":
      raise FormatError("it holds a whole pickled nn.Module (torch.save(model)); save its "
                        "model.state_dict() instead")
    if kind != "storage" or len(pid) < 5:
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key, _location, numel = pid[1:5]
    view = pid[5] if len(pid) > 5 else None
    key = str(key)
    dtype = getattr(storage_type, "dtype", None)
    if dtype is None:
      raise pickle.UnpicklingError(f"storage {key} has an unsupported dtype "
                                   f"({storage_type!r}); install ml_dtypes or torch")
    if self._read_storage is None:
      self.storage_dtypes[key] = dtype
      return None
    if key not in self._storages:
      self._storages[key] = self._read_storage(key, dtype, int(numel))
    storage = self._storages[key]
    if view is not None:   # a view of another storage (torch < 1.0 only)
      _view_key, offset, view_numel = view
      storage = storage[offset:offset + view_numel]
    return storage


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _PlainUnpickler(pickle.Unpickler):
  """For the legacy format's header pickles: plain values only, no class at all."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"unexpected {module}.{name} in a torch file header")


def _load_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if not pickles:
      raise FormatError("a zip file without data.pkl: not a PyTorch checkpoint")
    name = min(pickles, key=len)
    prefix = name[: -len("data.pkl")]

    def read_storage(key, dtype, numel):
      raw = archive.read(f"{prefix}data/{key}")
      if len(raw) < numel * dtype.itemsize:
        raise FormatError(f"storage {key} holds {len(raw)} bytes, its tensors need "
                          f"{numel * dtype.itemsize}")
      return np.frombuffer(raw, dtype.newbyteorder("<"), count=numel)

    with archive.open(name) as f:
      return _Unpickler(f, read_storage).load()


def _load_legacy(f):
  """The legacy format, `f` open at its start: the object is unpickled twice, first to
  find where the storages' bytes begin (they follow the object), then to build it."""
  if _PlainUnpickler(f).load() != _LEGACY_MAGIC:
    raise FormatError("a pickle but not a PyTorch checkpoint (no torch.save magic number)")
  protocol = _PlainUnpickler(f).load()
  if protocol != _LEGACY_PROTOCOL:
    raise FormatError(f"unknown torch.save protocol {protocol!r} (expected "
                      f"{_LEGACY_PROTOCOL})")
  sys_info = _PlainUnpickler(f).load()
  order = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
  start = f.tell()
  skim = _Unpickler(f)
  skim.load()
  end = f.tell()
  keys = [str(k) for k in _PlainUnpickler(f).load()]
  where = {}
  for key in keys:
    if key not in skim.storage_dtypes:
      raise FormatError(f"storage {key} is listed but no tensor uses it")
    head = f.read(8)
    if len(head) < 8:
      raise FormatError(f"truncated: storage {key} is missing")
    numel = int(np.frombuffer(head, order + "i8")[0])
    where[key] = (f.tell(), numel)
    f.seek(numel * skim.storage_dtypes[key].itemsize, 1)

  def read_storage(key, dtype, numel):
    if key not in where:
      raise FormatError(f"the data of storage {key} is missing")
    offset, stored = where[key]
    if stored < numel:
      raise FormatError(f"storage {key} holds {stored} elements, its tensors "
                        f"need {numel}")
    f.seek(offset)
    raw = f.read(stored * dtype.itemsize)
    if len(raw) < stored * dtype.itemsize:
      raise FormatError(f"truncated in the data of storage {key}")
    return np.frombuffer(raw, dtype.newbyteorder(order))

  f.seek(start)
  pickled = io.BytesIO(f.read(end - start))   # read_storage moves f
  return _Unpickler(pickled, read_storage).load()


def load(path: str):
  """The object torch.save wrote at `path` (either format), with tensors as numpy arrays.

  Raises FormatError (a ValueError) naming the file for one in neither format or damaged
  in a way the format shows; pickle.UnpicklingError or EOFError for other damage.
  """
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    with open(path, "rb") as f:
      head = f.read(512)
      if len(head) >= 262 and head[257:262] == b"ustar":
        raise FormatError("in the tar format of torch < 0.4, which this reader does not "
                          "read: load it with torch and save it again")
      if not head.startswith(b"\x80"):   # a pickle's PROTO opcode
        raise FormatError("not a PyTorch checkpoint: neither a zip archive (torch >= 1.6) "
                          "nor a pickle (the legacy format)")
      f.seek(0)
      return _load_legacy(f)
  except FormatError as e:
    raise FormatError(f"{path!r}: {e}") from None
