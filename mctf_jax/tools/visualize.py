r"""Pictures: which patches each fused token holds, and accuracy against GFLOPs.

    python -m mctf_jax.tools.visualize --config=configs/deit_s.py --checkpoint=CKPT \
        --image=photo.jpg --out=merges.png [--layers=all|final]
    python -m mctf_jax.tools.visualize --config=configs/digits.py --checkpoint=CKPT \
        --examples=4 --out=merges.png        # the first images of the evaluation split
    python -m mctf_jax.tools.visualize plot --results=eval_results.json --out=acc_vs_flops.png

Merges (the MCTF / ToMe papers' figure): the image goes through the evaluation
preprocessing (shorter side resized to img_size / crop_pct, bicubic; centre crop;
normalised with config.data.mean/std), then ``encode(..., trace_source=True)``. For every
fused block (or only the last, ``--layers=final``) a panel fills the patches of each token
with their mean colour and draws each token's outline in a colour of its own, as ToMe's
``make_visualization`` (which the official code reuses) does. The class token is not drawn,
so a panel shows one group per token but the class token. The first panel is the input crop.
Without ``--checkpoint`` the weights are random (fusion then follows colour and position
only). ``--examples=N`` draws the first N images of the config's evaluation split instead of
``--image``, as the evaluation sees them (``mctf_jax.data.eval_batches``), a row each.

Plot: top-1 against GFLOPs over r from eval.py's result files (one series per file, points
labelled with r; ``--results`` takes a comma-separated list).
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageFont
from ml_collections import config_flags

import mctf_jax
from mctf_jax import checkpoint, parallel
from mctf_jax import data as data_lib   # lazy: TensorFlow loads when a pipeline is built
from mctf_jax.errors import ConfigError, MctfError
from mctf_jax.fusion.config import normalize_r
from mctf_jax.tools.benchmark import random_variables
from mctf_jax.tools.cli import fail

CAPTION_PX = 24
PAD_PX = 8


# ----------------------------------------------------------------------------- preprocessing


def eval_preprocess(image, img_size: int, crop_pct: float, mean: Sequence[float],
                    std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """The evaluation transform of DeiT / timm, with PIL.

  Resizes the shorter side to floor(img_size / crop_pct) (bicubic, aspect kept), takes the
  centre img_size x img_size crop, and normalises. `image` is a PIL image or a path.
  Returns (crop_HxWx3 uint8, normalised_HxWx3 float32).
  """
  if not isinstance(image, Image.Image):
    image = Image.open(image)
  image = image.convert("RGB")
  if not 0 < crop_pct <= 1:
    raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
  scale = math.floor(img_size / crop_pct)
  w, h = image.size
  if w <= h:
    size = (scale, int(scale * h / w))
  else:
    size = (int(scale * w / h), scale)
  image = image.resize(size, Image.BICUBIC)
  left = int(round((size[0] - img_size) / 2.0))
  top = int(round((size[1] - img_size) / 2.0))
  crop = np.asarray(image.crop((left, top, left + img_size, top + img_size)), np.uint8)
  normalised = (crop.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / \
      np.asarray(std, np.float32)
  return crop, normalised


# ----------------------------------------------------------------------------- drawing


def patch_labels(token_map_N: np.ndarray, grid: int, num_prefix: int = 1) -> np.ndarray:
  """(grid, grid) map of the token holding each patch (the `num_prefix` tokens before the
  patches, e.g. the class token, dropped)."""
  token_map_N = np.asarray(token_map_N)
  if token_map_N.shape != (grid * grid + num_prefix,):
    raise ValueError(f"token map must have {grid * grid + num_prefix} entries ({num_prefix} "
                     f"protected token(s) and a {grid}x{grid} grid of patches), got shape "
                     f"{token_map_N.shape}")
  return token_map_N[num_prefix:].reshape(grid, grid)


def group_colors(num: int, seed: int = 0) -> np.ndarray:
  """(num, 3) uint8 outline colours: random but bright enough to see on any fill."""
  rng = np.random.default_rng(seed)
  hsv = np.stack([rng.random(num), 0.6 + 0.4 * rng.random(num), 0.75 + 0.25 * rng.random(num)],
                 axis=-1)
  h6 = hsv[:, 0] * 6
  i = np.floor(h6).astype(int) % 6
  f = h6 - np.floor(h6)
  v, s = hsv[:, 2], hsv[:, 1]
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  table = np.stack([np.stack(c, -1) for c in
                    [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])
  rgb = table[i, np.arange(num)]
  return np.round(rgb * 255).astype(np.uint8)


def inner_border(pixel_labels_HxW: np.ndarray, width: int) -> np.ndarray:
  """Pixels within `width` steps (4-neighbourhood) of another group or of the image edge.

  The per-group binary erosion of ToMe's visualisation, for all groups at once.
  """
  interior = np.ones(pixel_labels_HxW.shape, bool)
  for _ in range(width):
    keep = interior.copy()
    for axis in (0, 1):
      for shift in (1, -1):
        same = np.zeros_like(interior)
        src = [slice(None)] * 2
        dst = [slice(None)] * 2
        src[axis] = slice(max(shift, 0), pixel_labels_HxW.shape[axis] + min(shift, 0))
        dst[axis] = slice(max(-shift, 0), pixel_labels_HxW.shape[axis] + min(-shift, 0))
        same[tuple(dst)] = ((pixel_labels_HxW[tuple(src)] == pixel_labels_HxW[tuple(dst)])
                            & interior[tuple(src)])
        keep &= same
    interior = keep
  return ~interior


def render_groups(image_HxWx3: np.ndarray, labels_GxG: np.ndarray, *, scale: int = 1,
                  border: int = 1, colors: np.ndarray | None = None):
  """One panel: each group of patches filled with its mean colour, outlined in its colour.

  image_HxWx3: the crop (uint8), H = W = G * patch size. labels_GxG: a group id per patch.
  scale: integer upscaling of the panel. border: outline width in panel pixels (0: none).
  colors: (max label + 1, 3) uint8 outline colours; default ``group_colors``.
  Returns (panel_(sH)x(sW)x3 uint8, pixel_labels_(sH)x(sW)): the group drawn at each pixel.
  """
  image = np.asarray(image_HxWx3)
  labels = np.asarray(labels_GxG)
  h, w = image.shape[:2]
  g = labels.shape[0]
  if image.ndim != 3 or image.shape[2] != 3 or h != w or labels.shape != (g, g) or h % g:
    raise ValueError(f"need a square RGB image whose side is a multiple of the label grid; "
                     f"got image {image.shape} and labels {labels.shape}")
  patch = h // g * scale
  pixel_labels = np.repeat(np.repeat(labels, patch, axis=0), patch, axis=1)
  big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1).astype(np.float64)
  flat = pixel_labels.ravel()
  count = np.bincount(flat)
  sums = np.stack([np.bincount(flat, big[..., c].ravel(), minlength=count.size)
                   for c in range(3)], axis=-1)
  mean = np.round(sums / np.maximum(count, 1)[:, None]).astype(np.uint8)
  panel = mean[pixel_labels]
  if border:
    if colors is None:
      colors = group_colors(count.size)
    edge = inner_border(pixel_labels, border)
    panel[edge] = colors[pixel_labels[edge]]
  return panel, pixel_labels


def panel_grid(num_panels: int, cols: int) -> tuple[int, int]:
  cols = max(1, min(cols, num_panels))
  return cols, math.ceil(num_panels / cols)


def canvas_size(num_panels: int, cols: int, panel_px: int) -> tuple[int, int]:
  """(width, height) in pixels of ``compose``'s picture."""
  cols, rows = panel_grid(num_panels, cols)
  return (cols * panel_px + (cols + 1) * PAD_PX,
          rows * (panel_px + CAPTION_PX) + (rows + 1) * PAD_PX)


