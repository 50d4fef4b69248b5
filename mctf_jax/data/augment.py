"""Image transforms of the DeiT recipe in TensorFlow (graph mode, for tf.data maps).

Every transform mirrors the PyTorch code the recipe was published with (torchvision 0.8+,
timm 0.6, Pillow), and all randomness is stateless: a transform draws from a `Seeds` stream
that starts at a per-example key, so an example's augmentation depends only on (seed,
process, example counter), never on thread scheduling or on how far a run has got.

* Decoding: JPEGs with the accurate integer IDCT (libjpeg's default, so bit-identical to
  PIL; TensorFlow's default fast IDCT is ~1/255 off on average).
* Resizing: PIL's bicubic resampling (Keys a=-0.5, antialiased when shrinking), done as
  PIL does it, a horizontal pass then a vertical one with rounding to uint8 in between:
  within one grey level of PIL.
* Training: RandomResizedCrop, horizontal flip, timm's RandAugment and
  RandomErasing ('pixel' mode); mixup/cutmix on batches (timm's `Mixup`, 'batch' mode).
* Evaluation: Resize(int(size / crop_pct)) + CenterCrop(size) + ToTensor + Normalize.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable, Optional, Sequence

from mctf_jax.data._tf import tf

LEVEL_DENOM = 10.0  # timm: magnitude 10 = full strength


class Seeds:
  """A stream of seeds for stateless random ops, derived from one int64 key of shape (2,).

  Each call folds a new counter into the key; in a traced function the calls happen in a
  fixed order, so the draws of an example depend on its key alone.
  """

  def __init__(self, key):
    self._key = tf.cast(key, tf.int64)
    self._count = 0

  def __call__(self):
    self._count += 1
    return tf.random.experimental.stateless_fold_in(self._key, self._count)

  def uniform(self, shape=(), minval=0.0, maxval=1.0):
    return tf.random.stateless_uniform(shape, self(), minval, maxval, dtype=tf.float32)

  def normal(self, shape=()):
    return tf.random.stateless_normal(shape, self(), dtype=tf.float32)

  def randint(self, upper):
    """A uniform integer in [0, upper) for an int32 tensor upper >= 1."""
    draw = tf.floor(self.uniform() * tf.cast(upper, tf.float32))
    return tf.minimum(tf.cast(draw, tf.int32), upper - 1)


# ----------------------------------------------------------------------------- decoding

def decode_image(data):
  """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 (H, W, 3), like PIL's convert('RGB')."""
  image = tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def image_shape(data):
  """(height, width) int32 of encoded bytes, reading only the header for JPEGs."""
  return tf.cond(tf.io.is_jpeg(data),
                 lambda: tf.image.extract_jpeg_shape(data)[:2],
                 lambda: tf.shape(decode_image(data))[:2])


def decode_crop(data, top, left, height, width):
  """Decodes only the window [top:top+height, left:left+width] (JPEG) or crops (others)."""
  def jpeg():
    return tf.image.decode_and_crop_jpeg(data, tf.stack([top, left, height, width]),
                                         channels=3, dct_method="INTEGER_ACCURATE")

  def other():
    return decode_image(data)[top:top + height, left:left + width]

  image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  image.set_shape([None, None, 3])
  return image


# ----------------------------------------------------------------------------- resizing

