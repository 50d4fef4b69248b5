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

from mctf_jax import recipes


def get_config(variant: str = "14"):
  return recipes.t2t_vit_config(variant)