def compose(panels: Sequence[np.ndarray], captions: Sequence[str], cols: int = 6):
  """Square panels of one size in a grid on white, each with its caption above; a PIL image."""
  panel_px = panels[0].shape[0]
  if any(p.shape[:2] != (panel_px, panel_px) for p in panels):
    raise ValueError("panels must be square and of one size")
  cols, _ = panel_grid(len(panels), cols)
  canvas = Image.new("RGB", canvas_size(len(panels), cols, panel_px), "white")
  draw = ImageDraw.Draw(canvas)
  try:
    font = ImageFont.load_default(size=15)
  except TypeError:  # Pillow < 10.1
    font = ImageFont.load_default()
  for i, (panel, caption) in enumerate(zip(panels, captions)):
    row, col = divmod(i, cols)
    x = PAD_PX + col * (panel_px + PAD_PX)
    y = PAD_PX + row * (panel_px + CAPTION_PX + PAD_PX)
    draw.text((x + panel_px / 2, y + CAPTION_PX / 2), caption, fill="black", font=font,
              anchor="mm")
    canvas.paste(Image.fromarray(panel), (x, y + CAPTION_PX))
  return canvas


# ----------------------------------------------------------------------------- merges


def trace_token_maps(model, variables, image_HxWx3: np.ndarray) -> list[tuple[int, np.ndarray]]:
  """(block, token_map_N) after every fused block, for one normalised image; variables:
  {'params': ...} and the model's state collections, if any."""
  schedule = model.schedule()
  fused = [plan.layer for plan in schedule.layers if plan.fuses]
  encode = jax.jit(lambda v, x: [m for _, m in model.apply(
      v, x, method=model.encode, trace_source=True).layer_token_maps])
  maps = encode(variables, jnp.asarray(image_HxWx3, jnp.float32)[None])
  return [(layer, np.asarray(m[0])) for layer, m in zip(fused, maps)]


