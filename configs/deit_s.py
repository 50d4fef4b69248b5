r"""MCTF DeiT-S (r=16 on blocks 1..11): 80.1% top-1 at 2.60 GFLOPs in the paper.

  python train.py --config=configs/deit_s.py --workdir=/tmp/mctf_deit_s \
      --config.init.checkpoint=deit_small_patch16_224-cd65a155.pth
  python eval.py --config=configs/deit_s.py --checkpoint=/tmp/mctf_deit_s
"""

from mctf_jax import recipes


def get_config():
  return recipes.base_config()
