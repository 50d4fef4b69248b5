r"""MCTF T2T-ViT-14 (Performer T2T module): r=10 on blocks 1..13, 3.322 GFLOPs against
4.800 (30.8% fewer; the paper: "at least 31% speedup"). The other variants:
configs/t2t_vit.py:VARIANT (19, 24, t_14, ...).

  python -m mctf_jax.convert --config=configs/t2t_vit_14.py \
      --torch=81.5_T2T_ViT_14.pth.tar --out=/tmp/t2t_vit_14
  python eval.py --config=configs/t2t_vit_14.py --checkpoint=/tmp/t2t_vit_14 \
      --config.data.data_dir=/path/to/tfds --config.eval.r_values='(0, 10)'
  python train.py --config=configs/t2t_vit_14.py --workdir=/tmp/mctf_t2t_vit_14 \
      --config.init.checkpoint=/tmp/t2t_vit_14
"""

from mctf_jax import recipes


def get_config():
  return recipes.t2t_vit_config("14")