def draw_merges(crop_HxWx3: np.ndarray, token_maps: Sequence[tuple[int, np.ndarray]],
                patch_size: int, *, panel_px: int = 224, border: int | None = None,
                cols: int = 6, seed: int = 0, num_prefix: int = 1):
  """The figure: the crop, then one panel per (block, token_map_N). Returns (PIL image, info).

  info: per panel, the block, its token count (class token included) and the distinct
  group ids drawn, for checks.
  """
  h = crop_HxWx3.shape[0]
  grid = h // patch_size
  scale = max(1, round(panel_px / h))
  if border is None:
    border = max(1, patch_size * scale // 12)
  first = token_maps[0][1] if token_maps else None
  colors = group_colors(len(first) if first is not None else 1, seed)
  panels = [np.repeat(np.repeat(np.asarray(crop_HxWx3, np.uint8), scale, 0), scale, 1)]
  captions = ["input"]
  info = []
  for layer, token_map in token_maps:
    labels = patch_labels(token_map, grid, num_prefix)
    panel, pixel_labels = render_groups(crop_HxWx3, labels, scale=scale, border=border,
                                        colors=colors)
    tokens = int(np.max(token_map)) + 1
    panels.append(panel)
    captions.append(f"block {layer}: {tokens} tokens")
    info.append({"layer": layer, "tokens": tokens, "groups": np.unique(pixel_labels)})
  return compose(panels, captions, cols), info


def split_images(config, count: int) -> np.ndarray:
  """The first `count` images of the config's evaluation split, preprocessed as the
  evaluation does: float32 (count, S, S, 3), normalised."""
  try:
    batch = next(data_lib.eval_batches(config, count))
  except MctfError as e:
    fail(str(e))
  available = int(batch["mask"].sum())
  if available < count:
    fail(f"--examples={count}: the evaluation split has {available} images")
  return batch["image"][:count]


def stack_rows(figures):
  """PIL figures one under another (widths padded with white)."""
  width = max(f.size[0] for f in figures)
  out = Image.new("RGB", (width, sum(f.size[1] for f in figures)), "white")
  top = 0
  for f in figures:
    out.paste(f, (0, top))
    top += f.size[1]
  return out


# ----------------------------------------------------------------------------- plot


def load_results(path: str) -> dict:
  """An eval.py result file, checked: {'config', 'checkpoint', 'results': [{r, gflops, top1,
  ...}, ...]}."""
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"results file {path!r} does not exist")
  except json.JSONDecodeError as e:
    raise ValueError(f"results file {path!r} is not valid JSON: {e}")
  if not isinstance(data, dict) or not isinstance(data.get("results"), list) \
      or not data["results"]:
    raise ValueError(f"{path}: expected an object with a non-empty 'results' list "
                     f"(eval.py's format), got {type(data).__name__} with keys "
                     f"{sorted(data) if isinstance(data, dict) else '-'}")
  for i, row in enumerate(data["results"]):
    for key in ("r", "gflops", "top1"):
      value = row.get(key) if isinstance(row, dict) else None
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{path}: results[{i}] needs a number '{key}' (expected keys r, "
                         f"gflops, top1, ...), got {row!r}")
  return data


