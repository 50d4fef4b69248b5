r"""MCTF DeiT-S fine-tuning: the official recipe (mlvlab/MCTF), the base of every config.

Fine-tunes a pretrained DeiT with multi-criteria token fusion (r=16 on blocks 1..11) and
token reduction consistency (teacher r' drawn from [0, 8)). Launch::

  python train.py --config=configs/deit_s.py --workdir=/tmp/mctf_deit_s \
      --config.data.data_dir=/path/to/tfds --config.init.checkpoint=deit_small.pth

Variants (deit_t.py, deit_b.py, *_fast.py, tome.py, tome_like.py, digits.py, ...) edit this
recipe (``mctf_jax.recipes.base_config``).
"""

from mctf_jax import recipes
from mctf_jax.recipes import big_vision_config, deit_model, mctf_fusion, tome_fusion, vit_model

# The recipe's parts too, for configs of your own that build on this file.
__all__ = ["get_config", "big_vision_config", "deit_model", "mctf_fusion", "tome_fusion",
           "vit_model"]


def get_config():
  return recipes.base_config()
