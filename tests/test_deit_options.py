"""timm's later ViT options on the 'deit' backbone: LayerScale (``init_values``), the position
embedding on the patches only (``no_embed_class``) and register tokens (``reg_tokens``), as
DeiT III and DINOv2 with registers use them. The outputs are checked against a NumPy forward
pass written from timm's definition (VisionTransformer._pos_embed, Block with LayerScale),
on random weights in timm's names and layout, read through the converter."""

import numpy as np
import pytest
from scipy.special import erf

import jax
import mctf_jax
from mctf_jax import convert, models
from mctf_jax.errors import ConfigError
from mctf_jax import cost
from mctf_jax.tools import flops

BASE = dict(arch="deit", img_size=32, patch_size=4, embed_dim=16, depth=3, num_heads=2,
            num_classes=10)
OPTIONS = [dict(init_values=1e-6, no_embed_class=True),                   # DeiT III
           dict(init_values=1e-5, no_embed_class=True, reg_tokens=4),     # DINOv2 + registers
           dict(reg_tokens=2)]                                            # registers, embedded


def random_state(cfg, seed=0):
  """Random weights in timm's names and shapes (LayerScale factors far from their init, so
  that they matter)."""
  rng = np.random.default_rng(seed)
  shapes = models.get("deit").torch_shapes(cfg)
  return {k: (rng.standard_normal(s) * (0.5 if k.endswith("gamma") else 0.2)).astype(np.float32)
          for k, s in shapes.items()}


def _layer_norm(x, w, b, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w + b


def timm_forward(sd, cfg, images_NHWC, dinov2=False):
  """timm's VisionTransformer forward (global_pool 'token'), in float64; with dinov2 the
  embedding of DINOv2's own code (its names; the position embedding on [class token,
  patches], the registers inserted after the class token)."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  b, h, w, c = images_NHWC.shape
  p, d, heads = cfg.patch_size, cfg.embed_dim, cfg.num_heads
  patches = images_NHWC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
  x = patches.reshape(b, -1, c * p * p) @ sd["patch_embed.proj.weight"].reshape(d, -1).T
  x = x + sd["patch_embed.proj.bias"]
  cls = np.broadcast_to(sd["cls_token"], (b, 1, d))
  if dinov2:   # [class token, patches] + pos_embed, then the registers after the class token
    x = np.concatenate([cls, x], axis=1) + sd["pos_embed"]
    registers = np.broadcast_to(sd["register_tokens"], (b, cfg.reg_tokens, d))
    x = np.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
  else:
    prefix = [cls] + ([np.broadcast_to(sd["reg_token"], (b, cfg.reg_tokens, d))]
                      if cfg.reg_tokens else [])
    if cfg.no_embed_class:                     # timm: pos_embed first, then the prefix
      x = np.concatenate(prefix + [x + sd["pos_embed"]], axis=1)
    else:
      x = np.concatenate(prefix + [x], axis=1) + sd["pos_embed"]
  for i in range(cfg.depth):
    k = f"blocks.{i}."
    y = _layer_norm(x, sd[k + "norm1.weight"], sd[k + "norm1.bias"])
    qkv = y @ sd[k + "attn.qkv.weight"].T + sd[k + "attn.qkv.bias"]
    q, kk, v = qkv.reshape(b, -1, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    logits = q @ kk.transpose(0, 1, 3, 2) * (d // heads) ** -0.5
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
    y = y @ sd[k + "attn.proj.weight"].T + sd[k + "attn.proj.bias"]
    x = x + (y * sd[k + "ls1.gamma"] if cfg.init_values is not None else y)
    y = _layer_norm(x, sd[k + "norm2.weight"], sd[k + "norm2.bias"])
    y = y @ sd[k + "mlp.fc1.weight"].T + sd[k + "mlp.fc1.bias"]
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    y = y @ sd[k + "mlp.fc2.weight"].T + sd[k + "mlp.fc2.bias"]
    x = x + (y * sd[k + "ls2.gamma"] if cfg.init_values is not None else y)
  x = _layer_norm(x, sd["norm.weight"], sd["norm.bias"])
  return x[:, 0] @ sd["head.weight"].T + sd["head.bias"]


@pytest.mark.parametrize("options", OPTIONS)
def test_outputs_equal_timms_definition(options):
  config = {"model": dict(BASE, **options), "fusion": dict(r=6, layers=(1, 2))}
  model = mctf_jax.create_model(config)
  cfg = model.config
  assert cfg.num_protected == 1 + cfg.reg_tokens
  assert cfg.num_tokens == 64 + cfg.num_protected
  state = random_state(cfg)
  variables = convert.torch_to_variables(state, config)
  images = np.asarray(jax.random.normal(jax.random.key(1), (2, 32, 32, 3)), np.float32)
  plain = jax.jit(model.with_fusion(r=0).apply)(variables, images)
  np.testing.assert_allclose(plain, timm_forward(state, cfg, images), rtol=0, atol=2e-4)
  # With fusion the class token and the registers stay first, alone, never merged.
  out = jax.jit(lambda v, x: model.apply(v, x, method=model.encode, trace_source=True))(
      variables, images)
  p = cfg.num_protected
  np.testing.assert_array_equal(np.asarray(out.size_BxT)[:, :p], 1)
  np.testing.assert_array_equal(np.asarray(out.source_BxTxN)[:, :p, :p],
                                np.broadcast_to(np.eye(p), (2, p, p)))
  assert out.tokens_BxTxC.shape[1] == cfg.num_tokens - 12
  # And back to timm's names, unchanged.
  back = convert.flax_to_torch(variables["params"], config)
  assert set(back) == set(state)
  for name, value in state.items():
    np.testing.assert_array_equal(back[name], value)


def test_deit3_official_names_and_a_new_image_size(caplog):
  """DeiT III's own files name the LayerScale factors gamma_1 / gamma_2; a file for another
  image size gets its patches' position embedding resized (no prefix entries to keep)."""
  config = {"model": dict(BASE, init_values=1e-6, no_embed_class=True)}
  cfg = mctf_jax.create_model(config).config
  state = random_state(cfg)
  official = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v
              for k, v in state.items()}
  assert "blocks.0.gamma_1" in official
  got, want = (convert.torch_to_variables(s, config) for s in (official, state))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  larger = {"model": dict(BASE, img_size=48, init_values=1e-6, no_embed_class=True)}
  params = convert.torch_to_variables(official, larger)["params"]
  assert params["pos_embed"].shape == (1, 144, 16)
  np.testing.assert_allclose(params["pos_embed"],
                             convert.resize_pos_embed(state["pos_embed"], 144, 0), atol=1e-6)


