"""TensorFlow for the input pipeline, on the CPU only: the first import of this module
hides the GPUs/TPUs from TensorFlow so that it never takes accelerator memory. Every module
of mctf_jax.data takes `tf` from here."""

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
