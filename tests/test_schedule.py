"""The static fusion schedule and the validation of configs."""

import importlib

import jax
import pytest

import mctf_jax
from mctf_jax.config import ConfigError, FusionConfig
from mctf_jax.fusion.schedule import compute_schedule, effective_r
from mctf_jax.models import DeiTConfig, registry as models

DEIT_MCTF_TOKENS = (197, 197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21)
DEIT_FAST_TOKENS = (197, 197, 197, 197, 129, 129, 129, 85, 85, 85, 56, 56, 56)


def schedule_of(model, fusion):
  return compute_schedule(fusion, num_tokens=model.num_tokens, depth=model.depth,
                          num_protected=model.num_protected)


@pytest.mark.parametrize("name,tokens", [
    ("deit_t", DEIT_MCTF_TOKENS), ("deit_s", DEIT_MCTF_TOKENS), ("deit_b", DEIT_MCTF_TOKENS),
    ("deit_t_fast", DEIT_FAST_TOKENS), ("deit_s_fast", DEIT_FAST_TOKENS),
    ("tome", tuple(197 - 13 * i for i in range(13))),
    ("tome_like", tuple(197 - 13 * i for i in range(13))),
])
def test_every_config_schedule(name, tokens):
  config = importlib.import_module(f"configs.{name}").get_config()
  schedule = mctf_jax.create_model(config).schedule()
  assert schedule.tokens_per_layer == tokens
  for plan in schedule.layers:
    assert plan.r == plan.r_ab + plan.r_ba
    assert plan.tokens_out == plan.tokens_in - plan.r
  text = str(schedule)
  assert f"{tokens[0]} -> {tokens[-1]} tokens" in text
  assert len(text.splitlines()) == 2 + 12


def test_bidirectional_split_and_ratio():
  model = DeiTConfig(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2)
  s = schedule_of(model, FusionConfig(r=0.35, layers=(1, 3)))
  # int(64 * 0.35) = 22 at 65 tokens, int(42 * 0.35) = 14 at 43 tokens.
  assert [p.r for p in s.layers] == [0, 22, 0, 14]
  assert [(p.r_ab, p.r_ba) for p in s.layers if p.fuses] == [(11, 11), (7, 7)]
  one_dir = schedule_of(model, FusionConfig(r=7, layers=(0,), bidirectional=False))
  assert (one_dir.layers[0].r_ab, one_dir.layers[0].r_ba) == (7, 0)
  odd = schedule_of(model, FusionConfig(r=7, layers=(0,)))
  assert (odd.layers[0].r_ab, odd.layers[0].r_ba) == (3, 4)


def test_reference_clamps():
  assert effective_r(16, 197) == 16
  assert effective_r(16, 21) == 10     # 21 - 16 < 10: r = 11, then at most (21 - 1) // 2
  assert effective_r(16, 20) == 9      # r = 10, then at most (20 - 1) // 2
  assert effective_r(100, 197) == 98   # at most half of the unprotected tokens
  assert effective_r(0.35, 10) == 0    # never below 10 tokens
  assert effective_r(4, 8) == 0        # fewer than 10 tokens: no fusion (not negative)
  assert effective_r(0.35, 197) == 68
  model = DeiTConfig(img_size=32, patch_size=4, embed_dim=64, depth=8, num_heads=2)
  s = schedule_of(model, FusionConfig(r=16, layers=tuple(range(8))))
  assert s.tokens_per_layer[-1] >= 10
  assert all(t >= 10 for t in s.tokens_per_layer)


def test_r_override_and_r_zero():
  config = importlib.import_module("configs.deit_s").get_config()
  model = mctf_jax.create_model(config)
  assert model.schedule(0).tokens_per_layer == (197,) * 13
  assert not model.schedule(0).fuses
  assert model.schedule(8).tokens_out == 197 - 88
  assert model.with_fusion(r=8).schedule() == model.schedule(8)
  assert hash(model.schedule()) == hash(model.schedule(16))


