"""The golden architecture (32x32 images, patch 4, width 64, depth 4, 2 heads, 10 classes)
with MCTF r=8 on blocks 1..3: a config file for tests of the command-line tools."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.update(dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                           num_classes=10, drop_path_rate=0.0))
  config.fusion.update(dict(r=8.0, layers=(1, 2, 3), pooling="size", teacher_r_max=4.0))
  return config