def _series_label(data: dict, path: str) -> str:
  config = data.get("config") or os.path.basename(path)
  label = os.path.splitext(os.path.basename(str(config)))[0]
  if data.get("checkpoint"):
    label += f" ({os.path.basename(os.path.normpath(str(data['checkpoint'])))})"
  return label


def plot_results(paths: Sequence[str], out: str, *, title: str | None = None,
                 figsize=(6.4, 4.8), dpi: int = 150) -> None:
  """Top-1 against GFLOPs, one line per result file, points labelled with r; a PNG."""
  import matplotlib   # here, not at the top: a second of start-up the other commands skip
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # (after the backend is chosen)

  datasets = [(p, load_results(p)) for p in paths]
  fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
  for path, data in datasets:
    rows = sorted(data["results"], key=lambda row: row["gflops"])
    x = [row["gflops"] for row in rows]
    y = [row["top1"] for row in rows]
    line, = ax.plot(x, y, "o-", label=_series_label(data, path))
    for row in rows:
      if row["r"] == 0:
        ax.plot(row["gflops"], row["top1"], "*", ms=12, color=line.get_color())
      ax.annotate(f"r={row['r']:g}", (row["gflops"], row["top1"]), textcoords="offset points",
                  xytext=(5, 5), fontsize=8, color=line.get_color())
  ax.margins(x=0.1, y=0.15)
  ax.set_xlabel("GFLOPs per image (fvcore convention)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title(title or "Top-1 against FLOPs over r (star: no fusion)")
  ax.grid(True, alpha=0.3)
  ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=dpi)
  plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def _merges(FLAGS) -> None:
  config = FLAGS.config
  missing = [f"--{name}" for name in ("config", "out") if not getattr(FLAGS, name)]
  if not FLAGS.image and not FLAGS.examples:
    missing.append("--image (or --examples)")
  if missing:
    fail(f"drawing merges needs {', '.join(missing)} (or use the 'plot' command)")
  if FLAGS.image and FLAGS.examples:
    fail(f"give --image={FLAGS.image} or --examples={FLAGS.examples}, not both")
  if FLAGS.examples is not None and FLAGS.examples < 1:
    fail(f"--examples={FLAGS.examples}: expected a number of images >= 1")
  if FLAGS.layers not in ("all", "final"):
    fail(f"--layers must be 'all' or 'final', got {FLAGS.layers!r}")
  try:
    model = mctf_jax.create_model(config)
    r = None if FLAGS.r is None else normalize_r(float(FLAGS.r), "--r", model.fusion.method)
    if r is not None:
      model = model.with_fusion(r=r)
  except ValueError as e:
    fail(str(e) if isinstance(e, ConfigError) else f"--r must be a number, got {FLAGS.r!r}")
  m = model.config
  if getattr(m, "patch_size", None) is None:
    fail(f"{type(model).__name__} has no grid of square patches (model.patch_size) to draw")
  if not model.schedule().fuses:
    fail(f"the model fuses no tokens at r={model.fusion.r!r} on blocks "
         f"{list(model.fusion.layers)}; nothing to draw")
  data = config.get("data") or {}
  mean = data.get("mean", (0.485, 0.456, 0.406))
  std = data.get("std", (0.229, 0.224, 0.225))
  if FLAGS.examples:
    images = split_images(config, FLAGS.examples)
    crops = [np.clip(np.round((x * np.asarray(std) + np.asarray(mean)) * 255), 0, 255)
             .astype(np.uint8) for x in images]
  else:
    try:
      crop, normalised = eval_preprocess(FLAGS.image, m.img_size, data.get("crop_pct", 0.875),
                                         mean, std)
    except (OSError, ValueError) as e:
      fail(f"cannot read image {FLAGS.image!r}: {e}")
    images, crops = [normalised], [crop]
  if FLAGS.checkpoint:
    try:
      variables = checkpoint.load_variables(FLAGS.checkpoint, config)
    except MctfError as e:
      fail(str(e))
  else:
    print("no --checkpoint: random weights (tokens then fuse by colour and position only)")
    variables = random_variables(model, FLAGS.seed)
  figures = []
  for crop, normalised in zip(crops, images):
    maps = trace_token_maps(model, variables, normalised)
    if FLAGS.layers == "final":
      maps = maps[-1:]
    cols = len(maps) + 1 if FLAGS.examples else FLAGS.cols
    figures.append(draw_merges(crop, maps, m.patch_size, panel_px=FLAGS.panel_px,
                               border=FLAGS.border, cols=cols, seed=FLAGS.seed,
                               num_prefix=m.num_protected))
  picture, info = figures[0] if len(figures) == 1 else (stack_rows([f for f, _ in figures]),
                                                        figures[0][1])
  try:
    picture.save(FLAGS.out)
  except (OSError, ValueError) as e:
    fail(f"cannot write --out={FLAGS.out}: {e}")
  summary = ", ".join(f"block {i['layer']}: {i['tokens']}" for i in info)
  print(f"wrote {FLAGS.out} ({picture.size[0]}x{picture.size[1]}); tokens after {summary}")


