r"""ToMe-style fusion on DeiT-S: similarity only, one-directional matching, no
one-step-ahead attention (tokens are fused after each block), size-weighted averages and
proportional attention; r=13 on every block, as ToMe's DeiT-S setting. (ToMe itself fuses
between the attention and the MLP, with the keys as the metric; this is the MCTF code path
with its other criteria switched off, the paper's ToMe comparison.)

  python eval.py --config=configs/tome.py --checkpoint=deit_small_patch16_224-cd65a155.pth
"""

from configs import default
from mctf_jax.fusion.config import TOME_PRESET


def tome_fusion(r=13, layers=tuple(range(12))):
  return default.mctf_fusion(r=r, layers=layers, **TOME_PRESET)


def get_config():
  config = default.get_config()
  config.fusion = tome_fusion()
  return config
