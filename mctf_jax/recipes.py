r"""The official recipe and its parts as ml_collections ConfigDicts, for the files in configs/.

The config files build on these (``from mctf_jax import recipes``), so that they load by
path from anywhere the package is installed (``mctf_jax.load_config(path)``, or absl's
``--config=path`` flag in train.py, eval.py and the tools)::

    base_config()          MCTF DeiT-S fine-tuning as the official scripts run it
    deit_model(size)       DeiT-Ti/S/B model sections ('tiny', 'small', 'base')
    vit_model(variant, pool_type)  big_vision ViT model sections (model.arch 'vit')
    mctf_fusion(**changes) the official scripts' fusion section, with changes
    tome_fusion(r, layers) ToMe itself
    big_vision_config(model, r, crop_pct)  the recipe on a big_vision ViT
    lvvit_model(size), lvvit_config(size, r)         LV-ViT-T/S/M/L and the recipe on it
    t2t_vit_model(variant), t2t_vit_config(variant)  T2T-ViT variants and the recipe on them
"""

from __future__ import annotations

import ml_collections

from mctf_jax import processes
from mctf_jax.config import model_config
from mctf_jax.fusion.config import PITOME_FIXED, PITOME_MARGIN, TOME_FIXED
from mctf_jax.models.lvvit import SIZES as LVVIT_SIZES


def deit_model(size: str) -> ml_collections.ConfigDict:
  """DeiT-Ti/S/B at 224x224, patch 16."""
  width, heads = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}[size]
  return ml_collections.ConfigDict(dict(
      arch="deit",                # the backbone (mctf_jax.models): 'deit' or 'module:Class'
      img_size=224, patch_size=16, in_chans=3, embed_dim=width, depth=12, num_heads=heads,
      num_classes=1000, mlp_ratio=4.0, qkv_bias=True, layer_norm_eps=1e-6,
      init_values=ml_collections.config_dict.placeholder(float),   # LayerScale (DeiT III)
      no_embed_class=False, reg_tokens=0,
      drop_path_rate=0.1, dropout_rate=0.0, dtype="float32", param_dtype="float32",
      remat_policy="none"))       # recompute blocks in backprop: less memory, same results;
                                  # 'none' | 'full' | 'dots' | 'dots_with_no_batch_dims'


def vit_model(variant: str, pool_type: str, img_size: int = 224,
              **changes) -> ml_collections.ConfigDict:
  """big_vision's ViT (model.arch 'vit') of a big_vision variant, e.g. 'B/16'; the sizes
  follow from the variant (or may be given in `changes`: embed_dim, depth, ...)."""
  placeholder = ml_collections.config_dict.placeholder
  model = ml_collections.ConfigDict(dict(
      arch="vit", variant=variant, img_size=img_size, in_chans=3, num_classes=1000,
      patch_size=placeholder(int), embed_dim=placeholder(int), depth=placeholder(int),
      mlp_dim=placeholder(int), num_heads=placeholder(int),
      pool_type=pool_type,        # 'tok' | 'gap' | 'map' | '0' | 'none'
      posemb="learn",             # 'learn' | 'sincos2d'
      rep_size=0,                 # pre-logits Dense + tanh width (0: none)
      layer_norm_eps=1e-6, drop_path_rate=0.1, dropout_rate=0.0, dtype="float32",
      param_dtype="float32",
      remat_policy="none"))       # recompute blocks in backprop: less memory, same results;
                                  # 'none' | 'full' | 'dots' | 'dots_with_no_batch_dims'
  model.update(changes)
  return model


def big_vision_config(model: ml_collections.ConfigDict, r: float, crop_pct: float):
  """The recipe of this file on a big_vision ViT: MCTF r on blocks 1..depth-1, inputs in
  [-1, 1] as big_vision preprocesses them (mean = std = 0.5), the evaluation crop."""
  config = base_config()
  config.model = model
  depth = model_config(config).depth
  config.fusion = mctf_fusion(r=float(r), layers=tuple(range(1, depth)))
  config.data.update(dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=crop_pct))
  return config


