"""`pip install .`: the wheel holds the library and its requirements, and an installed copy
loads the repository's config files by path from any directory."""

import glob
import os
import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT


def _requirements():
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def test_wheel_installs_and_loads_configs_from_anywhere(tmp_path):
  # Built from a copy, so that the build's files stay out of the checkout.
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "requirements.txt"):
    shutil.copy(os.path.join(ROOT, name), src)
  shutil.copytree(os.path.join(ROOT, "mctf_jax"), src / "mctf_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  build = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w",
                               str(tmp_path / "wheel"), str(src)],
                         capture_output=True, text=True, timeout=300)
  assert build.returncode == 0, build.stderr
  (wheel,) = glob.glob(str(tmp_path / "wheel" / "*.whl"))
  import mctf_jax
  assert os.path.basename(wheel).startswith(f"mctf_jax-{mctf_jax.__version__}-")
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    metadata = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
  modules = sorted(os.path.relpath(p, ROOT) for p in
                   glob.glob(os.path.join(ROOT, "mctf_jax", "**", "*.py"), recursive=True))
  assert sorted(n for n in names if not n.startswith("mctf_jax-")) == modules
  requires = [line.split(": ", 1)[1] for line in metadata.splitlines()
              if line.startswith("Requires-Dist: ") and "extra ==" not in line]
  assert requires == _requirements()
  assert "Provides-Extra: torch" in metadata

  target = tmp_path / "site"
  install = subprocess.run(pip + ["install", "--no-deps", "--target", str(target), wheel],
                           capture_output=True, text=True, timeout=300)
  assert install.returncode == 0, install.stderr
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
  code = (f"import mctf_jax; from mctf_jax import cost\n"
          f"assert mctf_jax.__file__.startswith({str(target)!r}), mctf_jax.__file__\n"
          f"config = mctf_jax.load_config({os.path.join(ROOT, 'configs', 'tome.py')!r}, "
          f"{{'fusion.r': 8}})\n"
          f"print(config.fusion.method, round(cost.count_flops(config).gflops, 3))\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  from mctf_jax import cost
  here = cost.count_flops(mctf_jax.load_config(os.path.join(ROOT, "configs", "tome.py"),
                                                {"fusion.r": 8}))
  assert done.stdout.split() == ["tome", str(round(here.gflops, 3))]
  tool = subprocess.run([sys.executable, "-m", "mctf_jax.tools.flops",
                         f"--config={os.path.join(ROOT, 'configs', 'deit_s.py')}"],
                        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  assert tool.returncode == 0, tool.stderr
  assert "2.602 GFLOPs" in tool.stdout


def test_load_config_errors(tmp_path):
  import pytest
  import mctf_jax
  with pytest.raises(mctf_jax.ConfigError, match="config file 'nope.py' not found"):
    mctf_jax.load_config("nope.py")
  path = os.path.join(ROOT, "configs", "deit_s.py")
  with pytest.raises(mctf_jax.ConfigError, match="unknown field; config.fusion has"):
    mctf_jax.load_config(path, {"fusion.rr": 8})
  with pytest.raises(mctf_jax.ConfigError, match="no section 'fuse'"):
    mctf_jax.load_config(path, {"fuse.r": 8})
  tiny = mctf_jax.load_config(os.path.join(ROOT, "tests", "configs", "digits_tiny.py") + ":deit")
  assert tiny.num_epochs == 1 and tiny.model.arch == "deit"
