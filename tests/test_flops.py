"""FLOP counting: the official fvcore numbers, the port's traced matmuls, XLA's count."""

import dataclasses
import importlib
import json
import os

import pytest

import mctf_jax
from conftest import launch_env, run, tiny_config
from mctf_jax.config import FusionConfig, fusion_config
from mctf_jax.models import DeiTConfig
from mctf_jax import cost
from mctf_jax.tools import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = tuple(range(1, 12))
DEIT = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


# The paper's table, as fvcore measures the official code at 224x224 (GFLOPs).
@pytest.mark.parametrize("name,r,target", [
    ("deit_t", 0, 1.258), ("deit_t", None, 0.709), ("deit_t_fast", None, 0.748),
    ("deit_s", 0, 4.608), ("deit_s", None, 2.602), ("deit_s_fast", None, 2.756),
])
def test_official_numbers(name, r, target):
  report = cost.count_flops(_config(name), r=r)
  assert abs(report.gflops - target) / target < 0.005
  assert round(report.gflops, 3) == target


# fvcore 0.1.5 FlopCountAnalysis(...).total() on the official code (commit 2004da0, eval
# mode, one 224x224 image unless noted), run once outside this project with torch.
@pytest.mark.parametrize("size,fusion,r_eval,img_size,expected", [
    ("tiny", dict(r=16, layers=ALL), None, 224, 709_204_608),
    ("tiny", dict(r=0, layers=()), None, 224, 1_258_411_200),
    ("small", dict(r=16, layers=ALL), None, 224, 2_601_596_160),
    ("small", dict(r=0.35, layers=(3, 6, 9)), None, 224, 2_756_419_584),
    ("small", dict(r=16, layers=ALL, one_step_ahead="precise"), None, 224, 2_983_145_856),
    ("small", dict(r=16, layers=ALL, one_step_ahead="off"), None, 224, 2_874_056_832),
    ("small", dict(r=13, layers=tuple(range(12)), one_step_ahead="off", pooling="size",
                   tau_info=0, tau_size=0, bidirectional=False), None, 224, 2_913_051_648),
    ("small", dict(r=16, layers=ALL, tau_sim=0), None, 224, 2_584_438_272),
    # r=20 leaves 10 tokens before block 11, which then fuses none.
    ("small", dict(r=20, layers=ALL), None, 224, 2_194_379_904),
    ("small", dict(r=16, layers=ALL), 8, 224, 3_603_275_520),
    ("small", dict(r=16, layers=ALL), None, 384, 13_200_714_240),
    ("base", dict(r=16, layers=ALL), None, 224, 9_935_940_096),
    ("small", dict(r=7, layers=(0, 5), bidirectional=False), None, 224, 4_347_563_904),
    ("tiny", dict(r=0.35, layers=(3, 6, 9), one_step_ahead="precise"), None, 224, 773_147_520),
])
def test_matches_fvcore_on_official_code(size, fusion, r_eval, img_size, expected):
  width, heads = DEIT[size]
  model = DeiTConfig(img_size=img_size, embed_dim=width, num_heads=heads)
  assert cost.count_flops(model, FusionConfig(**fusion), r_eval).total == expected


def test_plain_deit_by_hand():
  # DeiT-S: per block 2 LayerNorms, qkv, q @ k^T, attn @ v, proj, MLP; then embed, norm, head.
  t, c, m = 197, 384, 1536
  block = 2 * 5 * t * c + t * c * 3 * c + 2 * t * t * c + t * c * c + 2 * t * c * m
  total = 12 * block + 196 * c * 3 * 16 * 16 + 5 * t * c + c * 1000
  report = cost.count_flops(DeiTConfig())
  assert report.total == total
  assert cost.count_flops(_config("deit_s"), r=0).total == total


def test_report_structure():
  config = _config("deit_s")
  report = cost.count_flops(config)
  schedule = mctf_jax.create_model(config).schedule()
  assert report.schedule == schedule
  blocks = [s for s in report.stages if s.name.startswith("block")]
  assert [(s.tokens_in, s.tokens_out, s.r) for s in blocks] == \
      [(p.tokens_in, p.tokens_out, p.r) for p in schedule.layers]
  assert sum(s.flops for s in report.stages) == report.total
  assert report.matmul + report.by_op()["norm"] == report.total
  # Block 1 in 'approx' mode: matching on 197 tokens (99 x 384 x 98), v on 181.
  assert blocks[1].op("matching") == 99 * 98 * 384
  assert blocks[0].op("matching") == 0
  table = report.table()
  assert len([l for l in table.splitlines() if l.startswith("block")]) == 12
  assert "197->181" in table and "2.6016" in table
  d = report.to_dict()
  assert d["flops"] == report.total and d["tokens_per_layer"][-1] == 21
  json.dumps(d)


