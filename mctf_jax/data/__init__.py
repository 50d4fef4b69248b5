"""Input pipelines of the DeiT recipe: tfds datasets, image folders and scikit-learn digits.

    info = data.dataset_info(config)       # DatasetInfo(name, num_classes, num_train, num_eval)
    pipe = data.TrainPipeline(config, global_batch_size, seed, process_index, process_count,
                              label_smoothing=0.1)
    for batch in pipe.iterate(start_step): ...   # this process's batches, epoch after epoch
    for batch in data.eval_batches(config, global_batch_size, process_index, process_count):
      ...                                         # 'image', 'label', 'mask' (False = padding)

config.data.dataset is a tfds name ('imagenet2012', prepared under config.data.data_dir), a
folder 'folder:/root' (root/<split>/<class>/*.jpg|png, ImageFolder's class order) or
'digits' (scikit-learn's 8x8 digits, splits 'train'/'test', see load_digits_split).

The transforms reproduce the PyTorch recipe (timm 0.6 / torchvision / Pillow) in TensorFlow:
JPEG decoding bit-identical to Pillow's, Pillow's bicubic resize within one grey level,
RandAugment ops matching Pillow's within one grey level (mctf_jax.data.augment). The
training stream is a pure function of (seed, process, step): resuming at a step gives the
batches an uninterrupted run gives (mctf_jax.data.pipeline).

TensorFlow runs on the CPU only: importing this package hides the GPUs/TPUs from it so that
it never takes accelerator memory.
"""

import warnings

import tensorflow as tf


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

from mctf_jax.data.augment import (MixupSpec, RandAugmentSpec,  # noqa: E402
                                   parse_randaugment)
from mctf_jax.data.pipeline import (Settings, TrainPipeline, dataset_info,  # noqa: E402
                                    eval_batches, eval_transform, settings)
from mctf_jax.data.sources import DataError, DatasetInfo, load_digits_split  # noqa: E402

__all__ = ["DatasetInfo", "DataError", "TrainPipeline", "dataset_info", "eval_batches",
           "eval_transform", "load_digits_split", "settings", "Settings", "parse_randaugment",
           "RandAugmentSpec", "MixupSpec"]
