r"""MCTF DeiT-T (r=16 on blocks 1..11): 72.7% top-1 at 0.71 GFLOPs in the paper.

  python train.py --config=configs/deit_t.py --workdir=/tmp/mctf_deit_t \
      --config.init.checkpoint=deit_tiny_patch16_224-a1311bcf.pth
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = default.deit_model("tiny")
  return config
