"""The backbones: ViTs whose blocks run on the fusion engine (mctf_jax.fusion).

    base.py      BackboneConfig, Backbone: what every backbone is and gets;
                 ClassTokenBackbone: a class token, a final norm, a head on the class token
    registry.py  backbones by config.model.arch ('deit', or 'module:Class' of your own)
    layers.py    timm-style layers: the pre-norm block, attention, MLP, patch embedding
    deit.py      DeiT / ViT (arch 'deit')
    vit.py       big_vision's ViT (arch 'vit'): its checkpoints, SigLIP image encoders
    t2t_vit.py   T2T-ViT (arch 't2t_vit'): the Tokens-to-Token module, Performer or transformer
    lvvit.py     LV-ViT (arch 'lvvit'): convolutional stem, token-labeling head

A new backbone is one file: a config dataclass and a Backbone (or ClassTokenBackbone)
subclass, registered.
"""

from mctf_jax.models.base import (Backbone, BackboneConfig, ClassTokenBackbone, EncoderOutput,
                                  consistency)
from mctf_jax.models.deit import DeiT, DeiTConfig   # (importing deit registers it)
from mctf_jax.models.lvvit import LVViT, LVViTConfig   # (importing lvvit registers it)
from mctf_jax.models.registry import get, names, register
from mctf_jax.models.t2t_vit import T2TViT, T2TViTConfig   # (importing t2t_vit registers it)
from mctf_jax.models.vit import ViT, ViTConfig   # (importing vit registers it)

__all__ = ["Backbone", "BackboneConfig", "ClassTokenBackbone", "EncoderOutput", "consistency",
           "DeiT", "DeiTConfig", "LVViT", "LVViTConfig", "T2TViT", "T2TViTConfig", "ViT",
           "ViTConfig", "get", "names", "register"]
