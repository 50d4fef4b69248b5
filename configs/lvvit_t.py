r"""MCTF LV-ViT-T: r=8 on blocks 1..11 (configs/lvvit_s.py's recipe; the paper reports
LV-ViT-S only). 2.88 GFLOPs without fusion.

  python -m mctf_jax.convert --config=configs/lvvit_t.py --torch=lvvit_t.pth --out=/tmp/lvvit_t
  python eval.py --config=configs/lvvit_t.py --checkpoint=/tmp/lvvit_t
"""

from mctf_jax import recipes


def get_config():
  return recipes.lvvit_config("tiny")