def mctf_fusion(**changes) -> ml_collections.ConfigDict:
  """MCTF as the official scripts run it (mctf_type [16,8,0,1,1,1,20,40,1,1,0])."""
  fusion = ml_collections.ConfigDict(dict(
      method="mctf",              # 'mctf' | 'tome' (ToMe itself; configs/tome.py) | 'pitome'
                                  # (PiToMe; configs/pitome.py: r is then a keep ratio)
      r=16.0,                     # tokens removed per fused block (or a ratio < 1); a
                                  # float so that overrides may give either
      inflection=0.0,             # ToMe's decreasing schedule (r, inflection); 0: constant
      layers=tuple(range(1, 12)),  # fused blocks, 0-based
      prop_attn=True,             # proportional attention: + log(size) on the keys
      one_step_ahead="approx",    # 'off' | 'approx' | 'precise'
      tau_sim=1.0, tau_info=20.0, tau_size=40.0,  # temperatures (0 = criterion off)
      bidirectional=True,
      pooling="attn",             # 'size' | 'attn' | 'max' | 'mean'; official scripts: attn
      trace_source=False,
      teacher_r_max=8.0,          # teacher r' ~ U{0, ..., teacher_r_max - 1} (or a ratio)
      merge_impl="auto",          # 'auto' | 'scatter' | 'matmul'
      # Train step: the teacher's token arrays at the full width for every r' (None), on
      # a grid of widths of this step, or at exact counts (0); see mctf_jax/config.py.
      train_token_step=ml_collections.config_dict.placeholder(int),
      # Train step: one r' per this many examples of the global batch, as the official
      # code draws one per GPU of its 8 x 128 images (0: one r' per batch).
      teacher_group_size=128,
      train_scan_blocks=True,     # train step: alike padded blocks as one lax.scan
      # A FLOP budget that picks r (of fusion.r's kind) instead: GFLOPs per image, or a
      # fraction of the unfused model's FLOPs (0: none; see mctf_jax/cost.py).
      target_gflops=0.0,
      target_fraction=0.0,
      pitome_margin=0.75,         # method 'pitome': energy margin m (block l: m - m l / L)
  ))
  fusion.update(changes)
  return fusion


def base_config() -> ml_collections.ConfigDict:
  """The official MCTF DeiT-S fine-tuning recipe: the config every file in configs/ edits."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = deit_model("small")
  config.fusion = mctf_fusion()

  # Data: any tfds image classification dataset, a folder of class folders, or 'digits'.
  # (Fields of this section are read by mctf_jax.data.)
  config.data = ml_collections.ConfigDict(dict(
      dataset="imagenet2012",     # tfds name, "folder:/path/to/root", "digits", "cluttered_digits"
      data_dir=ml_collections.config_dict.placeholder(str),  # tfds data_dir (see README)
      train_split="train",
      eval_split="validation",
      # Training augmentation (the DeiT recipe).
      crop_scale=(0.08, 1.0),     # random resized crop (bicubic)
      crop_ratio=(3 / 4, 4 / 3),
      hflip=True,
      randaugment="rand-m9-mstd0.5-inc1",  # timm notation; "" to disable
      reprob=0.25,                # random erasing probability (timm 'pixel' mode)
      mixup=0.0, cutmix=0.0,      # alphas; 0 = off
      mixup_prob=1.0,             # probability that a batch is mixed (timm mixup_prob)
      mixup_switch_prob=0.5,      # both on: probability of cutmix rather than mixup
      repeated_aug=3,             # repeated augmentation (1 = off)
      shuffle_buffer=16_384,
      # Evaluation: resize shorter side to img_size / crop_pct (bicubic, antialiased), crop.
      crop_pct=0.875,
      mean=(0.485, 0.456, 0.406),
      std=(0.229, 0.224, 0.225),
      prefetch=2,                 # batches prefetched to the devices
  ))

  config.batch_size = 1024        # global
  config.eval_batch_size = 1024
  config.num_epochs = 30
  config.cooldown_epochs = 10     # at min_lr after the cosine
  config.warmup_epochs = 0
  config.base_lr = 5e-4 * 0.03    # per 512 images; scaled by batch_size / 512
  config.min_lr = 1e-6
  config.warmup_lr = 1e-7
  config.weight_decay = 0.05
  config.grad_clip = 0.0          # global norm; 0 = off
  config.ema_decay = 0.99996      # 0 = no EMA

  config.loss = ml_collections.ConfigDict(dict(
      label_smoothing=0.1, consistency_threshold=0.4,
      weight_student=1.0, weight_teacher=1.0, weight_consistency=3.0))

  config.init = ml_collections.ConfigDict(dict(
      checkpoint="",              # pretrained DeiT: Orbax dir from mctf_jax.convert or .pth
  ))
  config.mesh = ml_collections.ConfigDict(dict(fsdp=1))  # devices that shard parameters
  # Multi-process runs: a process silent this many seconds (killed, host or network lost)
  # stops the others with exit code 1 (mctf_jax.processes).
  config.distributed = ml_collections.ConfigDict(dict(
      lost_process_timeout=processes.DEFAULT_TIMEOUT))

  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.eval_every_epochs = 1

  config.eval = ml_collections.ConfigDict(dict(
      r_values=(),                # r to evaluate at (empty: fusion.r and 0)
      output_dir="",              # eval.py's results (empty: CHECKPOINT/eval); --output_dir wins
  ))
  return config


def tome_fusion(r=13, layers=tuple(range(12))) -> ml_collections.ConfigDict:
  """ToMe itself (``fusion.method='tome'``) at r on `layers`: the MCTF fields it ignores keep
  ToMe's values, no consistency teacher."""
  return mctf_fusion(method="tome", r=r, layers=layers, prop_attn=True, teacher_r_max=0.0,
                     **TOME_FIXED)


