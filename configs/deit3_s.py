r"""MCTF on DeiT III-S (r=16 on blocks 1..11): timm's deit3_small_patch16_224, with
LayerScale (init 1e-6) and the position embedding on the patches only, evaluated as timm's
default cfg for it (bicubic resize, crop 0.9). The MCTF paper reports DeiT, not DeiT III;
fine-tuning uses DeiT-S's MCTF recipe.

  python eval.py --config=configs/deit3_s.py --checkpoint=deit_3_small_224_1k.pth
  python train.py --config=configs/deit3_s.py --workdir=/tmp/mctf_deit3_s \
      --config.init.checkpoint=deit_3_small_224_1k.pth
"""

from mctf_jax import recipes


def get_config():
  config = recipes.base_config()
  config.model.update(dict(init_values=1e-6, no_embed_class=True))
  config.data.crop_pct = 0.9
  return config