def main(argv=None):
  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_s.py; "
                                  "fields may be overridden: --config.fusion.r=8.")
  flags.DEFINE_string("checkpoint", None, "Weights (converted Orbax dir, train.py workdir or "
                      ".pth/.npz/.safetensors); random weights without it.")
  flags.DEFINE_string("image", None, "Image file (any format PIL reads).")
  flags.DEFINE_integer("examples", None, "Draw the first N images of the config's evaluation "
                       "split instead of --image, a row each.")
  flags.DEFINE_string("out", None, "Output PNG.")
  flags.DEFINE_string("layers", "all", "'all': a panel per fused block; 'final': the last.")
  flags.DEFINE_string("r", None, "Draw at this r instead of config.fusion.r.")
  flags.DEFINE_integer("panel_px", 224, "Approximate panel size (the crop is scaled by an "
                       "integer factor).")
  flags.DEFINE_integer("border", None, "Outline width in pixels (default: 1/12 of a patch).")
  flags.DEFINE_integer("cols", 6, "Panels per row.")
  flags.DEFINE_integer("seed", 0, "Seed of the outline colours (and of random weights).")
  flags.DEFINE_list("results", None, "plot: eval.py result file(s), comma-separated.")
  flags.DEFINE_string("title", None, "plot: the title.")

  def run(argv_):
    command = argv_[1:]
    parallel.quiet_library_logs(FLAGS)
    if command == ["plot"]:
      if not FLAGS.results or not FLAGS.out:
        fail("plot needs --results=eval_results.json[,more.json] and --out=plot.png")
      try:
        plot_results(FLAGS.results, FLAGS.out, title=FLAGS.title)
      except (OSError, ValueError) as e:
        fail(str(e))
      print(f"wrote {FLAGS.out}")
    elif not command:
      if FLAGS.panel_px < 1 or FLAGS.cols < 1 or (FLAGS.border is not None and FLAGS.border < 0):
        fail(f"need --panel_px >= 1, --cols >= 1, --border >= 0; got {FLAGS.panel_px}, "
             f"{FLAGS.cols}, {FLAGS.border}")
      _merges(FLAGS)
    else:
      fail(f"unknown command {' '.join(command)!r}: use no command (draw merges) or 'plot'")

  app.run(run, argv=argv)


if __name__ == "__main__":
  main()
