"""Pictures: preprocessing, the group renderer, the merge figure and the accuracy plot."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import mctf_jax
from conftest import launch_env, run, tiny_config
from mctf_jax.tools import benchmark, visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
  """A real photo (skimage's coffee cup, 600x400) saved as a file."""
  from skimage import data
  path = tmp_path_factory.mktemp("photo") / "coffee.png"
  Image.fromarray(data.coffee()).save(path)
  return str(path)


def test_eval_preprocess_centre_crop():
  # 400x200 (w x h): shorter side to floor(224 / 0.875) = 256, so 512x256; centre 224 crop
  # takes columns 144..367. Left half red, right half blue: the crop splits at its middle.
  pixels = np.zeros((200, 400, 3), np.uint8)
  pixels[:, :200, 0] = 255
  pixels[:, 200:, 2] = 255
  crop, normalised = visualize.eval_preprocess(Image.fromarray(pixels), 224, 0.875, MEAN, STD)
  assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
  assert normalised.shape == (224, 224, 3) and normalised.dtype == np.float32
  assert (crop[:, :100, 0] == 255).all() and (crop[:, :100, 2] == 0).all()
  assert (crop[:, 124:, 2] == 255).all() and (crop[:, 124:, 0] == 0).all()
  np.testing.assert_allclose(normalised, (crop / 255.0 - MEAN) / STD, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="crop_pct"):
    visualize.eval_preprocess(Image.fromarray(pixels), 224, 1.5, MEAN, STD)


def test_inner_border_is_per_group_erosion():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.repeat(rng.integers(0, 4, (5, 5)), 6, 0), 6, 1)
  for width in (1, 2):
    expected = np.zeros(labels.shape, bool)
    for group in np.unique(labels):
      mask = labels == group
      expected |= mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
    np.testing.assert_array_equal(visualize.inner_border(labels, width), expected)


def test_render_groups_fills_mean_colours_and_outlines():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  labels = np.array([[0, 1], [1, 2]])
  colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
  panel, pixel_labels = visualize.render_groups(image, labels, scale=2, border=1,
                                                colors=colors)
  assert panel.shape == (16, 16, 3) and pixel_labels.shape == (16, 16)
  assert sorted(np.unique(pixel_labels)) == [0, 1, 2]
  small_labels = np.repeat(np.repeat(labels, 4, 0), 4, 1)
  edge = visualize.inner_border(pixel_labels, 1)
  for group in range(3):
    want = np.round(image[small_labels == group].mean(axis=0))
    inside = (pixel_labels == group) & ~edge
    assert inside.any()
    np.testing.assert_array_equal(panel[inside], np.broadcast_to(want, panel[inside].shape))
    np.testing.assert_array_equal(panel[(pixel_labels == group) & edge],
                                  np.broadcast_to(colors[group], panel[(pixel_labels == group)
                                                                       & edge].shape))
  with pytest.raises(ValueError, match="multiple of the label grid"):
    visualize.render_groups(image[:7], labels)


def test_merge_figure_of_tiny_model(photo, tmp_path):
  config = tiny_config()
  model = mctf_jax.create_model(config)
  variables = benchmark.random_variables(model)
  crop, normalised = visualize.eval_preprocess(photo, 32, 0.875, MEAN, STD)
  maps = visualize.trace_token_maps(model, variables, normalised)
  schedule = model.schedule()
  fused = [p for p in schedule.layers if p.fuses]
  assert [layer for layer, _ in maps] == [p.layer for p in fused]

  picture, info = visualize.draw_merges(crop, maps, 4, panel_px=224, cols=2)
  out = tmp_path / "merges.png"
  picture.save(out)
  loaded = Image.open(out)
  assert loaded.format == "PNG"
  assert loaded.size == visualize.canvas_size(1 + len(maps), 2, 224)  # 32 px x 7 = 224
  for plan, (layer, token_map), panel_info in zip(fused, maps, info):
    labels = visualize.patch_labels(token_map, 8)
    # One colour group per token, the class token (never merged, not drawn) aside.
    assert len(np.unique(labels)) == plan.tokens_out - 1
    assert panel_info["tokens"] == plan.tokens_out
    np.testing.assert_array_equal(panel_info["groups"], np.unique(labels))

  # The last panel as drawn: every group's interior pixels carry its patches' mean colour.
  cols, _ = visualize.panel_grid(1 + len(maps), 2)
  row, col = divmod(len(maps), cols)
  x = visualize.PAD_PX + col * (224 + visualize.PAD_PX)
  y = visualize.PAD_PX + row * (224 + visualize.CAPTION_PX + visualize.PAD_PX) + \
      visualize.CAPTION_PX
  panel = np.asarray(loaded.convert("RGB"))[y:y + 224, x:x + 224]
  labels = visualize.patch_labels(maps[-1][1], 8)
  pixel_labels = np.repeat(np.repeat(labels, 28, 0), 28, 1)
  interior = ~visualize.inner_border(pixel_labels, max(1, 28 // 12))
  patch_labels_px = np.repeat(np.repeat(labels, 4, 0), 4, 1)
  drawn = set()
  for group in np.unique(labels):
    want = np.round(crop[patch_labels_px == group].mean(axis=0))
    got = panel[(pixel_labels == group) & interior]
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))
    drawn.add(group)
  assert len(drawn) == fused[-1].tokens_out - 1


