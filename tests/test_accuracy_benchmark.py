"""benchmarks/accuracy.py shrunk to a smoke test: every phase (plain model, evaluation at a
FLOP level with ToMe, MCTF and the ablations, fine-tuning each) runs on a 2-block model with
64 patch tokens for a couple of steps, so that the script cannot rot. The figures are not
checked (see docs/accuracy.md for the real run)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  for method in ("plain", "tome", "mctf", "mctf_no_osa", "mctf_no_size"):
    assert ("no training", method) in rows
  for method in ("plain", "tome", "mctf", "mctf_no_osa", "mctf_no_size", "mctf_no_consistency"):
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
