r"""MCTF on SigLIP's So400m/14 image encoder (224 px, multihead attention pooling): r=8 on
blocks 1..26, 65.38 GFLOPs against 110.26 (41% fewer).

The image encoder is the ``img`` sub-tree of the two-tower checkpoint; its head (the
projection to the image-text space) is dropped for a 1000-class head unless
``--config.model.num_classes=1152``::

  python -m mctf_jax.convert --config=configs/siglip_so400m14.py \
      --big_vision=webli_en_so400m_224_57633886.npz:img --out=/tmp/siglip_so400m
  python train.py --config=configs/siglip_so400m14.py --workdir=/tmp/mctf_siglip_so400m \
      --config.init.checkpoint=/tmp/siglip_so400m

The 384 px encoder (27 x 27 patches; big_vision leaves out the last 6 pixels as here):
``--config.model.img_size=384 --config.fusion.r=22`` (201 against 335 GFLOPs).
"""

from mctf_jax import recipes


def get_config():
  return recipes.big_vision_config(recipes.vit_model("So400m/14", pool_type="map"), r=8,
                                   crop_pct=1.0)
