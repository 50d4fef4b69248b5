r"""MCTF on big_vision's ImageNet-1k ViT-S/16 baseline ("Better plain ViT baselines":
global average pooling, no class token): r=15 on blocks 1..11, 2.70 GFLOPs against 4.58
(41% fewer). No token is protected; the average is weighted by the tokens' sizes.

  python eval.py --config=configs/vit_s16_gap.py --checkpoint=vit_s16_i1k_300ep.npz \
      --config.data.data_dir=/path/to/tfds --config.eval.r_values='(0, 8, 15)'
  python train.py --config=configs/vit_s16_gap.py --workdir=/tmp/mctf_vit_s16 \
      --config.init.checkpoint=vit_s16_i1k_300ep.npz
"""

from mctf_jax import recipes


def get_config():
  # big_vision evaluates these at resize_small(256) + central_crop(224).
  return recipes.big_vision_config(recipes.vit_model("S/16", pool_type="gap"), r=15,
                                   crop_pct=0.875)
