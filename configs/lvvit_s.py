r"""MCTF LV-ViT-S (r=8 on blocks 1..15, 4.96 GFLOPs against 6.57; the paper: 4.9 against 6.6).

LV-ViT (zihangJiang/TokenLabeling, model.arch 'lvvit') fine-tuned with MCTF as DeiT-S is
(configs/default.py: the official MCTF recipe), from the released weights::

  python -m mctf_jax.convert --config=configs/lvvit_s.py \
      --torch=lvvit_s-26M-224-83.3.pth.tar --out=/tmp/lvvit_s
  python train.py --config=configs/lvvit_s.py --workdir=/tmp/mctf_lvvit_s \
      --config.data.data_dir=/path/to/tfds --config.init.checkpoint=/tmp/lvvit_s
  python eval.py --config=configs/lvvit_s.py --checkpoint=/tmp/mctf_lvvit_s \
      --config.eval.r_values='(0, 8, 12, 16)'

The paper's other LV-ViT-S points: ``--config.fusion.r=12`` (4.2 GFLOPs), ``=16`` (3.6).
Training reads the class token's logits (the evaluation adds the token-labeling head's,
as the official model evaluates): see mctf_jax/models/lvvit.py. lvvit_t.py and lvvit_m.py
are the same recipe on LV-ViT-T and -M.
"""

import ml_collections

from configs import default

# Per size: the official model's drop-path rate and evaluation crop (TokenLabeling's
# README and default_cfgs).
RECIPE = {"tiny": dict(drop_path_rate=0.1, crop_pct=0.9),
          "small": dict(drop_path_rate=0.1, crop_pct=0.9),
          "medium": dict(drop_path_rate=0.2, crop_pct=1.0)}


def lvvit_model(size: str, img_size: int = 224) -> ml_collections.ConfigDict:
  """LV-ViT-T/S/M/L (mctf_jax.models.lvvit.SIZES), patch 16."""
  from mctf_jax.models.lvvit import SIZES
  width, depth, heads, skip_lam, stem = SIZES[size]
  return ml_collections.ConfigDict(dict(
      arch="lvvit", img_size=img_size, patch_size=16, in_chans=3, embed_dim=width,
      depth=depth, num_heads=heads, mlp_ratio=3.0, qkv_bias=False, skip_lam=skip_lam,
      stem_channels=stem, num_classes=1000, layer_norm_eps=1e-5, batch_norm_eps=1e-5,
      train_batch_norm=False,     # the stem's BatchNorm: running statistics, kept as loaded
      drop_path_rate=RECIPE.get(size, RECIPE["medium"])["drop_path_rate"], dropout_rate=0.0,
      dtype="float32", param_dtype="float32"))


def lvvit_config(size: str, r: float = 8.0):
  """The MCTF recipe of configs/default.py on LV-ViT of `size`: r on blocks 1..depth-1."""
  config = default.get_config()
  config.model = lvvit_model(size)
  config.fusion = default.mctf_fusion(r=float(r), layers=tuple(range(1, config.model.depth)))
  config.data.crop_pct = RECIPE[size]["crop_pct"]
  return config


def get_config():
  return lvvit_config("small")
