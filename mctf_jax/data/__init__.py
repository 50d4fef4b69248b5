"""Input pipelines of the DeiT recipe: tfds datasets, image folders and scikit-learn digits.

    info = data.dataset_info(config)       # DatasetInfo(name, num_classes, num_train, num_eval)
    pipe = data.TrainPipeline(config, global_batch_size, seed, process_index, process_count,
                              label_smoothing=0.1)
    for batch in pipe.iterate(start_step): ...   # this process's batches, epoch after epoch
    for batch in data.eval_batches(config, global_batch_size, process_index, process_count):
      ...                                         # 'image', 'label', 'mask' (False = padding)

config.data.dataset is a tfds name ('imagenet2012', prepared under config.data.data_dir), a
folder 'folder:/root' (root/<split>/<class>/*.jpg|png, ImageFolder's class order) or
'digits' (scikit-learn's 8x8 digits, splits 'train'/'test', see load_digits_split) or
'cluttered_digits' (each digit on a 64x64 canvas of clutter, see
sources.load_cluttered_split).

The transforms reproduce the PyTorch recipe (timm 0.6 / torchvision / Pillow) in TensorFlow:
JPEG decoding bit-identical to Pillow's, Pillow's bicubic resize within one grey level,
RandAugment ops matching Pillow's within one grey level (mctf_jax.data.augment). The
training stream is a pure function of (seed, process, step): resuming at a step gives the
batches an uninterrupted run gives (mctf_jax.data.pipeline).

TensorFlow runs on the CPU only: the first module of this package that needs it hides the
GPUs/TPUs from it (mctf_jax.data._tf) so that it never takes accelerator memory. The package
imports its modules, and TensorFlow, when one of their names is first used: train.py and
eval.py check their arguments, config and checkpoint before paying TensorFlow's start-up.
"""

import importlib

from mctf_jax.errors import DataError

_LAZY = {
    "MixupSpec": "augment", "RandAugmentSpec": "augment", "parse_randaugment": "augment",
    "Settings": "pipeline", "TrainPipeline": "pipeline", "dataset_info": "pipeline",
    "eval_batches": "pipeline", "eval_transform": "pipeline", "settings": "pipeline",
    "DatasetInfo": "sources", "load_digits_split": "sources",
}

__all__ = ["DataError", *_LAZY]


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