def pitome_fusion(keep_ratio=0.925, layers=tuple(range(12))) -> ml_collections.ConfigDict:
  """PiToMe itself (``fusion.method='pitome'``) keeping the fraction `keep_ratio` of the
  tokens in each of `layers`, with its DeiT margins 0.75 - 0.75 l / L: the MCTF fields it
  ignores keep PiToMe's values, no consistency teacher."""
  return mctf_fusion(method="pitome", r=keep_ratio, layers=layers, teacher_r_max=0.0,
                     pitome_margin=PITOME_MARGIN, **PITOME_FIXED)


# ----------------------------------------------------------------------------- LV-ViT

# Per size: the official model's drop-path rate and evaluation crop (TokenLabeling's
# README and default_cfgs).
LVVIT_RECIPE = {"tiny": dict(drop_path_rate=0.1, crop_pct=0.9),
                "small": dict(drop_path_rate=0.1, crop_pct=0.9),
                "medium": dict(drop_path_rate=0.2, crop_pct=1.0)}


def lvvit_model(size: str, img_size: int = 224) -> ml_collections.ConfigDict:
  """LV-ViT-T/S/M/L (mctf_jax.models.lvvit.SIZES), patch 16."""
  width, depth, heads, skip_lam, stem = LVVIT_SIZES[size]
  return ml_collections.ConfigDict(dict(
      arch="lvvit", img_size=img_size, patch_size=16, in_chans=3, embed_dim=width,
      depth=depth, num_heads=heads, mlp_ratio=3.0, qkv_bias=False, skip_lam=skip_lam,
      stem_channels=stem, num_classes=1000, layer_norm_eps=1e-5, batch_norm_eps=1e-5,
      train_batch_norm=False,     # the stem's BatchNorm: running statistics, kept as loaded
      drop_path_rate=LVVIT_RECIPE.get(size, LVVIT_RECIPE["medium"])["drop_path_rate"],
      dropout_rate=0.0, dtype="float32", param_dtype="float32",
      remat_policy="none"))       # recompute blocks in backprop: less memory, same results;
                                  # 'none' | 'full' | 'dots' | 'dots_with_no_batch_dims'


def lvvit_config(size: str, r: float = 8.0) -> ml_collections.ConfigDict:
  """The MCTF recipe on LV-ViT of `size`: r on blocks 1..depth-1."""
  config = base_config()
  config.model = lvvit_model(size)
  config.fusion = mctf_fusion(r=float(r), layers=tuple(range(1, config.model.depth)))
  config.data.crop_pct = LVVIT_RECIPE[size]["crop_pct"]
  return config


# ----------------------------------------------------------------------------- T2T-ViT

# variant: (embed_dim, depth, num_heads, mlp_ratio, tokens_type, MCTF r on blocks 1..depth-1,
# the r whose FLOPs fall closest to 31% under the unfused model's)
T2T_VARIANTS = {
    "7": (256, 7, 4, 2.0, "performer", 29),
    "10": (256, 10, 4, 2.0, "performer", 17),
    "12": (256, 12, 4, 2.0, "performer", 13),
    "14": (384, 14, 6, 3.0, "performer", 10),
    "19": (448, 19, 7, 3.0, "performer", 7),
    "24": (512, 24, 8, 3.0, "performer", 5),
    "t_14": (384, 14, 6, 3.0, "transformer", 13),
    "t_19": (448, 19, 7, 3.0, "transformer", 8),
    "t_24": (512, 24, 8, 3.0, "transformer", 6),
}


def _t2t_variant(variant: str) -> tuple:
  variant = str(variant)
  if variant not in T2T_VARIANTS:
    raise ValueError(f"unknown T2T-ViT variant {variant!r}: expected one of "
                     f"{', '.join(T2T_VARIANTS)} (configs/t2t_vit.py:VARIANT)")
  return T2T_VARIANTS[variant]


def t2t_vit_model(variant: str = "14") -> ml_collections.ConfigDict:
  """T2T-ViT-<variant> at 224x224 with the released checkpoints' attention scale."""
  width, depth, heads, mlp_ratio, tokens_type, _ = _t2t_variant(variant)
  return ml_collections.ConfigDict(dict(
      arch="t2t_vit", img_size=224, in_chans=3, num_classes=1000,
      tokens_type=tokens_type,    # 'performer' | 'transformer' (the T2T module)
      token_dim=64, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
      qkv_bias=False,
      qk_scale="embed_dim",       # 'embed_dim' | 'head_dim' | a number
      performer_dropout_rate=0.1, drop_path_rate=0.1, dropout_rate=0.0, dtype="float32",
      param_dtype="float32",
      remat_policy="none"))       # recompute blocks in backprop: less memory, same results;
                                  # 'none' | 'full' | 'dots' | 'dots_with_no_batch_dims'


def t2t_vit_config(variant: str = "14") -> ml_collections.ConfigDict:
  """The MCTF recipe on T2T-ViT-<variant>: its r (T2T_VARIANTS) on blocks 1..depth-1."""
  config = base_config()
  config.model = t2t_vit_model(variant)
  depth, r = _t2t_variant(variant)[1], _t2t_variant(variant)[5]
  config.fusion = mctf_fusion(r=float(r), layers=tuple(range(1, depth)))
  config.data.crop_pct = 0.9      # the official default_cfg's evaluation crop
  return config
