r"""The embedded default: a tiny DeiT with MCTF on scikit-learn's handwritten digits.

1,797 real 8x8 digits (1,437 train / 360 test, a fixed stratified split), upsampled to
32x32 and cut into 4x4 patches: 64 patches + the class token. Trained from scratch with
token reduction consistency (student r fixed, teacher r' random), it runs on a laptop CPU
in about ten minutes (``make demo``)::

  python train.py --config=configs/digits.py --workdir=workdirs/digits
  python eval.py --config=configs/digits.py --checkpoint=workdirs/digits \
      --config.eval.r_values='(0, 4, 8, 10, 12)'
"""

from mctf_jax import recipes


def get_config():
  config = recipes.base_config()
  config.model.update(dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
                           num_classes=10, mlp_ratio=2.0, drop_path_rate=0.1))
  # MCTF on blocks 1..5: 65 -> 55 -> 45 -> 35 -> 25 -> 15 tokens (35% fewer FLOPs).
  config.fusion.update(dict(r=10.0, layers=(1, 2, 3, 4, 5), teacher_r_max=5.0))
  config.data.update(dict(
      dataset="digits", train_split="train", eval_split="test",
      crop_scale=(0.75, 1.0), crop_ratio=(0.8, 1.25), hflip=False, randaugment="",
      reprob=0.0, repeated_aug=1, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
      shuffle_buffer=2048))
  config.batch_size = 64
  config.eval_batch_size = 120
  config.num_epochs = 50
  config.cooldown_epochs = 0
  config.warmup_epochs = 2
  config.base_lr = 8e-3            # per 512 images: 1e-3 at batch 64
  config.min_lr = 1e-5
  config.warmup_lr = 1e-6
  config.weight_decay = 0.05
  config.ema_decay = 0.0
  config.loss.label_smoothing = 0.1
  config.log_every_steps = 44
  config.checkpoint_every_steps = 220
  config.eval_every_epochs = 5
  config.eval.r_values = (0, 4, 8, 10, 12)
  return config
