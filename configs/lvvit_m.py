r"""MCTF LV-ViT-M: r=8 on blocks 1..19 (configs/lvvit_s.py's recipe; the paper reports
LV-ViT-S only). 12.70 GFLOPs without fusion.

  python -m mctf_jax.convert --config=configs/lvvit_m.py \
      --torch=lvvit_m-56M-224-84.0.pth.tar --out=/tmp/lvvit_m
  python eval.py --config=configs/lvvit_m.py --checkpoint=/tmp/lvvit_m
"""

from mctf_jax import recipes


def get_config():
  return recipes.lvvit_config("medium")
