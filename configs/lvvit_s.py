r"""MCTF LV-ViT-S (r=8 on blocks 1..15, 4.96 GFLOPs against 6.57; the paper: 4.9 against 6.6).

LV-ViT (zihangJiang/TokenLabeling, model.arch 'lvvit') fine-tuned with MCTF as DeiT-S is
(mctf_jax.recipes: the official MCTF recipe), from the released weights::

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

from mctf_jax import recipes


def get_config():
  return recipes.lvvit_config("small")