@pytest.mark.parametrize("changes,message", [
    (dict(r=-1), "fusion.r must be >= 0"),
    (dict(r=1.5), "must be a whole number"),
    (dict(r="16"), "must be a number"),
    (dict(r=True), "must be a number"),
    (dict(layers=(1, 2, 2)), "more than once"),
    (dict(layers=(1, "a")), "integer block indices"),
    (dict(pooling="avg"), "fusion.pooling must be one of"),
    (dict(one_step_ahead=1), "fusion.one_step_ahead must be one of"),
    (dict(tau_info=-1.0), "fusion.tau_info"),
    (dict(merge_impl="fast"), "fusion.merge_impl"),
    (dict(teacher_r_max=-2), "fusion.teacher_r_max must be >= 0"),
])
def test_bad_fusion_values(changes, message):
  with pytest.raises(ConfigError, match=message):
    FusionConfig(**{**dict(r=8, layers=(1,)), **changes})


def test_layers_out_of_range_names_them():
  config = {"model": dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2),
            "fusion": dict(r=8, layers=(1, 4, 7))}
  with pytest.raises(ConfigError, match=r"\[4, 7\] out of range.*0\.\.3"):
    mctf_jax.create_model(config)


@pytest.mark.parametrize("changes,message", [
    (dict(img_size=30, patch_size=4), "img_size=30 is not divisible by model.patch_size=4"),
    (dict(embed_dim=65), "embed_dim=65 is not divisible by model.num_heads=2"),
    (dict(depth=0), "model.depth must be a positive integer"),
    (dict(dtype="fp8"), "model.dtype must be one of"),
    (dict(drop_path_rate=1.0), "drop_path_rate must be in"),
    (dict(mlp_ratio=0), r"model.mlp_ratio must be a number > 0, got 0"),
    (dict(layer_norm_eps="1e-6"), r"model.layer_norm_eps must be a number > 0, got '1e-6'"),
    (dict(qkv_bias=1), r"model.qkv_bias must be True or False, got 1"),
])
def test_bad_model_values(changes, message):
  base = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2)
  with pytest.raises(ConfigError, match=message):
    DeiTConfig(**{**base, **changes})


@pytest.mark.parametrize("arch", ["deit", "lvvit", "t2t_vit", "vit"])
def test_every_backbone_checks_heads_and_numbers_alike(arch):
  config_class = models.get(arch).config_class
  with pytest.raises(ConfigError, match=r"model.embed_dim=65 is not divisible by "
                     r"model.num_heads=2"):
    config_class(embed_dim=65, num_heads=2)
  number = "layer_norm_eps" if arch == "vit" else "mlp_ratio"
  with pytest.raises(ConfigError, match=rf"model.{number} must be a number > 0, got -1"):
    config_class(**{number: -1})
  if arch != "vit":
    with pytest.raises(ConfigError, match=r"model.qkv_bias must be True or False, got None"):
      config_class(qkv_bias=None)


def test_unknown_config_field():
  with pytest.raises(ConfigError, match=r"unknown field\(s\) in config.fusion: \['rr'\]"):
    mctf_jax.create_model({"model": {}, "fusion": {"rr": 3}})


def test_tome_like_preset():
  tome = FusionConfig.tome_like(r=13, layers=tuple(range(12)))
  assert (tome.method, tome.tau_info, tome.tau_size, tome.bidirectional,
          tome.one_step_ahead) == ("mctf", 0.0, 0.0, False, "off")


def test_drop_path_rates_rise_linearly_to_the_configured_rate():
  base = dict(img_size=32, patch_size=4, embed_dim=64, num_heads=2)
  assert DeiTConfig(**base, depth=4, drop_path_rate=0.3).drop_path_rates == pytest.approx(
      [0.0, 0.1, 0.2, 0.3])
  assert DeiTConfig(**base, depth=1, drop_path_rate=0.3).drop_path_rates == [0.0]
  model = mctf_jax.create_model({"model": dict(base, depth=4, drop_path_rate=0.3)})
  rates, _ = model.init_with_output(jax.random.key(0),
                                    method=lambda m: [b.drop_path_rate for b in m.blocks])
  assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
