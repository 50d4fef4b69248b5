r"""PiToMe itself (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token
Merging", NeurIPS 2024) on DeiT-S, at its own DeiT-S setting: every block keeps 92.5% of its
tokens (``fusion.r`` is PiToMe's keep ratio), energy margins 0.75 - 0.75 l / 12.

Every block merges between its attention and its MLP, on the attention's keys averaged over
heads: the tokens ordered by their energy (how many close neighbours they have), the first
6 blocks matching all of them, the last 6 protecting the low-energy (isolated) ones and
merging only among the most redundant; size-weighted averages, no proportional attention;
what hchautran/PiToMe's DeiT patch computes (tests/golden/pitome). Training-free; fine-tuning
runs without MCTF's consistency teacher. Other ratios: ``--config.fusion.r=0.9``; a FLOP
budget: ``--config.fusion.target_gflops=3.0``.

  python eval.py --config=configs/pitome.py --checkpoint=deit_small_patch16_224-cd65a155.pth
  python train.py --config=configs/pitome.py --workdir=workdirs/pitome_deit_s \
      --config.init.checkpoint=checkpoints/deit_s   # converted as in the README

``configs/pitome.py:digits`` is the embedded default (configs/digits.py: a tiny DeiT on
scikit-learn's digits, 6 blocks, 65 tokens) with PiToMe at 0.8 instead of MCTF, no teacher::

  python train.py --config=configs/pitome.py:digits --workdir=workdirs/pitome_digits
"""

import os

from mctf_jax import recipes
from mctf_jax.config import load_config


def get_config(variant: str = "deit_s"):
  if variant == "deit_s":
    config = recipes.base_config()
    config.fusion = recipes.pitome_fusion()
    config.eval.r_values = (0.95, 0.925, 0.9, 0.875, 0)
  elif variant == "digits":
    config = load_config(os.path.join(os.path.dirname(__file__), "digits.py"))
    config.fusion = recipes.pitome_fusion(0.8, layers=tuple(range(config.model.depth)))
    config.eval.r_values = (0, 0.9, 0.8, 0.7)
  else:
    raise ValueError(f"configs/pitome.py:{variant}: expected the variant deit_s or digits")
  return config
