r"""MCTF on T2T-ViT (model.arch 't2t_vit'), any of the official variants:
``--config=configs/t2t_vit.py:VARIANT`` with VARIANT one of 7, 10, 12, 14, 19, 24 (the
Performer T2T module) or t_14, t_19, t_24 (T2T-ViT_t: the transformer T2T module). T2T-ViT-14
is also configs/t2t_vit_14.py.

The model is the official ``t2t_vit_*`` constructor's at 224x224 with the attention scale the
released checkpoints need (``qk_scale='embed_dim'``: embed_dim ** -0.5, as
``t2t_vit_*(pretrained=True)`` sets it). The fusion is the DeiT recipe's MCTF on blocks
1..depth-1, with the r whose FLOPs fall closest to 31% under the unfused model's (the paper
reports "at least 31% speedup" on T2T-ViT and LV-ViT without listing its setting);
GFLOPs as fvcore counts the official code, fused / unfused:

  variant  r   GFLOPs            variant  r   GFLOPs
  7        29  0.794 / 1.156     24       5   9.769 / 13.692
  10       17  1.054 / 1.527     t_14     13  4.193 / 6.106
  12       13  1.236 / 1.775     t_19     8   6.810 / 9.808
  14       10  3.322 / 4.800     t_24     6   10.292 / 14.998
  19       7   5.877 / 8.503

The released checkpoints (github yitu-opensource/T2T-ViT, e.g. 81.5_T2T_ViT_14.pth.tar: a
timm training checkpoint whose 'state_dict' holds the weights; --config.init.checkpoint
reads it, and ``python -m mctf_jax.convert --ema`` takes its 'state_dict_ema')::

  python eval.py --config=configs/t2t_vit.py:19 --checkpoint=82.3_T2T_ViT_19.pth.tar \
      --config.data.data_dir=/path/to/tfds --config.eval.r_values='(0, 7)'
  python train.py --config=configs/t2t_vit.py:t_14 --workdir=/tmp/mctf_t2t_vit_t_14 \
      --config.init.checkpoint=81.7_T2T_ViTt_14.pth.tar

Sizes and settings may be overridden as any field (``--config.model.token_dim=...``,
``--config.fusion.r=...``); ``--config.model.qk_scale=head_dim`` is the official
constructor's default (head_dim ** -0.5), for models trained that way.
"""

import ml_collections

from configs import default

# variant: (embed_dim, depth, num_heads, mlp_ratio, tokens_type, MCTF r on blocks 1..depth-1)
VARIANTS = {
    "7": (256, 7, 4, 2.0, "performer", 29),
    "10": (256, 10, 4, 2.0, "performer", 17),
    "12": (256, 12, 4, 2.0, "performer", 13),
    "14": (384, 14, 6, 3.0, "performer", 10),
    "19": (448, 19, 7, 3.0, "performer", 7),
    "24": (512, 24, 8, 3.0, "performer", 5),
    "t_14": (384, 14, 6, 3.0, "transformer", 13),
    "t_19": (448, 19, 7, 3.0, "transformer", 8),
    "t_24": (512, 24, 8, 3.0, "transformer", 6),
}


def _variant(variant: str) -> tuple:
  variant = str(variant)
  if variant not in VARIANTS:
    raise ValueError(f"unknown T2T-ViT variant {variant!r}: expected one of "
                     f"{', '.join(VARIANTS)} (configs/t2t_vit.py:VARIANT)")
  return VARIANTS[variant]


def t2t_vit_model(variant: str = "14") -> ml_collections.ConfigDict:
  """T2T-ViT-<variant> at 224x224 with the released checkpoints' attention scale."""
  width, depth, heads, mlp_ratio, tokens_type, _ = _variant(variant)
  return ml_collections.ConfigDict(dict(
      arch="t2t_vit", img_size=224, in_chans=3, num_classes=1000,
      tokens_type=tokens_type,    # 'performer' | 'transformer' (the T2T module)
      token_dim=64, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
      qkv_bias=False,
      qk_scale="embed_dim",       # 'embed_dim' | 'head_dim' | a number
      performer_dropout_rate=0.1, drop_path_rate=0.1, dropout_rate=0.0, dtype="float32",
      param_dtype="float32"))


def get_config(variant: str = "14"):
  config = default.get_config()
  config.model = t2t_vit_model(variant)
  depth, r = _variant(variant)[1], _variant(variant)[5]
  config.fusion = default.mctf_fusion(r=float(r), layers=tuple(range(1, depth)))
  config.data.crop_pct = 0.9      # the official default_cfg's evaluation crop
  return config
