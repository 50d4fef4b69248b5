"""benchmarks/input_pipeline.py on a tiny folder (12 small JPEGs, 32x32 batches of 4), so
that the script cannot rot: it builds the folder, profiles, times and writes its JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.benchmark   # ~20 s of pipeline builds; pytest -m benchmark runs it
def test_input_pipeline_benchmark_tiny(tmp_path):
  out = tmp_path / "result.json"
  args = [sys.executable, os.path.join(ROOT, "benchmarks", "input_pipeline.py"),
          f"--dir={tmp_path / 'jpegs'}", "--num_images=12", "--classes=3", "--width=64",
          "--height=48", "--img_size=32", "--batch_size=4", "--rounds=2", "--batches=1",
          "--profile", "--profile_images=2", "--profile_repeats=1", f"--json={out}"]
  done = subprocess.run(args, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"))
  assert done.returncode == 0, done.stderr[-3000:]
  assert "targets: train >= 60% of reference met" in done.stdout
  result = json.loads(out.read_text())
  assert set(result["pipelines"]) == {"reference", "pil_crop", "train", "eval"}
  for row in result["pipelines"].values():
    assert row["img_per_cpu_s"] > 0 and len(row["ratio_each"]) == 2
  assert result["pipelines"]["reference"]["ratio"] == 1.0
  assert result["pipelines"]["pil_crop"]["ratio_pil_crop"] == 1.0
  assert set(result["targets"]) == {"train", "eval"}
  assert "decode crop window (train)" in result["profile_ms_per_image"]
  # The folder: 12 JPEGs in 3 class folders, one in four a portrait; reused by a rerun.
  jpegs = sorted((tmp_path / "jpegs" / "train").glob("c*/*.jpg"))
  assert len(jpegs) == 12 and len({p.parent for p in jpegs}) == 3
  from PIL import Image
  assert {Image.open(p).size for p in jpegs} == {(64, 48), (48, 64)}
  before = [p.stat().st_mtime_ns for p in jpegs]
  code = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); "
          f"import input_pipeline; input_pipeline.build_folder("
          f"{str(tmp_path / 'jpegs')!r}, 12, 3, (64, 48), 90)")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert [p.stat().st_mtime_ns for p in jpegs] == before