def test_port_costs_the_full_attention_product():
  config = _config("deit_s")
  official = cost.count_flops(config)
  port = cost.count_flops(config, implementation="mctf_jax", merge_impl="scatter")
  # The port attends with (T, T) @ (T, d) per head instead of the merged (O, O) map.
  extra = sum((p.tokens_in ** 2 - p.tokens_out ** 2) * 384
              for p in official.schedule.layers if p.fuses)
  assert port.total - official.total == extra
  maxpool = dataclasses.replace(fusion_config(config), pooling="max")
  assert cost.count_flops(config, maxpool, implementation="mctf_jax",
                           merge_impl="scatter").total == cost.count_flops(config, maxpool).total


def test_bad_implementation():
  with pytest.raises(ValueError, match="implementation must be one of"):
    cost.count_flops(_config("deit_s"), implementation="torch")


@pytest.mark.parametrize("one_step_ahead,pooling,merge_impl", [
    ("approx", "size", "scatter"), ("approx", "attn", "scatter"), ("approx", "max", "scatter"),
    ("approx", "attn", "matmul"), ("approx", "max", "matmul"), ("approx", "mean", "matmul"),
    ("precise", "attn", "scatter"), ("precise", "size", "matmul"), ("precise", "max", "matmul"),
    ("off", "size", "scatter"), ("off", "attn", "matmul"), ("off", "max", "matmul"),
])
def test_count_equals_traced_matmuls(one_step_ahead, pooling, merge_impl):
  config = tiny_config(one_step_ahead=one_step_ahead, pooling=pooling, merge_impl=merge_impl)
  model = mctf_jax.create_model(config)
  traced = flops.traced_matmul_flops(model, batch_size=2)
  assert traced == 2 * cost.count_flops(config, implementation="mctf_jax").matmul


def test_deit_s_count_equals_traced_matmuls():
  config = _config("deit_s")
  config.fusion.merge_impl = "scatter"
  model = mctf_jax.create_model(config)
  report = cost.count_flops(config, implementation="mctf_jax")
  assert flops.traced_matmul_flops(model) == report.matmul
  assert flops.traced_matmul_flops(model, r=0) == cost.count_flops(config, r=0).matmul


# XLA counts 2 per multiply-add plus the elementwise ops: between 2x and (2 + 2e)x the traced
# multiply-adds, e = 8% for DeiT (measured 3-6%), 25% for the width-64 model (16-18%).
@pytest.mark.parametrize("name,r,tolerance", [
    ("tiny", 0, 0.25), ("tiny", None, 0.25), ("deit_s", 0, 0.08), ("deit_t_fast", None, 0.08),
])
def test_xla_cost_analysis(name, r, tolerance):
  if name == "tiny":
    config = tiny_config(trace_source=False)
  else:
    config = _config(name)
  model = mctf_jax.create_model(config)
  traced = flops.traced_matmul_flops(model, 1, r)
  xla = flops.xla_cost(model, 1, r)
  assert 2 * traced <= xla["flops"] <= (1 + tolerance) * 2 * traced
  if name != "tiny":  # against the official convention too
    official = cost.count_flops(config, r=r).total
    assert 1.0 < xla["flops"] / (2 * official) < 1 + tolerance


def _cli(*args):
  return run(["-m", "mctf_jax.tools.flops", *args], launch_env(), timeout=120)


def test_cli(tmp_path):
  out = tmp_path / "flops.json"
  run = _cli("--config=configs/deit_s.py", "--verbose", f"--json={out}")
  assert run.returncode == 0, run.stderr
  assert "2.602 GFLOPs" in run.stdout and "without fusion: 4.608 GFLOPs" in run.stdout
  assert "block 11" in run.stdout and "37->21" in run.stdout
  data = json.loads(out.read_text())
  assert round(data["gflops"], 3) == 2.602 and len(data["stages"]) == 15

  run = _cli("--config=configs/deit_s.py", "--config.fusion.r=8")
  assert run.returncode == 0, run.stderr
  assert "r=8" in run.stdout and "3.603 GFLOPs" in run.stdout


def test_cli_bad_values():
  run = _cli("--config=configs/deit_s.py", "--r=lots")
  assert run.returncode == 1
  assert "--r must be a number" in run.stderr and "Traceback" not in run.stderr
  run = _cli("--config=configs/deit_s.py", "--config.fusion.pooling=median")
  assert run.returncode == 1
  assert "fusion.pooling must be one of" in run.stderr and "Traceback" not in run.stderr


# ----------------------------------------------------------------------------- FLOP budget

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                 if f.endswith(".py") and f not in ("__init__.py", "default.py"))


def _less_fused(r, method="mctf"):
  """The candidate next to r with less fusion (None at no fusion); PiToMe's r is a keep
  ratio, so less fusion is a larger one."""
  if r == 0:
    return None
  if method == "pitome":
    return round(r + cost.RATIO_STEP, 6) if r < 1 - cost.RATIO_STEP else 0
  return r - 1 if isinstance(r, int) else round(r - cost.RATIO_STEP, 6) or 0


