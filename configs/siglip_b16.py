r"""MCTF on SigLIP's ViT-B/16 image encoder (224 px, multihead attention pooling): r=15 on
blocks 1..11, 10.36 GFLOPs against 17.73 (42% fewer). No token is protected; the MAP
head's attention weighs each token by its size.

The image encoder is the ``img`` sub-tree of the two-tower checkpoint. Its head, the
projection to the shared image-text space (768 wide), is dropped for a 1000-class head
(``--config.model.num_classes=768`` keeps it, for the embeddings)::

  python -m mctf_jax.convert --config=configs/siglip_b16.py \
      --big_vision=webli_en_b16_224_63724782.npz:img --out=/tmp/siglip_b16
  python train.py --config=configs/siglip_b16.py --workdir=/tmp/mctf_siglip_b16 \
      --config.init.checkpoint=/tmp/siglip_b16
"""

from mctf_jax import recipes


def get_config():
  # SigLIP resizes the whole image to 224 x 224 (crop_pct 1: no border cut).
  return recipes.big_vision_config(recipes.vit_model("B/16", pool_type="map"), r=15,
                                   crop_pct=1.0)