def _cli(*args):
  return run(["-m", "mctf_jax.tools.visualize", *args], launch_env(), timeout=300)


def test_cli_merges(photo, tmp_path):
  out = tmp_path / "final.png"
  run = _cli("--config=tests/configs/tiny.py", f"--image={photo}", f"--out={out}",
             "--layers=final")
  assert run.returncode == 0, run.stderr
  assert "random weights" in run.stdout and "block 3: 41" in run.stdout
  picture = Image.open(out)
  assert picture.format == "PNG" and picture.size == visualize.canvas_size(2, 6, 224)

  run = _cli("--config=tests/configs/tiny.py", f"--image={tmp_path / 'missing.jpg'}",
             f"--out={out}")
  assert run.returncode == 1 and "cannot read image" in run.stderr
  run = _cli("--config=tests/configs/tiny.py", "--config.fusion.r=0", f"--image={photo}",
             f"--out={out}")
  assert run.returncode == 1 and "fuses no tokens" in run.stderr
  assert "Traceback" not in run.stderr


def test_cli_merges_of_the_evaluation_split(photo, tmp_path):
  out = tmp_path / "digits.png"
  digits = ("--config=tests/configs/tiny.py", "--config.data.dataset=digits",
            "--config.data.crop_pct=1.0")
  run = _cli(*digits, "--examples=2", f"--out={out}")
  assert run.returncode == 0, run.stderr
  assert "block 1: 57, block 2: 49, block 3: 41" in run.stdout
  # A row per image: the input and the three fused blocks.
  assert Image.open(out).size == (visualize.canvas_size(4, 4, 224)[0],
                                  2 * visualize.canvas_size(4, 4, 224)[1])
  both = _cli(*digits, "--examples=2", f"--image={photo}", f"--out={out}")
  assert both.returncode == 1 and "not both" in both.stderr and "Traceback" not in both.stderr


def test_cli_plot(tmp_path):
  results = []
  for name, rows in [("deit_s", [(0, 4.608, 79.8), (8, 3.603, 80.0), (16, 2.602, 80.1)]),
                     ("tome", [(13, 2.712, 79.4), (0, 4.608, 79.8)])]:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({
        "config": f"configs/{name}.py", "checkpoint": "/ckpt/model.pth",
        "results": [{"r": r, "gflops": g, "img_per_s": 100.0, "top1": t, "top5": 95.0,
                     "images": 50000} for r, g, t in rows]}))
    results.append(str(path))
  out = tmp_path / "plot.png"
  run = _cli("plot", f"--results={','.join(results)}", f"--out={out}")
  assert run.returncode == 0, run.stderr
  picture = Image.open(out)
  assert picture.format == "PNG" and picture.size == (960, 720)
  pixels = np.asarray(picture.convert("RGB"))
  assert (pixels != 255).any(axis=-1).mean() > 0.02  # something is drawn

  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"results": [{"r": 16, "gflops": 2.6}]}))
  run = _cli("plot", f"--results={bad}", f"--out={out}")
  assert run.returncode == 1 and "results[0] needs a number 'top1'" in run.stderr
  run = _cli("draw")
  assert run.returncode == 1 and "unknown command" in run.stderr


def test_load_results_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    visualize.load_results(str(tmp_path / "none.json"))
  path = tmp_path / "list.json"
  path.write_text("[1, 2]")
  with pytest.raises(ValueError, match="non-empty 'results' list"):
    visualize.load_results(str(path))