@pytest.mark.parametrize("name", CONFIGS)
def test_flop_budget_met_from_below_for_every_config(name):
  config = _config(name)
  unfused = cost.count_flops(config, r=0).total
  pitome = config.fusion.method == "pitome"
  most = 0.5 if pitome else 0.99 if config.fusion.r < 1 else 1000   # the most fusion
  least = min(cost.count_flops(config, r=r).total for r in (config.fusion.r, most))
  # Budgets a quarter, half and three quarters of the way from the least FLOPs any r reaches
  # (at most the config's r's) to the unfused model's.
  for budget in (dict(target_fraction=(least + 0.75 * (unfused - least)) / unfused),
                 dict(target_fraction=(least + 0.5 * (unfused - least)) / unfused),
                 dict(target_gflops=(least + 0.25 * (unfused - least)) / 1e9)):
    config.fusion.update({"target_gflops": 0.0, "target_fraction": 0.0, **budget})
    choice = cost.budget_choice(config)
    target = budget.get("target_gflops", 0) * 1e9 or budget.get("target_fraction", 0) * unfused
    assert choice.budget == pytest.approx(target) and choice.unfused == unfused
    assert type(choice.r) is (float if 0 < config.fusion.r < 1 else int)   # fusion.r's kind
    model = mctf_jax.create_model(config)
    assert model.fusion.r == choice.r and not model.fusion.has_budget
    # The model carries the choice (what train.py and eval.py print) while its FLOPs hold.
    assert model.fusion.budget_choice == choice
    assert model.with_fusion(merge_impl="matmul").fusion.budget_choice == choice
    assert model.with_fusion(r=choice.r).fusion.budget_choice is None
    # The model's FLOPs are the choice's, within the budget; the next r with less fusion
    # exceeds it (so no r comes closer from below, FLOPs falling as r grows).
    assert cost.model_flops(model).total == choice.flops <= target
    assert cost.count_flops(config).total == choice.flops
    less = _less_fused(choice.r, config.fusion.method)
    assert less is None or cost.count_flops(config, r=less).total > target


def test_flop_budget_of_the_paper_setting_and_overrides():
  config = _config("deit_s")
  config.fusion.target_gflops = 2.61        # the paper's 2.60 (r=16: 2.602 GFLOPs)
  model = mctf_jax.create_model(config)
  assert model.fusion.r == 16 and model.schedule() == mctf_jax.create_model(_config("deit_s")).schedule()
  assert "r=16, 2.602 GFLOPs" in str(cost.budget_choice(config))
  config.fusion.target_gflops = 2.6         # from below: 2.602 is over, so r=17
  assert mctf_jax.create_model(config).fusion.r == 17
  # ... and the choice names the r just over a budget it nearly meets.
  choice = cost.budget_choice(config)
  assert choice.above == (16, cost.count_flops(config, r=16).total)
  assert str(choice).endswith("; r=16 is 0.06% over the budget, at 2.602 GFLOPs")
  config.fusion.target_gflops = 2.5         # r=16 is 4% over: not named
  assert "over the budget" not in str(cost.budget_choice(config))
  # An r given in code, or a later r change, replaces the budget.
  assert mctf_jax.create_model(config, r=8).fusion.r == 8
  assert mctf_jax.create_model(config).with_fusion(r=8).schedule().r == 8
  assert cost.count_flops(config, r=4).schedule.r == 4
  # A budget above the unfused FLOPs is met without fusion.
  config.fusion.target_gflops = 5.0
  assert mctf_jax.create_model(config).fusion.r == 0


def test_flop_budget_bad_values():
  config = _config("deit_s")
  config.fusion.target_fraction = 0.1
  with pytest.raises(mctf_jax.ConfigError, match=r"target_fraction=0.1 \(0.4608 GFLOPs\) cannot "
                     r"be met: .* runs at 0.983 GFLOPs \(r=98\) to 4.608 GFLOPs"):
    mctf_jax.create_model(config)
  config.fusion.update(dict(target_fraction=0.9, layers=(11,)))
  with pytest.raises(mctf_jax.ConfigError, match=r"fuse more blocks"):
    mctf_jax.create_model(config)
  for fields, message in [(dict(target_fraction=1.5), r"expected a value in \(0, 1\]"),
                          (dict(target_gflops=-1.0), r"target_gflops must be a finite number"),
                          (dict(target_gflops=2.0, target_fraction=0.5), "set one of them"),
                          (dict(target_gflops=2.0, r=(0, 8, 8)), "per-block list")]:
    with pytest.raises(mctf_jax.ConfigError, match=message):
      FusionConfig(**{"r": 16, "layers": ALL, **fields})


def test_cli_flop_budget():
  run = _cli("--config=configs/deit_s_fast.py", "--config.fusion.target_fraction=0.5")
  assert run.returncode == 0, run.stderr
  assert "FLOP budget 2.304 GFLOPs (50.0% of the unfused 4.608): r=0.48, 2.299" in run.stdout
  run = _cli("--config=configs/deit_s.py", "--config.fusion.target_gflops=0.1")
  assert run.returncode == 1 and "cannot be met" in run.stderr and "Traceback" not in run.stderr
