r"""ToMe itself (Bolya et al., ICLR 2023) on DeiT-S: r=13 in every block, as ToMe's DeiT-S
setting (2.71 GFLOPs).

Every block merges between its attention and its MLP, by the cosine similarity of the
attention's keys averaged over heads, one-directional bipartite matching with the class
token protected, size-weighted averages, proportional attention; what
facebookresearch/ToMe's timm patch computes (tests/golden/tome). ToMe's other r forms:
``--config.fusion.inflection=-1`` for its decreasing schedule ``(r, -1)``; a per-block list
in a config file (``with config.ignore_type(): config.fusion.r = (12, 8, 4)``). For the
paper's "ToMe-like" ablation (MCTF's code path with similarity only) see tome_like.py.

  python eval.py --config=configs/tome.py --checkpoint=deit_small_patch16_224-cd65a155.pth
"""

from configs import default
from mctf_jax.fusion.config import TOME_FIXED


def tome_fusion(r=13, layers=tuple(range(12))):
  return default.mctf_fusion(method="tome", r=r, layers=layers, prop_attn=True,
                             teacher_r_max=0.0, **TOME_FIXED)


def get_config():
  config = default.get_config()
  config.fusion = tome_fusion()
  return config