def _round_uint8(x):
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def pil_resize(image, resized_hw, out_hw: Sequence[int], offset=(0, 0)):
  """PIL's bicubic resize of `image` to `resized_hw`, cropped to out_hw at offset (top, left).

  The crop is computed directly (no pixels outside it are resampled) and equals resizing
  then cropping. Two passes like PIL (horizontal, then vertical, rounded to uint8 in
  between) keep the result within one grey level of PIL's. image: (H, W, 3) or a batch
  (N, H, W, 3); returns uint8 (out_h, out_w, 3) (or (N, out_h, out_w, 3)).
  """
  batched = image.shape.rank == 4
  x = tf.cast(image, tf.float32)
  x = x if batched else x[None]
  in_h, in_w = tf.shape(x)[1], tf.shape(x)[2]
  new_h, new_w = (tf.cast(v, tf.float32) for v in resized_hw)
  top, left = (tf.cast(v, tf.float32) for v in offset)
  out_h, out_w = out_hw
  x = tf.raw_ops.ScaleAndTranslate(
      images=x, size=tf.stack([in_h, out_w]),
      scale=tf.stack([1.0, new_w / tf.cast(in_w, tf.float32)]),
      translation=tf.stack([0.0, -left]), kernel_type="keyscubic", antialias=True)
  x = tf.clip_by_value(tf.round(x), 0.0, 255.0)
  x = tf.raw_ops.ScaleAndTranslate(
      images=x, size=[out_h, out_w], scale=tf.stack([new_h / tf.cast(in_h, tf.float32), 1.0]),
      translation=tf.stack([-top, 0.0]), kernel_type="keyscubic", antialias=True)
  out = _round_uint8(x)
  out.set_shape([None, out_h, out_w, 3])
  return out if batched else out[0]


