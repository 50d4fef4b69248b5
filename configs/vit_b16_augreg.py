r"""MCTF on an AugReg ViT-B/16 (vision_transformer / big_vision checkpoint, class token):
r=15 on blocks 1..11, 10.41 GFLOPs against 17.58 (41% fewer).

The i21k -> i1k fine-tuned AugReg checkpoints (``augreg/B_16-i21k-300ep-...-imagenet2012-
steps_20k-lr_0.01-res_224.npz``, vision_transformer's naming) load as they are; images in
[-1, 1]. Without training, at several r (the paper's "without training" setting)::

  python eval.py --config=configs/vit_b16_augreg.py --checkpoint=B_16-i21k-...-res_224.npz \
      --config.data.data_dir=/path/to/tfds --config.eval.r_values='(0, 8, 15)'

or converted once, then fine-tuned with token reduction consistency::

  python -m mctf_jax.convert --config=configs/vit_b16_augreg.py \
      --big_vision=B_16-i21k-...-res_224.npz --out=/tmp/vit_b16_augreg
  python train.py --config=configs/vit_b16_augreg.py --workdir=/tmp/mctf_vit_b16 \
      --config.init.checkpoint=/tmp/vit_b16_augreg

A 384 px checkpoint (e.g. the original ViT-B_16.npz): ``--config.model.img_size=384``.
"""

from mctf_jax import recipes


def get_config():
  return recipes.big_vision_config(recipes.vit_model("B/16", pool_type="tok"), r=15,
                                   crop_pct=0.9)
