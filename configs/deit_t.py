r"""MCTF DeiT-T (r=16 on blocks 1..11): 72.7% top-1 at 0.71 GFLOPs in the paper.

  python train.py --config=configs/deit_t.py --workdir=/tmp/mctf_deit_t \
      --config.init.checkpoint=deit_tiny_patch16_224-a1311bcf.pth
"""

from mctf_jax import recipes


def get_config():
  config = recipes.base_config()
  config.model = recipes.deit_model("tiny")
  return config
