r"""The plain model of the accuracy benchmark: a small DeiT on the cluttered digits, no fusion.

``cluttered_digits``: each 64x64 canvas holds one real scikit-learn digit (16..26 pixels, at a
random position) among 8..12 dimmer pieces of other digits and pixel noise; label = the digit
(5,748 train / 720 test images, a fixed seeded split built from the digits' split; see
``mctf_jax.data.sources.load_cluttered_split``). Cut into 4x4 patches: 256 patches + the
class token, most of them clutter, as most tokens of a natural image are background.

Trained from scratch without fusion; benchmarks/accuracy.py then evaluates it with ToMe and
MCTF at equal FLOPs and fine-tunes it with each (``fusion.target_fraction`` picks r)::

  python train.py --config=configs/cluttered_digits.py --workdir=workdirs/cluttered
  python eval.py --config=configs/cluttered_digits.py --checkpoint=workdirs/cluttered \
      --config.fusion.r=32 --config.eval.r_values='(0, 16, 32, 48)'
"""

from mctf_jax import recipes


def get_config():
  config = recipes.base_config()
  config.model.update(dict(img_size=64, patch_size=4, embed_dim=48, depth=4, num_heads=2,
                           num_classes=10, mlp_ratio=2.0, drop_path_rate=0.0))
  # No fusion (r=0); when r is set, every block fuses, as ToMe does (with four blocks, 1..3
  # alone cannot bring ToMe below 65% of the FLOPs).
  config.fusion.update(dict(r=0.0, layers=(0, 1, 2, 3), teacher_r_max=0.0))
  config.data.update(dict(
      dataset="cluttered_digits", train_split="train", eval_split="test",
      crop_scale=(0.8, 1.0), crop_ratio=(0.9, 1.1), hflip=False, randaugment="",
      reprob=0.0, repeated_aug=1, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
      shuffle_buffer=8192))
  config.batch_size = 64
  config.eval_batch_size = 240
  config.num_epochs = 18
  config.cooldown_epochs = 0
  config.warmup_epochs = 0            # (1 would keep epochs 0 and 1 at warmup_lr)
  config.base_lr = 1.6e-2           # per 512 images: 2e-3 at batch 64
  config.min_lr = 1e-5
  config.warmup_lr = 1e-6
  config.weight_decay = 0.05
  config.ema_decay = 0.0
  config.loss.label_smoothing = 0.1
  config.log_every_steps = 20
  config.checkpoint_every_steps = 1000
  config.eval_every_epochs = 2
  config.eval.r_values = (0, 16, 32, 48)
  return config