def normalize(image, mean: Sequence[float], std: Sequence[float]):
  """uint8 pixels -> float32 (x / 255 - mean) / std (torchvision ToTensor + Normalize)."""
  x = tf.cast(image, tf.float32) / 255.0
  return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def resize_shorter_and_center_crop(image, size: int, crop_pct: float):
  """torchvision Resize(int(size / crop_pct), BICUBIC) + CenterCrop(size) on uint8 (H, W, 3)."""
  short_target = int(size / crop_pct)
  if short_target < size:
    raise ValueError(f"crop_pct={crop_pct} resizes to {short_target} < img_size={size}; "
                     f"expected crop_pct in (0, 1]")
  shape = tf.cast(tf.shape(image)[:2], tf.int64)
  h, w = shape[0], shape[1]
  # torchvision: new_long = int(new_short * long / short) (integers: floor division).
  short = tf.constant(short_target, tf.int64)
  new_h = tf.where(w <= h, short * h // w, short)
  new_w = tf.where(w <= h, short, short * w // h)
  # CenterCrop: int(round((new - size) / 2)), Python's round (half to even), like tf.round.
  top = tf.round(tf.cast(new_h - size, tf.float64) / 2.0)
  left = tf.round(tf.cast(new_w - size, tf.float64) / 2.0)
  return pil_resize(image, (new_h, new_w), (size, size), (top, left))


def eval_image(image, size: int, crop_pct: float, mean, std):
  """The evaluation transform of a decoded uint8 (H, W, 3) image -> float32 (size, size, 3)."""
  return normalize(resize_shorter_and_center_crop(image, size, crop_pct), mean, std)


# ----------------------------------------------------------------------------- cropping

def sample_crop(seeds: Seeds, height, width, scale: Sequence[float], ratio: Sequence[float]):
  """RandomResizedCrop.get_params (torchvision's, and timm's that DeiT uses): (top, left,
  h, w) int32 of a random crop.

  Ten attempts (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)), the first that
  fits wins; otherwise the whole image, centre-cropped to the nearest ratio in range.
  """
  height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  fh, fw = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  target_area = fh * fw * seeds.uniform([10], scale[0], scale[1])
  aspect = tf.exp(seeds.uniform([10], math.log(ratio[0]), math.log(ratio[1])))
  ws = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)   # round half to even,
  hs = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)   # as Python's round
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  # Fallback: central crop with the ratio clamped into range.
  in_ratio = fw / fh
  fb_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(fh * ratio[1]), tf.int32), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(fw / ratio[0]), tf.int32), height)
  found = tf.reduce_any(fits)
  h = tf.where(found, hs[first], fb_h)
  w = tf.where(found, ws[first], fb_w)
  top_draw = seeds.randint(height - h + 1)
  left_draw = seeds.randint(width - w + 1)
  top = tf.where(found, top_draw, (height - h) // 2)
  left = tf.where(found, left_draw, (width - w) // 2)
  return top, left, h, w


def random_resized_crop(data, seeds: Seeds, size: int, scale, ratio, decoded: bool):
  """Crop of encoded bytes (decoding only the window of JPEGs) or of a uint8 image, resized
  to (size, size) with PIL's bicubic. Returns uint8 (size, size, 3)."""
  if decoded:
    shape = tf.shape(data)
    top, left, h, w = sample_crop(seeds, shape[0], shape[1], scale, ratio)
    crop = data[top:top + h, left:left + w]
  else:
    shape = image_shape(data)
    top, left, h, w = sample_crop(seeds, shape[0], shape[1], scale, ratio)
    crop = decode_crop(data, top, left, h, w)
  return pil_resize(crop, (size, size), (size, size))


def random_flip(image, seeds: Seeds, prob: float = 0.5):
  """torchvision RandomHorizontalFlip: flips when U(0, 1) < prob."""
  # tf.reverse, not image[:, ::-1]: the same pixels, ~7x faster (a strided slice with a
  # negative step takes TensorFlow's slow general path).
  return tf.cond(seeds.uniform() < prob, lambda: tf.reverse(image, [1]), lambda: image)


# ----------------------------------------------------------------------------- RandAugment
# Each op takes and returns uint8 (H, W, 3) and reproduces the Pillow call timm makes.

def _lut(image, lut):
  """Applies per-channel lookup tables lut (3, 256) to uint8 pixels."""
  x = tf.cast(image, tf.int32)
  lut = tf.cast(lut, tf.int32)
  return tf.cast(tf.stack([tf.gather(lut[c], x[..., c]) for c in range(3)], -1), tf.uint8)


def _blend(degenerate, image, factor):
  """PIL Image.blend(degenerate, image, factor): float32 interpolation, clipped, truncated."""
  d = tf.cast(degenerate, tf.float32)
  out = d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d)
  return tf.cast(tf.floor(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def _grey(image):
  """PIL's RGB -> L conversion: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, int32 (H, W)."""
  x = tf.cast(image, tf.int32)
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) // 65536


def auto_contrast(image):
  """ImageOps.autocontrast: stretches each channel's [min, max] to [0, 255]."""
  x = tf.cast(image, tf.float64)
  lo = tf.reduce_min(x, axis=[0, 1])[:, None]
  hi = tf.reduce_max(x, axis=[0, 1])[:, None]
  scale = 255.0 / tf.where(hi > lo, hi - lo, 1.0)
  levels = tf.range(256, dtype=tf.float64)[None]
  lut = tf.clip_by_value(tf.floor(levels * scale - lo * scale), 0.0, 255.0)
  return _lut(image, tf.where(hi > lo, lut, levels))


def equalize(image):
  """ImageOps.equalize: per-channel histogram equalisation with Pillow's step rule."""
  luts = []
  for c in range(3):
    hist = tf.math.bincount(tf.cast(image[..., c], tf.int32), minlength=256, maxlength=256)
    nonzero = hist > 0
    last = hist[255 - tf.argmax(tf.cast(nonzero[::-1], tf.int32), output_type=tf.int32)]
    step = (tf.reduce_sum(hist) - last) // 255
    counts = tf.cumsum(hist, exclusive=True)
    lut = tf.minimum((step // 2 + counts) // tf.maximum(step, 1), 255)
    identity = tf.range(256, dtype=tf.int32)
    keep = (tf.reduce_sum(tf.cast(nonzero, tf.int32)) <= 1) | (step == 0)
    luts.append(tf.where(keep, identity, lut))
  return _lut(image, tf.stack(luts))


def invert(image):
  """ImageOps.invert."""
  return 255 - image


def posterize(image, bits):
  """ImageOps.posterize: keeps the `bits` most significant bits (timm: >= 8 = unchanged)."""
  bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  mask = tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - bits) - 1)
  return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def solarize(image, threshold):
  """ImageOps.solarize: inverts the pixels >= threshold."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image, add, threshold: int = 128):
  """timm's solarize_add: adds `add` (capped at 255) to the pixels < threshold."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, tf.minimum(x + tf.cast(add, tf.int32), 255), x),
                 tf.uint8)


def color(image, factor):
  """ImageEnhance.Color: blend with the greyscale image."""
  grey = tf.cast(_grey(image), tf.uint8)
  return _blend(tf.stack([grey] * 3, -1), image, factor)


def contrast(image, factor):
  """ImageEnhance.Contrast: blend with the mean grey level, int(mean + 0.5)."""
  mean = tf.floor(tf.reduce_mean(tf.cast(_grey(image), tf.float64)) + 0.5)
  return _blend(tf.fill(tf.shape(image), tf.cast(mean, tf.float32)), image, factor)


def brightness(image, factor):
  """ImageEnhance.Brightness: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3 [1 1 1; 1 5 1; 1 1 1] / 13,
  border pixels kept)."""
  x = tf.cast(image, tf.float32)
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.clip_by_value(tf.round(smooth), 0.0, 255.0)
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  shape = tf.shape(x)
  inner = tf.pad(tf.ones(shape[:2] - 2, tf.bool), [[1, 1], [1, 1]])
  degenerate = tf.where(inner[..., None], smooth, x)
  return _blend(degenerate, image, factor)


def _f64(value):
  """A float64 scalar (Python floats converted directly, not through float32)."""
  if isinstance(value, (tf.Tensor, tf.Variable)):
    return tf.cast(value, tf.float64)
  return tf.constant(value, tf.float64)


def _cubic_weights(t):
  """Pillow's bicubic filter for geometric transforms (cubic convolution, a = -1)."""
  t2, t3 = t * t, t * t * t
  return (-t + 2 * t2 - t3, 1 - 2 * t2 + t3, t + t2 - t3, t3 - t2)


def affine(image, matrix, fill: Sequence[int], keeps: str | None = None):
  """PIL Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill) on uint8 (H, W, 3).

  matrix = (a, b, c, d, e, f) maps output to input pixel-edge coordinates,
  x_in = a x + b y + c, y_in = d x + e y + f, sampled at pixel centres. As in Pillow,
  outputs whose centre maps outside the image get `fill`, the others the bicubic of the
  4x4 neighbours (clamped at the border), truncated to uint8.

  keeps: 'rows' when the matrix keeps every pixel in its row (d = 0, e = 1, f = 0: ShearX,
  TranslateX), 'columns' when it keeps every pixel in its column (a = 1, b = 0, c = 0:
  ShearY, TranslateY). The cubic weights across the kept direction are then (0, 1, 0, 0)
  exactly, so only the one tap they keep is gathered (a quarter of the work, or a
  twelfth); the result is the same to the bit, the other taps' terms being zeros.
  """
  if keeps is not None and keeps not in ("rows", "columns"):
    raise ValueError(f"keeps must be None, 'rows' or 'columns', got {keeps!r}")
  a, b, c, d, e, f = (_f64(v) for v in matrix)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  ys = tf.cast(tf.range(height), tf.float64)[:, None] + 0.5
  xs = tf.cast(tf.range(width), tf.float64)[None, :] + 0.5
  x_in = a * xs + b * ys + c
  y_in = d * xs + e * ys + f
  inside = ((x_in >= 0) & (x_in < tf.cast(width, tf.float64)) & (y_in >= 0)
            & (y_in < tf.cast(height, tf.float64)))
  x_in, y_in = x_in - 0.5, y_in - 0.5
  x0, y0 = tf.floor(x_in), tf.floor(y_in)
  wx = tf.stack(_cubic_weights(tf.cast(x_in - x0, tf.float32)), -1)            # (H, W, 4)
  wy = _cubic_weights(tf.cast(y_in - y0, tf.float32))
  # The horizontal weights once per channel, (H, W, 12) like the taps below: multiplying
  # equal shapes is ~1.5x faster than broadcasting (H, W, 4, 1) against (H, W, 4, 3) four
  # times, and gives the same products.
  hw = tf.shape(x_in)
  wx = tf.reshape(tf.tile(wx[..., None], [1, 1, 1, 3]), tf.concat([hw, [12]], 0))
  # Taps x0 - 1 .. x0 + 2 (likewise in y) of the image padded by 2 edge pixels per side,
  # which is Pillow's clamping for every inside output; windows of 4 horizontal taps make
  # it 4 gathers of 12 values per output pixel instead of 16 of 3.
  x0 = tf.clip_by_value(tf.cast(x0, tf.int32) + 1, 0, width)
  y0 = tf.clip_by_value(tf.cast(y0, tf.int32) + 1, 0, height)
  x = tf.cast(image, tf.float32)
  x = tf.concat([x[:1], x[:1], x, x[-1:], x[-1:]], 0)
  x = tf.concat([x[:, :1], x[:, :1], x, x[:, -1:], x[:, -1:]], 1)        # (H + 4, W + 4, 3)
  out = 0.0
  if keeps == "columns":
    # Tap x0 + 1 of each row (the pixel's own column), weighted by (0, 1, 0, 0) in the
    # general form below: each row's sum is that pixel exactly.
    pixels = tf.reshape(x, [-1, 3])
    for i in range(4):
      out += wy[i][..., None] * tf.gather(pixels, (y0 + i) * (width + 4) + x0 + 1)
  else:
    windows = tf.concat([x[:, j:j + width + 1] for j in range(4)], -1)  # (H + 4, W + 1, 12)
    windows = tf.reshape(windows, [-1, 12])
    # 'rows': row y0 + 1 alone, the pixel's own row; its row weights are (0, 1, 0, 0), and
    # 0.0 + 0 * a + 1 * b + 0 * c + 0 * d is b (up to the sign of a zero, which the
    # truncation to uint8 drops).
    for i in ((1,) if keeps == "rows" else range(4)):
      taps = tf.gather(windows, (y0 + i) * (width + 1) + x0)            # (H, W, 12)
      line = tf.reduce_sum(tf.reshape(taps * wx, tf.concat([hw, [4, 3]], 0)), 2)
      out += line if keeps == "rows" else wy[i][..., None] * line
  out = tf.where(inside[..., None], out, tf.constant(fill, tf.float32))
  return tf.cast(tf.floor(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def rotate_matrix(height, width, degrees):
  """The matrix of PIL Image.rotate(degrees) (counter-clockwise about the centre)."""
  cx, cy = _f64(width) / 2.0, _f64(height) / 2.0
  angle = -_f64(degrees) * (math.pi / 180.0)
  cos = tf.round(tf.cos(angle) * 1e15) / 1e15   # Pillow rounds to 15 decimals
  sin = tf.round(tf.sin(angle) * 1e15) / 1e15
  a, b, d, e = cos, sin, -sin, cos
  return a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy


def _signed(value, negate):
  """timm's _randomly_negate with the coin drawn outside."""
  return tf.where(negate, -value, value)


def _enhance_level(level, negate, increasing: bool):
  if increasing:  # 1 -/+ up to 0.9, at least 0.1
    return tf.maximum(1.0 + _signed(level / LEVEL_DENOM * 0.9, negate), 0.1)
  return level / LEVEL_DENOM * 1.8 + 0.1


def _int_level(level, top: float):
  return tf.cast(tf.floor(level / LEVEL_DENOM * top), tf.int32)


# timm's level-to-argument rules (auto_augment.py) with the ops they feed: pixel ops
# name -> fn(image, level, negate), geometric ops name -> fn(height, width, level, negate)
# -> affine matrix (RandAugment then runs one shared `affine`).
PIXEL_OPS: dict[str, Callable] = {
    "AutoContrast": lambda x, m, n: auto_contrast(x),
    "Equalize": lambda x, m, n: equalize(x),
    "Invert": lambda x, m, n: invert(x),
    "Posterize": lambda x, m, n: posterize(x, _int_level(m, 4.0)),
    "PosterizeIncreasing": lambda x, m, n: posterize(x, 4 - _int_level(m, 4.0)),
    "Solarize": lambda x, m, n: solarize(x, _int_level(m, 256.0)),
    "SolarizeIncreasing": lambda x, m, n: solarize(x, 256 - _int_level(m, 256.0)),
    "SolarizeAdd": lambda x, m, n: solarize_add(x, _int_level(m, 110.0)),
    "Color": lambda x, m, n: color(x, _enhance_level(m, n, False)),
    "ColorIncreasing": lambda x, m, n: color(x, _enhance_level(m, n, True)),
    "Contrast": lambda x, m, n: contrast(x, _enhance_level(m, n, False)),
    "ContrastIncreasing": lambda x, m, n: contrast(x, _enhance_level(m, n, True)),
    "Brightness": lambda x, m, n: brightness(x, _enhance_level(m, n, False)),
    "BrightnessIncreasing": lambda x, m, n: brightness(x, _enhance_level(m, n, True)),
    "Sharpness": lambda x, m, n: sharpness(x, _enhance_level(m, n, False)),
    "SharpnessIncreasing": lambda x, m, n: sharpness(x, _enhance_level(m, n, True)),
}
GEOMETRIC_OPS: dict[str, Callable] = {
    "Rotate": lambda h, w, m, n: rotate_matrix(h, w, _signed(m / LEVEL_DENOM * 30.0, n)),
    "ShearX": lambda h, w, m, n: (1.0, _signed(m / LEVEL_DENOM * 0.3, n), 0.0, 0.0, 1.0, 0.0),
    "ShearY": lambda h, w, m, n: (1.0, 0.0, 0.0, _signed(m / LEVEL_DENOM * 0.3, n), 1.0, 0.0),
    "TranslateXRel": lambda h, w, m, n: (
        1.0, 0.0, _signed(m / LEVEL_DENOM * 0.45, n) * _f64(w), 0.0, 1.0, 0.0),
    "TranslateYRel": lambda h, w, m, n: (
        1.0, 0.0, 0.0, 0.0, 1.0, _signed(m / LEVEL_DENOM * 0.45, n) * _f64(h)),
}


# The geometric ops whose matrices keep rows or columns (``affine``'s `keeps`).
AFFINE_KEEPS = {"ShearX": "rows", "TranslateXRel": "rows", "ShearY": "columns",
                "TranslateYRel": "columns"}


def apply_op(name: str, image, level, negate, fill: Sequence[int]):
  """One RandAugment op at a level (float64, 0..10) and sign, as timm applies it."""
  if name in PIXEL_OPS:
    return PIXEL_OPS[name](image, level, negate)
  shape = tf.shape(image)
  return affine(image, GEOMETRIC_OPS[name](shape[0], shape[1], level, negate), fill,
                keeps=AFFINE_KEEPS.get(name))


# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS ('inc1').
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                   "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """timm RandAugment settings: `num_layers` ops drawn with replacement, each applied with
  probability `prob` at magnitude ~ N(magnitude, magnitude_std) clipped to
  [0, magnitude_max] (magnitude_std = inf: U(0, magnitude))."""
  magnitude: float = 10.0
  num_layers: int = 2
  magnitude_std: float = 0.0
  magnitude_max: float = LEVEL_DENOM
  increasing: bool = False
  prob: float = 0.5

  @property
  def ops(self) -> tuple[str, ...]:
    return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


def parse_randaugment(spec: str) -> Optional[RandAugmentSpec]:
  """Parses timm's RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'; '' -> None (off).

  Tokens: m<magnitude> (default 10), n<ops per image> (2), mstd<std> (0; > 100 means
  uniform in [0, m]), mmax<upper clip> (10), inc<0|1> (the 'increasing' op set).
  Unlike timm, 'inc0' selects the original op set (timm's bool('0') is True).
  """
  if not spec:
    return None
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"randaugment={spec!r}: expected timm's notation 'rand-m9-mstd0.5-inc1' "
                     f"(starting with 'rand') or '' to disable")
  fields: dict = {}
  parsers = {"m": float, "n": int, "mstd": float, "mmax": float, "inc": int}
  for token in parts[1:]:
    match = re.fullmatch(r"([a-z]+)(\d.*)", token)
    if not match or match.group(1) not in parsers:
      raise ValueError(f"randaugment={spec!r}: unknown token {token!r}; expected m<float>, "
                       f"n<int>, mstd<float>, mmax<float> or inc<0|1>")
    key, value = match.groups()
    try:
      fields[key] = parsers[key](value)
    except ValueError:
      raise ValueError(f"randaugment={spec!r}: token {token!r} has a bad value {value!r}; "
                       f"expected {parsers[key].__name__}") from None
  mstd = fields.get("mstd", 0.0)
  out = RandAugmentSpec(
      magnitude=fields.get("m", LEVEL_DENOM), num_layers=fields.get("n", 2),
      magnitude_std=math.inf if mstd > 100 else mstd,
      magnitude_max=fields.get("mmax", LEVEL_DENOM), increasing=bool(fields.get("inc", 0)))
  if out.num_layers < 1 or out.magnitude < 0 or out.magnitude_std < 0 or out.magnitude_max <= 0:
    raise ValueError(f"randaugment={spec!r}: expected n >= 1, m >= 0, mstd >= 0, mmax > 0")
  return out


def rand_augment(image, spec: RandAugmentSpec, seeds: Seeds, fill: Sequence[int]):
  """timm's RandAugment on uint8 (H, W, 3): spec.num_layers ops drawn with replacement."""
  names = spec.ops
  pixel = [n for n in names if n in PIXEL_OPS]
  geometric = [n for n in names if n in GEOMETRIC_OPS]
  pixel_index = tf.constant([pixel.index(n) if n in pixel else -1 for n in names])
  geometric_index = tf.constant([geometric.index(n) if n in geometric else -1 for n in names])
  # The warps: the general one, and those for matrices that keep rows or columns.
  warps = (None, "rows", "columns")
  warp_index = tf.constant([warps.index(AFFINE_KEEPS.get(n)) for n in geometric])
  layers_key = seeds()

  def layer(i, image):
    draws = Seeds(tf.random.experimental.stateless_fold_in(layers_key, i))
    op = draws.randint(tf.constant(len(names), tf.int32))
    apply = draws.uniform() <= spec.prob
    # Levels are float64 like timm's Python floats (they become PIL's double arguments).
    if math.isinf(spec.magnitude_std):
      level = _f64(draws.uniform((), 0.0, spec.magnitude))
    elif spec.magnitude_std > 0:
      level = spec.magnitude + spec.magnitude_std * _f64(draws.normal())
    else:
      level = _f64(spec.magnitude)
    level = tf.clip_by_value(level, 0.0, float(spec.magnitude_max))
    negate = draws.uniform() > 0.5
    # The pixel ops, or nothing (last branch) ...
    p = tf.where(apply & (pixel_index[op] >= 0), pixel_index[op], len(pixel))
    branches = [functools.partial(PIXEL_OPS[n], image, level, negate) for n in pixel]
    image = tf.switch_case(p, branches + [lambda: image])
    # ... then the geometric ops: a matrix each, and the warp of its kind (or nothing).
    g = geometric_index[op]
    shape = tf.shape(image)
    matrix = tf.switch_case(tf.maximum(g, 0), [
        lambda n=n: tf.stack([_f64(v) for v in GEOMETRIC_OPS[n](shape[0], shape[1], level,
                                                                 negate)])
        for n in geometric])
    w = tf.where(apply & (g >= 0), warp_index[tf.maximum(g, 0)], len(warps))
    image = tf.switch_case(w, [lambda k=k: affine(image, tf.unstack(matrix), fill, k)
                               for k in warps] + [lambda: image])
    image.set_shape([None, None, 3])
    return i + 1, image

  # One loop body, so the graph holds each op once however many layers run.
  _, image = tf.while_loop(lambda i, _: i < spec.num_layers, layer, (tf.constant(0), image),
                           shape_invariants=(tf.TensorShape([]), image.shape))
  return image


# ----------------------------------------------------------------------------- erasing

def random_erasing(image, seeds: Seeds, prob: float, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3):
  """timm RandomErasing(mode='pixel', max_count=1) on a normalised float (H, W, C) image:
  with probability `prob`, a rectangle (area ~ U(min_area, max_area) of the image, log
  aspect ~ U(log 0.3, log 1/0.3), first of 10 attempts that fits) becomes N(0, 1) noise."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  area = tf.cast(height * width, tf.float32)
  target = seeds.uniform([10], min_area, max_area) * area
  aspect = tf.exp(seeds.uniform([10], math.log(min_aspect), math.log(1 / min_aspect)))
  hs = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  ws = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (ws < width) & (hs < height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  h, w = hs[first], ws[first]
  top = seeds.randint(height - h + 1)    # random.randint(0, H - h): both ends included
  left = seeds.randint(width - w + 1)
  noise = seeds()

  def erase():
    patch = tf.random.stateless_normal(tf.stack([h, w, shape[2]]), noise, dtype=image.dtype)
    band = tf.concat([image[top:top + h, :left], patch, image[top:top + h, left + w:]], 1)
    return tf.concat([image[:top], band, image[top + h:]], 0)

  apply = (seeds.uniform() < prob) & tf.reduce_any(fits)
  return tf.cond(apply, erase, lambda: image)


# ----------------------------------------------------------------------------- mixup

@dataclasses.dataclass(frozen=True)
class MixupSpec:
  """timm Mixup in 'batch' mode: one lambda per batch, images mixed with the batch flipped."""
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  prob: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.0


def _beta(seeds: Seeds, alpha: float):
  a = tf.random.stateless_gamma([], seeds(), alpha)
  b = tf.random.stateless_gamma([], seeds(), alpha)
  return a / tf.maximum(a + b, 1e-30)


def _reverse_groups(x, groups: int):
  """x reversed within each of `groups` equal consecutive parts along its first axis."""
  shape = tf.shape(x)
  parts = tf.reshape(x, tf.concat([[groups, -1], shape[1:]], 0))
  return tf.reshape(parts[:, ::-1], shape)


def mix_batch(images, labels, seeds: Seeds, spec: MixupSpec, num_classes: int,
              groups: int = 1):
  """Mixup/CutMix of a batch (B, H, W, C) with its reverse, within each of `groups` equal
  parts (a device's batch); each part's size must be even. One lambda (and box) for all.

  Returns (images, soft targets (B, num_classes) with label smoothing, mixed-in labels).
  CutMix corrects lambda to the box's actual area (timm's correct_lam=True).
  """
  mix_on = seeds.uniform() < spec.prob
  if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
    use_cutmix = seeds.uniform() < spec.switch_prob
    lam = tf.where(use_cutmix, _beta(seeds, spec.cutmix_alpha), _beta(seeds, spec.mixup_alpha))
  elif spec.cutmix_alpha > 0:
    use_cutmix = tf.constant(True)
    lam = _beta(seeds, spec.cutmix_alpha)
  else:
    use_cutmix = tf.constant(False)
    lam = _beta(seeds, spec.mixup_alpha)
  lam = tf.where(mix_on, lam, 1.0)
  use_cutmix = use_cutmix & mix_on
  flipped = _reverse_groups(images, groups)
  shape = tf.shape(images)
  height, width = shape[1], shape[2]
  # timm rand_bbox: cut = int(size * sqrt(1 - lam)), centre uniform, clipped to the image.
  ratio = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.cast(height, tf.float32) * ratio, tf.int32)
  cut_w = tf.cast(tf.cast(width, tf.float32) * ratio, tf.int32)
  cy, cx = seeds.randint(height), seeds.randint(width)
  y0 = tf.clip_by_value(cy - cut_h // 2, 0, height)
  y1 = tf.clip_by_value(cy + cut_h // 2, 0, height)
  x0 = tf.clip_by_value(cx - cut_w // 2, 0, width)
  x1 = tf.clip_by_value(cx + cut_w // 2, 0, width)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  box_lam = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(height * width,
                                                                        tf.float32)
  mixed = tf.cond(
      use_cutmix,
      lambda: tf.where(box[None, :, :, None], flipped, images),
      lambda: images * lam + flipped * (1.0 - lam))
  lam = tf.where(use_cutmix, box_lam, lam)
  off = spec.label_smoothing / num_classes
  on = 1.0 - spec.label_smoothing + off
  mixed_labels = _reverse_groups(labels, groups)
  y1h = tf.one_hot(labels, num_classes, on, off)
  y2h = tf.one_hot(mixed_labels, num_classes, on, off)
  return mixed, y1h * lam + y2h * (1.0 - lam), mixed_labels
