r"""MCTF-Fast DeiT-T: r=0.35 (a ratio of the tokens) on blocks 3, 6, 9; 0.75 GFLOPs.

  python eval.py --config=configs/deit_t_fast.py --checkpoint=/path/to/checkpoint
"""

from mctf_jax import recipes


def get_config():
  config = recipes.base_config()
  config.model = recipes.deit_model("tiny")
  config.fusion = recipes.mctf_fusion(r=0.35, layers=(3, 6, 9), teacher_r_max=0.15)
  return config
