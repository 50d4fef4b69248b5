"""Where examples come from: tfds datasets, folders of class folders, scikit-learn's digits
(plain, or one per cluttered 64x64 canvas).

A source lists a split's examples as raw records, (data, label int32) pairs that are cheap
to skip: encoded image bytes (tfds), file paths (folders, read in the parallel map) or
small decoded images kept in memory (digits). For evaluation each process reads a disjoint
part of a split: tfds.even_splits for tfds, every process_count-th example for the
in-memory lists; in training, in-memory lists are ordered globally (each process holds the
whole list) and tfds splits per process (mctf_jax.data.pipeline).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import os
import re
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from mctf_jax.data import augment
from mctf_jax.data._tf import tf
from mctf_jax.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_EVAL_SPLITS = ("test", "validation")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  num_train: int
  num_eval: int


def host_indices(num_examples: int, process_index: int, process_count: int) -> np.ndarray:
  """The examples of one process: every process_count-th, starting at process_index."""
  return np.arange(process_index, num_examples, process_count)


_SPLIT = re.compile(r"^(?P<name>[\w-]+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def parse_split(split: str) -> tuple[str, Optional[str], Optional[str]]:
  """'train[:10%]' -> ('train', None, '10%'): a split name and, as tfds writes it, an optional
  part of it, [start:stop] in examples or in percent of the split ('train[-500:]',
  'train[10%:20%]')."""
  match = _SPLIT.match(split) if isinstance(split, str) else None
  if match is None:
    raise DataError(f"split {split!r}: expected a split name with an optional part of it, "
                    f"as tfds writes it: 'train', 'train[:1000]', 'train[90%:]'")
  return match["name"], match["start"], match["stop"]


def _boundary(value: Optional[str], num_examples: int) -> Optional[int]:
  if value is None:
    return None
  if value.endswith("%"):
    percent = int(value[:-1])
    if abs(percent) > 100:
      raise DataError(f"split boundary {value!r}: a percentage is between -100% and 100%")
    return int(round(percent * num_examples / 100.0))   # tfds' 'closest' rounding
  return int(value)


class InMemorySource(abc.ABC):
  """A source whose splits are lists held in memory: `arrays(split)` -> (data, labels)."""

  graph_epochs = True  # the epoch permutation can be computed inside the tf.data graph

  @abc.abstractmethod
  def split_arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(data, int32 labels) of the split called `name`: uint8 images or file paths."""

  def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(data, int32 labels) of a split, or of the part of it that split names, as tfds
    does: 'train[:1000]', 'train[90%:]' (the examples in the split's order)."""
    name, start, stop = parse_split(split)
    data, labels = self.split_arrays(name)
    if start is None and stop is None:
      return data, labels
    part = slice(_boundary(start, len(labels)), _boundary(stop, len(labels)))
    if not len(labels[part]):
      raise DataError(f"split {split!r} of {self.name} holds no example ({name!r} has "
                      f"{len(labels)})")
    return data[part], labels[part]

  def num_examples(self, split: str) -> int:
    return len(self.arrays(split)[1])

  def _host_tensors(self, split: str, process_index: int, process_count: int):
    data, labels = self.arrays(split)
    keep = host_indices(len(labels), process_index, process_count)
    return tf.constant(data[keep]), tf.constant(labels[keep], tf.int32)

  def records(self, split: str, process_index: int, process_count: int) -> tf.data.Dataset:
    """This process's (data, label) records in order."""
    return tf.data.Dataset.from_tensor_slices(
        self._host_tensors(split, process_index, process_count))

  def tensors(self, split: str):
    """The whole split as (data, int32 labels) tensors. Training reads these on every
    process: its order is global (mctf_jax.data.pipeline), each process takes its slice of
    every global batch."""
    data, labels = self.arrays(split)
    return tf.constant(data), tf.constant(labels, tf.int32)


# ----------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=1)
def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 handwritten 8x8 digits as (train_images, train_labels,
  test_images, test_labels): uint8 RGB (N, 8, 8, 3) (values 0..16 scaled to 0..255, grey
  repeated) and int32 labels, split by train_test_split(test_size=0.2, stratify=y,
  random_state=0) into 1,437 train and 360 test images."""
  from sklearn.datasets import load_digits   # here: scikit-learn's import is felt (~1 s)
  from sklearn.model_selection import train_test_split
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      images, labels, test_size=DIGITS_TEST_FRACTION, stratify=labels,
      random_state=DIGITS_SPLIT_SEED)
  for array in (x_train, x_test, y_train, y_test):
    array.setflags(write=False)
  return x_train, y_train, x_test, y_test


class DigitsSource(InMemorySource):
  """The digits, upsampled once to img_size with PIL's bicubic and kept in memory, so
  that crops and the evaluation resize act on img_size images (not on the 8x8 grid).
  Splits: 'train' (1,437) and 'test' (360; 'validation' names the same images)."""

  kind = "decoded"

  def __init__(self, img_size: int):
    self.name = "digits"
    self.num_classes = 10
    x_train, y_train, x_test, y_test = load_digits_split()
    upsample = lambda x: augment.pil_resize(
        tf.constant(x), (img_size, img_size), (img_size, img_size)).numpy()
    self._splits = {"train": (upsample(x_train), y_train), "test": (upsample(x_test), y_test)}

  def split_arrays(self, split: str):
    if split in DIGITS_EVAL_SPLITS:
      split = "test"
    if split not in self._splits:
      raise DataError(f"digits has splits 'train' (1437 images) and 'test' (360; also "
                      f"called 'validation'); got split {split!r}")
    return self._splits[split]


# ----------------------------------------------------------------------------- cluttered digits

CLUTTERED_CANVAS = 64           # generated at 64x64 (256 patch tokens at patch 4)
CLUTTERED_SEED = 0
CLUTTERED_PER_DIGIT = {"train": 4, "test": 2}   # canvases per source digit
CLUTTERED_SCALE = (2.0, 3.25)   # the digit's 8x8 grid -> 16..26 pixels
CLUTTERED_FRAGMENTS = (8, 12)   # clutter: pieces of other digits per canvas (inclusive)
CLUTTERED_FRAGMENT_SIZE = (3, 5)  # a piece: a 3x3 .. 5x5 window of an 8x8 digit
CLUTTERED_FRAGMENT_INTENSITY = (0.3, 0.65)   # dimmer than the digit (1.0)
CLUTTERED_NOISE = 0.2           # uniform pixel noise in [0, CLUTTERED_NOISE]


def _paste(canvas, patch, top: int, left: int) -> None:
  """Composites `patch` (float in [0, 1]) onto `canvas` at (top, left) by maximum,
  clipped to the canvas."""
  h, w = patch.shape
  H, W = canvas.shape
  t0, l0 = max(top, 0), max(left, 0)
  t1, l1 = min(top + h, H), min(left + w, W)
  if t1 <= t0 or l1 <= l0:
    return
  region = canvas[t0:t1, l0:l1]
  np.maximum(region, patch[t0 - top:t1 - top, l0 - left:l1 - left], out=region)


@functools.lru_cache(maxsize=256)
def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in): PIL's bicubic resize of a line of size_in pixels to size_out, as
  a matrix (PIL resizes the unit vectors), so that a resize is two small products."""
  columns = [np.asarray(Image.fromarray(np.eye(size_in, dtype=np.float32)[k:k + 1],
                                        mode="F").resize((size_out, 1), Image.BICUBIC))[0]
             for k in range(size_in)]
  return np.stack(columns, axis=1)


def _zoom(grid, size_hw) -> np.ndarray:
  """A small float grid in [0, 1] resized to size_hw (PIL's bicubic, separable), clipped to
  [0, 1]."""
  h, w = grid.shape
  out = _bicubic_matrix(h, int(size_hw[0])) @ grid @ _bicubic_matrix(w, int(size_hw[1])).T
  return np.clip(out, 0.0, 1.0)


def make_cluttered(digits, labels, per_digit: int, seed: int,
                   canvas: int = CLUTTERED_CANVAS) -> tuple[np.ndarray, np.ndarray]:
  """Cluttered canvases from 8x8 digits (uint8 (N, 8, 8, 3), int labels): each digit
  `per_digit` times, on a canvas x canvas field of noise and pieces of the other digits
  (of the same list, so that splits share no digit), at a random position and scale.

  Returns uint8 RGB (N * per_digit, canvas, canvas, 3) (grey repeated) and int32 labels,
  in order: digit i's canvases at [i * per_digit, (i + 1) * per_digit). Deterministic in
  (digits, per_digit, seed).
  """
  rng = np.random.default_rng(seed)
  grids = np.asarray(digits, np.float32)[..., 0] / 255.0       # (N, 8, 8) in [0, 1]
  n = len(grids)
  images = np.empty((n * per_digit, canvas, canvas), np.uint8)
  lo, hi = CLUTTERED_FRAGMENT_SIZE
  for index in range(n * per_digit):
    i = index // per_digit
    field = rng.uniform(0.0, CLUTTERED_NOISE, (canvas, canvas)).astype(np.float32)
    count = int(rng.integers(CLUTTERED_FRAGMENTS[0], CLUTTERED_FRAGMENTS[1] + 1))
    count = count if n > 1 else 0                                # one digit: no clutter
    others = rng.integers(max(n - 1, 1), size=count)
    others += others >= i                                        # never the digit itself
    sizes = rng.integers(lo, hi + 1, (count, 2))
    corners = rng.integers(0, 9 - sizes)                         # window inside the 8x8
    scales = rng.uniform(*CLUTTERED_SCALE, count)
    gains = rng.uniform(*CLUTTERED_FRAGMENT_INTENSITY, count)
    where = rng.uniform(size=(count, 2))
    for k in range(count):
      (fh, fw), (ft, fl) = sizes[k], corners[k]
      piece = _zoom(grids[others[k], ft:ft + fh, fl:fl + fw],
                    (round(fh * scales[k]), round(fw * scales[k]))) * gains[k]
      # Anywhere its centre falls on the canvas (pieces may be cut by the border).
      ph, pw = piece.shape
      _paste(field, piece, int(where[k, 0] * canvas) - ph // 2,
             int(where[k, 1] * canvas) - pw // 2)
    size = round(8 * rng.uniform(*CLUTTERED_SCALE))
    top, left = rng.integers(0, canvas - size + 1, 2)
    _paste(field, _zoom(grids[i], (size, size)), int(top), int(left))
    images[index] = np.round(field * 255.0).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  return images, np.repeat(np.asarray(labels, np.int32), per_digit)


@functools.lru_cache(maxsize=1)
def load_cluttered_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The cluttered digits at 64x64 as (train_images, train_labels, test_images,
  test_labels): the digits' fixed split (``load_digits_split``), each train digit on 4
  canvases (5,748 images), each test digit on 2 (720); the clutter of a split comes from
  its own digits only. Seeded: the same arrays on every machine (a second or two)."""
  x_train, y_train, x_test, y_test = load_digits_split()
  train = make_cluttered(x_train, y_train, CLUTTERED_PER_DIGIT["train"], CLUTTERED_SEED)
  test = make_cluttered(x_test, y_test, CLUTTERED_PER_DIGIT["test"], CLUTTERED_SEED + 1)
  out = (*train, *test)
  for array in out:
    array.setflags(write=False)
  return out[0], out[1], out[2], out[3]


class ClutteredDigitsSource(InMemorySource):
  """'cluttered_digits': one real digit per 64x64 canvas among pieces of other digits and
  noise (``load_cluttered_split``), resized to img_size if that is not 64. Most patch
  tokens show clutter, as most tokens of a natural image show background. Splits:
  'train' (5,748) and 'test' (720; 'validation' names the same images)."""

  kind = "decoded"

  def __init__(self, img_size: int):
    self.name = "cluttered_digits"
    self.num_classes = 10
    x_train, y_train, x_test, y_test = load_cluttered_split()
    if img_size != CLUTTERED_CANVAS:
      resize = lambda x: augment.pil_resize(
          tf.constant(x), (img_size, img_size), (img_size, img_size)).numpy()
      x_train, x_test = resize(x_train), resize(x_test)
    self._splits = {"train": (x_train, y_train), "test": (x_test, y_test)}

  def split_arrays(self, split: str):
    if split in DIGITS_EVAL_SPLITS:
      split = "test"
    if split not in self._splits:
      raise DataError(f"cluttered_digits has splits 'train' ({len(self._splits['train'][1])} "
                      f"images) and 'test' ({len(self._splits['test'][1])}; also called "
                      f"'validation'); got split {split!r}")
    return self._splits[split]


# ----------------------------------------------------------------------------- folders

@functools.lru_cache(maxsize=8)
def _list_folder(root: str, split: str, classes: tuple[str, ...]):
  """(paths, labels) of root/split/<class>/**/<image>, sorted like torchvision ImageFolder."""
  split_dir = os.path.join(root, split)
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_dir, name)
    for directory, _, files in sorted(os.walk(class_dir, followlinks=True)):
      for file in sorted(files):
        if file.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(os.path.join(directory, file))
          labels.append(label)
  paths, labels = np.array(paths, dtype=np.str_), np.array(labels, dtype=np.int32)
  paths.setflags(write=False)
  labels.setflags(write=False)
  return paths, labels


def _class_dirs(path: str) -> list[str]:
  return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


class FolderSource(InMemorySource):
  """root/<split>/<class>/**/*.jpg|png|...: the classes are the sorted subfolder names of
  the train split folder (torchvision ImageFolder's order), for every split."""

  kind = "path"

  def __init__(self, root: str, train_split: str):
    if not os.path.isdir(root):
      raise DataError(f"dataset folder {root!r} does not exist; expected "
                      f"'folder:/path/to/root' with root/<split>/<class>/<images>")
    self.name = f"folder:{root}"
    self.root = root
    self._train_split = train_split
    split_dir = self._split_dir(parse_split(train_split)[0])
    self.classes = tuple(_class_dirs(split_dir))
    if not self.classes:
      raise DataError(f"{split_dir!r} has no class folders; expected "
                      f"{split_dir}/<class>/<images>")
    self.num_classes = len(self.classes)

  def _split_dir(self, split: str) -> str:
    path = os.path.join(self.root, split)
    if not os.path.isdir(path):
      found = _class_dirs(self.root)
      raise DataError(f"dataset folder {self.root!r} has no split folder {split!r} (it has "
                      f"{found}); set config.data.train_split / eval_split to one of them")
    return path

  def split_arrays(self, split: str):
    split_dir = self._split_dir(split)
    unknown = sorted(set(_class_dirs(split_dir)) - set(self.classes))
    if unknown:
      raise DataError(f"{split_dir!r} has class folders that {self._train_split!r} lacks: "
                      f"{unknown[:10]}")
    paths, labels = _list_folder(self.root, split, self.classes)
    if not len(paths):
      raise DataError(f"{split_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
                      f"class folders")
    return paths, labels


# ----------------------------------------------------------------------------- tfds

def _not_prepared(builder, name: str) -> DataError:
  root = str(builder.data_dir_root)
  command = (f"  python -c \"import tensorflow_datasets as tfds; "
             f"tfds.builder({name!r}, data_dir={root!r}).download_and_prepare()\"")
  manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual:
    steps = (f"It needs a manual download: put the files below in {root}/downloads/manual/, "
             f"then run\n{command}\ntfds' instructions:\n"
             + "\n".join("  " + line.strip() for line in manual.strip().splitlines()))
  else:
    steps = f"Prepare it once (this downloads it):\n{command}"
  return DataError(f"tfds dataset {name!r} is not prepared in data_dir={root} (there is no "
                   f"{builder.data_path}). {steps}\nThen run with "
                   f"--config.data.data_dir={root}.")


class TfdsSource:
  """A prepared tfds image classification dataset, read with its images still encoded."""

  kind = "encoded"
  graph_epochs = False  # tfds decides its file order in Python, so one pipeline per epoch

  def __init__(self, name: str, data_dir: Optional[str], shuffle_buffer: int):
    import tensorflow_datasets as tfds   # here: only tfds sources pay its import
    self._tfds = tfds
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise DataError(f"config.data.dataset={name!r} is not a tfds dataset; expected a tfds "
                      f"name (e.g. 'imagenet2012'), 'folder:/path/to/root', 'digits' or "
                      f"'cluttered_digits'") from None
    if not builder.is_prepared():
      raise _not_prepared(builder, name)
    self.name = name
    self._builder = builder
    self._shuffle_buffer = shuffle_buffer
    keys = builder.info.supervised_keys
    self._image_key, self._label_key = (
        keys if isinstance(keys, tuple) and len(keys) == 2 and all(
            isinstance(k, str) for k in keys) else ("image", "label"))
    features = builder.info.features
    if (self._image_key not in features or self._label_key not in features
        or not isinstance(features[self._image_key], tfds.features.Image)
        or not hasattr(features[self._label_key], "num_classes")):
      raise DataError(f"tfds dataset {name!r} is not image classification: expected an Image "
                      f"feature {self._image_key!r} and a ClassLabel {self._label_key!r}, "
                      f"got {features}")
    self.num_classes = features[self._label_key].num_classes

  def num_examples(self, split: str) -> int:
    try:
      return self._builder.info.splits[split].num_examples
    except (KeyError, ValueError) as error:
      raise DataError(f"tfds dataset {self.name!r} has no split {split!r} (splits: "
                      f"{list(self._builder.info.splits)}): {error}") from None

  def records(self, split: str, process_index: int, process_count: int,
              shuffle_seed: Optional[int] = None) -> tf.data.Dataset:
    """This process's (encoded image, label) records; shuffled by shuffle_seed (file
    order, then a buffer of config.data.shuffle_buffer records) when given."""
    self.num_examples(split)
    tfds = self._tfds
    part = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    options = tf.data.Options()
    options.deterministic = True
    shuffle = shuffle_seed is not None
    ds = self._builder.as_dataset(
        split=part, shuffle_files=shuffle,
        decoders={self._image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, options=options))
    ds = ds.map(lambda ex: (ex[self._image_key], tf.cast(ex[self._label_key], tf.int32)))
    if shuffle:
      ds = ds.shuffle(self._shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return ds


# ----------------------------------------------------------------------------- factory

@functools.lru_cache(maxsize=8)
def get_source(dataset: str, data_dir: Optional[str], img_size: int, train_split: str,
               shuffle_buffer: int):
  """The source named by config.data.dataset (cached: folder listings are read once)."""
  if dataset == "digits":
    return DigitsSource(img_size)
  if dataset == "cluttered_digits":
    return ClutteredDigitsSource(img_size)
  if dataset.startswith("folder:"):
    return FolderSource(os.path.expanduser(dataset[len("folder:"):]), train_split)
  return TfdsSource(dataset, data_dir, shuffle_buffer)
