"""benchmarks/accuracy.py: its parts here (seconds), and the whole script shrunk to a smoke run
(every phase on a 2-block model with 64 patch tokens for a step or two; minutes on 2 busy
cores, so marked ``benchmark``: ``pytest -m benchmark tests/test_accuracy_benchmark.py``).
The figures themselves are in docs/accuracy.md."""

import json
import os
import subprocess
import sys

import pytest

from configs import cluttered_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import accuracy  # noqa: E402


def test_methods_meet_the_flop_level_with_their_own_r():
  base = cluttered_digits.get_config()
  plain = accuracy.gflops(accuracy.method_config(base, "plain", None))
  seen = {}
  for method in ("tome", "pitome", "mctf", "mctf_no_osa", "mctf_no_size", "mctf_no_info",
                 "mctf_no_consistency"):
    config = accuracy.method_config(base, method, 0.5)
    fraction = accuracy.gflops(config) / plain
    assert 0.48 < fraction <= 0.5, (method, fraction)
    assert config.fusion.target_fraction == 0 and config.fusion.layers == (0, 1, 2, 3)
    seen[method] = config.fusion
  assert seen["tome"].method == "tome" and seen["tome"].teacher_r_max == 0
  assert seen["pitome"].method == "pitome" and 0.5 <= seen["pitome"].r < 1
  mctf = seen["mctf"]
  assert mctf.method == "mctf" and mctf.one_step_ahead == "approx" and mctf.tau_size == 40
  assert mctf.teacher_r_max == round(mctf.r / 2)
  assert seen["mctf_no_osa"].one_step_ahead == "off" and seen["mctf_no_osa"].r > mctf.r
  assert seen["mctf_no_size"].tau_size == 0 and seen["mctf_no_size"].r == mctf.r
  assert seen["mctf_no_consistency"].teacher_r_max == 0 and seen["mctf_no_info"].tau_info == 0
  # Fusing after the MLP (no one-step-ahead) cannot come down to 40% of the FLOPs.
  assert accuracy.method_config(base, "mctf_no_osa", 0.4) is None
  assert accuracy.method_config(base, "plain", None).fusion.r == 0


def test_table_and_plot(tmp_path):
  rows = [dict(setting=s, method=m, label=accuracy.METHODS[m], level=l, r=r, gflops=g,
               top1=[v, v + 1], mean=v + 0.5, std=0.71, n=2, flop_fraction=g / 0.04)
          for s in ("no training", "fine-tuned")
          for m, l, r, g, v in (("plain", None, 0, 0.04, 70.0), ("tome", 0.5, 60, 0.02, 60.0),
                                ("mctf", 0.5, 50, 0.02, 66.0))]
  table = accuracy.format_table(rows)
  lines = table.splitlines()
  assert len(lines) == 5 and "100.0%" in lines[2] and "ToMe" in lines[3]
  assert "60.50 +- 0.71 (2)" in lines[3] and "66.50 +- 0.71 (2)" in lines[4]
  out = tmp_path / "acc.png"
  accuracy.plot(rows, str(out), "test")
  assert out.stat().st_size > 10_000


@pytest.mark.benchmark
def test_accuracy_benchmark_runs_shrunk(tmp_path):
  out, png = tmp_path / "acc.json", tmp_path / "acc.png"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"   # one device, fast compiles
  args = ["benchmarks/accuracy.py", f"--workdir={tmp_path / 'work'}", f"--json={out}",
          f"--plot={png}", "--config.model.patch_size=8", "--config.model.embed_dim=16",
          "--config.model.depth=2", "--config.fusion.layers=(0,1)",
          "--config.eval_batch_size=360", "--base_epochs=1", "--base_steps_per_epoch=2",
          "--seeds=0", "--levels=0.8", "--train_levels=0.8", "--ablation_level=0.8",
          "--finetune_steps=1", "--finetune_epochs=1"]
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  figures = json.loads(out.read_text())
  rows = {(r["setting"], r["method"]) for r in figures["rows"]}
  for method in ("plain", "tome", "pitome", "mctf", "mctf_no_osa", "mctf_no_size",
                 "mctf_no_info"):
    assert ("no training", method) in rows
  for method in ("plain", "tome", "pitome", "mctf", "mctf_no_osa", "mctf_no_size",
                 "mctf_no_consistency"):
    assert ("fine-tuned", method) in rows
  for row in figures["rows"]:
    assert 0 <= row["mean"] <= 100 and row["n"] == 1
    if row["method"] != "plain":   # at the level: within a few % below 80% of the FLOPs
      assert 0.7 < row["flop_fraction"] <= 0.8, row
  assert "MCTF w/o consistency loss" in proc.stdout and png.stat().st_size > 10_000
  # A rerun finds every result in WORKDIR/results.json: nothing is trained again.
  again = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0 and "== fine-tuning" not in again.stdout
