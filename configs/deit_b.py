r"""MCTF DeiT-B (r=16 on blocks 1..11). The paper reports DeiT-T/S; this size uses the same
recipe (drop path 0.1 as in DeiT-S fine-tuning; DeiT-B itself was trained with 0.1).

  python train.py --config=configs/deit_b.py --workdir=/tmp/mctf_deit_b \
      --config.init.checkpoint=deit_base_patch16_224-b5f2ef4d.pth
"""

from mctf_jax import recipes


def get_config():
  config = recipes.base_config()
  config.model = recipes.deit_model("base")
  return config