def test_bad_values_and_flops():
  for fields, message in [(dict(reg_tokens=-1), r"model.reg_tokens must be an int >= 0"),
                          (dict(reg_tokens=1.5), r"model.reg_tokens must be an int >= 0"),
                          (dict(init_values=0.0), r"model.init_values must be a number > 0"),
                          (dict(no_embed_class="yes"), r"model.no_embed_class must be True")]:
    with pytest.raises(ConfigError, match=message):
      mctf_jax.create_model({"model": dict(BASE, **fields)})
  # Registers are tokens: the blocks' FLOPs grow with them; LayerScale adds no product.
  plain = cost.count_flops({"model": BASE, "fusion": dict(r=0)}).total
  scaled = cost.count_flops({"model": dict(BASE, init_values=1e-6), "fusion": dict(r=0)})
  with_regs = cost.count_flops({"model": dict(BASE, reg_tokens=4), "fusion": dict(r=0)})
  assert scaled.total == plain and with_regs.schedule.tokens_in == 69
  assert with_regs.total > plain
  model = mctf_jax.create_model({"model": dict(BASE, reg_tokens=4, init_values=1e-5),
                                 "fusion": dict(r=6, layers=(1, 2))})
  assert "LayerScale, 4 registers" in model.describe(model.config)
  for r in (None, 0):
    report = cost.count_flops(model.config, model.fusion, r=r, implementation="mctf_jax")
    assert flops.traced_matmul_flops(model, 2, r) == 2 * report.matmul


def test_dinov2_official_names_and_position_embedding():
  """DINOv2's own files (``register_tokens``, ``mask_token``, a position embedding with an
  entry for the class token, the registers joining after it) load into timm's layout
  (no_embed_class, ``reg_token``) and compute DINOv2's forward."""
  config = {"model": dict(BASE, init_values=1e-5, no_embed_class=True, reg_tokens=4)}
  model = mctf_jax.create_model(config)
  state = random_state(model.config, seed=1)
  official = {("register_tokens" if k == "reg_token" else k): v for k, v in state.items()}
  official["pos_embed"] = np.concatenate(
      [np.full((1, 1, 16), 0.3, np.float32), state["pos_embed"]], axis=1)   # (1, 1 + 64, C)
  official["mask_token"] = np.zeros((1, 16), np.float32)
  variables = convert.torch_to_variables(official, config)
  np.testing.assert_allclose(variables["params"]["cls_token"], state["cls_token"] + 0.3,
                             rtol=0, atol=1e-7)
  images = np.asarray(jax.random.normal(jax.random.key(2), (2, 32, 32, 3)), np.float32)
  logits = jax.jit(model.apply)(variables, images)
  np.testing.assert_allclose(logits, timm_forward(official, model.config, images, dinov2=True),
                             rtol=0, atol=2e-4)
