"""torch.save's zip format written without torch, for tests of the readers: the state dicts
and timm training checkpoints ('.pth.tar') that users have, made small."""

import collections
import io
import os
import pickle
import zipfile

import numpy as np

_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
             np.dtype(np.int64): "LongStorage"}


class TorchGlobal:
  """A function or class of torch's (or any module's), written into the pickle by name;
  with args, an object made by calling it (e.g. argparse.Namespace())."""

  def __init__(self, module, name, args=()):
    self.module, self.name, self.args = module, name, args

  def __call__(self, *args):
    raise TypeError("a name for the pickle only")

  def __reduce__(self):
    return (TorchGlobal(self.module, self.name), self.args)


class _Storage:
  def __init__(self, key, array):
    self.key, self.array = key, np.ascontiguousarray(array)


class _Tensor:
  def __init__(self, storage):
    self.storage = storage

  def __reduce__(self):
    a = self.storage.array
    stride = tuple(int(np.prod(a.shape[i + 1:])) for i in range(a.ndim))
    return (TorchGlobal("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, 0, a.shape, stride, False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):
  """Pickles as torch.save does: tensors as _rebuild_tensor_v2 of a persistent storage,
  torch's globals by name."""
  dispatch = dict(pickle._Pickler.dispatch)

  def _save_global(self, obj):
    if obj.args:
      self.save_reduce(TorchGlobal(obj.module, obj.name), obj.args, obj=obj)
    else:
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      self.memoize(obj)
  dispatch[TorchGlobal] = _save_global

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ("storage", TorchGlobal("torch", _STORAGES[obj.array.dtype]), obj.key, "cpu",
              obj.array.size)
    return None


def write_torch_file(path, obj):
  """torch.save(obj, path) in the zip format, numpy arrays (float32, float64, int64)
  standing for the tensors."""
  storages = []

  def tensors(x):
    if isinstance(x, np.ndarray):
      storages.append(_Storage(str(len(storages)), x))
      return _Tensor(storages[-1])
    if isinstance(x, dict):
      return collections.OrderedDict((k, tensors(v)) for k, v in x.items())
    return x
  body = io.BytesIO()
  _TorchPickler(body, protocol=2).dump(tensors(obj))
  prefix = os.path.basename(str(path)).split(".")[0]
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{prefix}/data.pkl", body.getvalue())
    z.writestr(f"{prefix}/byteorder", "little")
    for s in storages:
      z.writestr(f"{prefix}/data/{s.key}",
                 s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())
    z.writestr(f"{prefix}/version", "3\n")


def timm_checkpoint(path, state, ema=None, arch="model", metric=0.0):
  """A checkpoint as timm's training script saves it (the released T2T-ViT and LV-ViT
  ones): the weights under 'state_dict', the EMA's under 'state_dict_ema', bookkeeping."""
  write_torch_file(path, {
      "epoch": 309, "arch": arch, "state_dict": state,
      "optimizer": {"state": {}, "param_groups": []},
      "args": TorchGlobal("argparse", "Namespace", ()), "version": 2, "metric": metric,
      **({"state_dict_ema": ema} if ema is not None else {})})
