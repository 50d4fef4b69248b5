r"""The paper's "ToMe-like" ablation on DeiT-S: MCTF's code path with similarity as the only
criterion, one-directional matching, no one-step-ahead attention (tokens are fused after
each block, by the block's output), size-weighted averages and proportional attention;
r=13 on every block. ToMe itself is configs/tome.py.

  python eval.py --config=configs/tome_like.py --checkpoint=deit_small_patch16_224-cd65a155.pth
"""

from mctf_jax import recipes
from mctf_jax.fusion.config import TOME_LIKE_PRESET


def tome_like_fusion(r=13, layers=tuple(range(12))):
  return recipes.mctf_fusion(r=r, layers=layers, **TOME_LIKE_PRESET)


def get_config():
  config = recipes.base_config()
  config.fusion = tome_like_fusion()
  return config
