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

from mctf_jax import recipes


def get_config():
  config = recipes.base_config()
  config.fusion = recipes.tome_fusion()
  return config
