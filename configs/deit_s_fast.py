r"""MCTF-Fast DeiT-S: r=0.35 (a ratio of the tokens) on blocks 3, 6, 9; 2.76 GFLOPs.

  python eval.py --config=configs/deit_s_fast.py --checkpoint=/path/to/checkpoint
"""

from configs import default


def get_config():
  config = default.get_config()
  config.fusion = default.mctf_fusion(r=0.35, layers=(3, 6, 9), teacher_r_max=0.15)
  return config
