"""configs/digits.py shrunk for the end-to-end tests of train.py and eval.py.

``--config=tests/configs/digits_tiny.py:ARCH`` runs the TINY size of another backbone
(``Backbone.TINY``, e.g. ``lvvit`` or ``toy_backbones:DistilledViT`` with tests/ on the path) the same way,
at the image size TINY gives (else 32).
"""

from configs import digits


def get_config(arch=None):
  config = digits.get_config()
  config.model.update(dict(embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.0))
  config.fusion.update(dict(r=8.0, layers=(1, 2), teacher_r_max=2.0))
  # The first 352 training digits in batches of 16: 22 steps per epoch, each a quarter of
  # configs/digits.py's (the entry points' tests run many steps); all 360 test digits.
  config.data.train_split = "train[:352]"
  config.batch_size = 16
  config.eval_batch_size = 120
  config.num_epochs = 2
  config.warmup_epochs = 0
  config.log_every_steps = 5
  config.checkpoint_every_steps = 10
  config.keep_checkpoints = 2
  config.eval_every_epochs = 1
  config.ema_decay = 0.9
  config.eval.r_values = (0, 8)
  if arch:
    from mctf_jax import models
    backbone = models.get(arch)
    # At TINY's image size when it states one (T2T-ViT: 64, 16 patches), else 32.
    fields = {"img_size": 32, **backbone.TINY, "arch": arch, "num_classes": 10,
              "drop_path_rate": 0.0}
    config.model = type(config.model)(fields)
    config.num_epochs = 1
    config.eval_every_epochs = 2   # none during training (eval.py evaluates the run)
    config.fusion.teacher_r_max = 0.0   # the student alone (the contract tests the teacher)
  return config
