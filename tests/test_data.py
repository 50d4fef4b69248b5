"""The input pipeline: sources, per-process sharding, resumption, and every transform
against the PyTorch-side reference (Pillow / timm / torchvision semantics)."""

import hashlib
import io
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageEnhance, ImageOps

from configs import default
from mctf_jax import data
from mctf_jax.data import augment, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEAN = np.array(default.get_config().data.mean, np.float32)
STD = np.array(default.get_config().data.std, np.float32)
FILL = (124, 116, 104)


def make_config(dataset="digits", img_size=32, **changes):
  config = default.get_config()
  config.model.img_size = img_size
  config.data.dataset = dataset
  config.data.eval_split = "test" if dataset == "digits" else "val"
  config.data.update(changes)
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def digest(array) -> str:
  return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def normalised(images_uint8):
  return (images_uint8.astype(np.float32) / 255 - MEAN) / STD


def photo(name):
  image = getattr(skimage.data, name)()
  return np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]


# ----------------------------------------------------------------------------- digits

def test_digits_split_is_fixed_and_stratified():
  x_train, y_train, x_test, y_test = data.load_digits_split()
  assert x_train.shape == (1437, 8, 8, 3) and x_test.shape == (360, 8, 8, 3)
  assert x_train.dtype == np.uint8 and y_train.dtype == np.int32
  assert x_train.max() == 255 and (x_train[..., 0] == x_train[..., 2]).all()
  counts_train, counts_test = np.bincount(y_train), np.bincount(y_test)
  # Stratified: every class has ~20% of its images in the test split.
  assert np.all(np.abs(counts_test - 0.2 * (counts_train + counts_test)) <= 1)
  again = sources.load_digits_split.__wrapped__()
  for a, b in zip((x_train, y_train, x_test, y_test), again):
    np.testing.assert_array_equal(a, b)
  info = data.dataset_info(make_config())
  assert info == data.DatasetInfo("digits", 10, 1437, 360)
  with pytest.raises(data.DataError, match="digits has splits"):
    data.dataset_info(make_config(eval_split="val2"))


def test_train_batches_shapes_dtypes_and_ranges():
  pipe = data.TrainPipeline(make_config(reprob=0.0), 64, seed=0)
  assert pipe.steps_per_epoch == 1437 // 64
  batch = next(pipe.iterate())
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
  low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
  assert np.all(batch["image"] >= low - 1e-5) and np.all(batch["image"] <= high + 1e-5)
  assert 0 <= batch["label"].min() and batch["label"].max() < 10
  other = next(data.TrainPipeline(make_config(reprob=0.0), 64, seed=1).iterate())
  assert not np.array_equal(other["label"], batch["label"])
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    data.TrainPipeline(make_config(), 64, seed=0, process_count=3)


def test_switches_turn_augmentation_off_and_flip_flips():
  off = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), randaugment="", reprob=0.0,
             repeated_aug=1)
  originals = sources.DigitsSource(32).arrays("train")[0]
  known = {digest(normalised(x)): i for i, x in enumerate(originals)}
  known_flipped = {digest(normalised(x[:, ::-1])) for x in originals}
  pipe = data.TrainPipeline(make_config(hflip=False, **off), 128, seed=0)
  seen = []
  for batch in take(pipe.iterate(0), pipe.steps_per_epoch):
    seen += [known[digest(image)] for image in batch["image"]]   # all unchanged
  assert len(seen) == len(set(seen)) == 1437 // 128 * 128        # each image once
  pipe = data.TrainPipeline(make_config(hflip=True, **off), 128, seed=0)
  flipped = total = 0
  for batch in take(pipe.iterate(0), 2 * pipe.steps_per_epoch):
    for image in batch["image"]:
      key = digest(image)
      assert key in known or key in known_flipped
      flipped += key not in known
      total += 1
  assert abs(flipped / total - 0.5) < 0.05


# ----------------------------------------------------------------------------- cluttered digits

def test_cluttered_digits_split_is_fixed_and_built_from_the_digits_split():
  x_train, y_train, x_test, y_test = sources.load_cluttered_split()
  assert x_train.shape == (5748, 64, 64, 3) and x_test.shape == (720, 64, 64, 3)
  assert x_train.dtype == np.uint8 and y_test.dtype == np.int32
  assert (x_test[..., 0] == x_test[..., 2]).all() and not x_test.flags.writeable
  # Each digit of the digits' split on 4 (train) or 2 (test) canvases, labels kept.
  digits = data.load_digits_split()
  np.testing.assert_array_equal(y_train, np.repeat(digits[1], 4))
  np.testing.assert_array_equal(y_test, np.repeat(digits[3], 2))
  # The same arrays on every machine: the fixed seed (a regenerated test split, hashed).
  again, labels = sources.make_cluttered(digits[2], digits[3], 2, sources.CLUTTERED_SEED + 1)
  np.testing.assert_array_equal(again, x_test)
  np.testing.assert_array_equal(labels, y_test)
  assert digest(x_test) == digest(again)
  # Clutter: most 4x4 patches hold something besides the noise floor (255 * 0.25), but the
  # digit, at most 26 pixels wide, covers at most 49 of the 256.
  patches = x_test[..., 0].reshape(720, 16, 4, 16, 4).max(axis=(2, 4))
  busy = (patches > 0.3 * 255).mean(axis=(1, 2)) * 256
  assert 49 < np.median(busy) < 256, np.median(busy)


def test_make_cluttered_is_seeded_and_places_the_digit():
  x, y = data.load_digits_split()[:2]
  a, labels = sources.make_cluttered(x[:6], y[:6], 2, seed=5)
  b, _ = sources.make_cluttered(x[:6], y[:6], 2, seed=5)
  c, _ = sources.make_cluttered(x[:6], y[:6], 2, seed=6)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and a.shape == (12, 64, 64, 3)
  np.testing.assert_array_equal(labels, np.repeat(y[:6], 2))
  # Without the other digits' pieces (one digit: nothing else to cut from), the canvas is the
  # noise floor plus the digit: its bright pixels span 16..26 pixels.
  alone, _ = sources.make_cluttered(x[:1], y[:1], 8, seed=0)
  for canvas in alone[..., 0]:
    rows, cols = np.nonzero(canvas > 0.5 * 255)
    assert 6 <= np.ptp(rows) + 1 <= 26 and 6 <= np.ptp(cols) + 1 <= 26


def test_cluttered_digits_through_the_pipeline():
  config = make_config("cluttered_digits", img_size=64, eval_split="test", randaugment="",
                       reprob=0.0, crop_pct=1.0)
  assert data.dataset_info(config) == data.DatasetInfo("cluttered_digits", 10, 5748, 720)
  with pytest.raises(data.DataError, match="cluttered_digits has splits"):
    data.dataset_info(make_config("cluttered_digits", eval_split="val"))
  batch = next(data.TrainPipeline(config, 32, seed=0).iterate())
  assert batch["image"].shape == (32, 64, 64, 3) and batch["label"].shape == (32,)
  _, _, x_test, y_test = sources.load_cluttered_split()
  first = next(data.eval_batches(config, 120))
  np.testing.assert_array_equal(first["label"], y_test[:120])
  # The evaluation resize of a 64x64 canvas to 64x64 is the identity (within a grey level).
  np.testing.assert_allclose(first["image"], normalised(x_test[:120]), atol=1.01 / 255 / 0.229)


def test_cluttered_digits_at_another_size_are_resized_once(monkeypatch):
  x_train, y_train, x_test, y_test = sources.load_cluttered_split()
  monkeypatch.setattr(sources, "load_cluttered_split",
                      lambda: (x_train[:6], y_train[:6], x_test[:4], y_test[:4]))
  small = sources.ClutteredDigitsSource(32)
  images, labels = small.arrays("validation")
  assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, y_test[:4])
  expected = augment.pil_resize(tf.constant(x_test[:4]), (32, 32), (32, 32)).numpy()
  np.testing.assert_array_equal(images, expected)


def test_parts_of_splits_as_tfds_writes_them(folder):
  """'train[:100]', 'train[90%:]', 'test[-60:]': parts of in-memory splits, in the split's
  order, percentages rounded as tfds rounds them; the folder source takes its classes from
  the whole train folder."""
  digits = sources.DigitsSource(8)
  images, labels = digits.arrays("train")
  for split, part in (("train[:100]", slice(0, 100)), ("train[1000:]", slice(1000, None)),
                      ("train[-37:]", slice(-37, None)), ("train[10%:20%]", slice(144, 287)),
                      ("train[:90%]", slice(None, 1293)), ("train[90%:]", slice(1293, None))):
    some_images, some_labels = digits.arrays(split)
    np.testing.assert_array_equal(some_images, images[part])
    np.testing.assert_array_equal(some_labels, labels[part])
  assert digits.num_examples("validation[:50%]") == 180
  config = make_config("digits", train_split="train[:300]", eval_split="train[-100:]")
  assert data.dataset_info(config) == data.DatasetInfo("digits", 10, 300, 100)
  first = next(data.eval_batches(config, 100))
  np.testing.assert_array_equal(first["label"], labels[-100:])
  source = sources.get_source(f"folder:{folder}", None, 32, "train[:12]", 16)
  assert len(source.classes) == 24 and source.num_examples("train[:12]") == 12
  for split, message in (("train[5:5]", "holds no example"), ("train[:150%]", "between"),
                         ("train[:1e3]", "as tfds writes it"), ("train[3]", "as tfds writes it"),
                         ("tests[:10]", "got split 'tests'")):
    with pytest.raises(data.DataError, match=re.escape(message)):
      digits.arrays(split)


# ----------------------------------------------------------------------------- sharding

def _eval_examples(config, batch, process_count):
  """(hash, label) of every unmasked eval example over all processes, and batch counts."""
  seen, counts = [], []
  for p in range(process_count):
    batches = list(data.eval_batches(config, batch, p, process_count))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (batch // process_count, 32, 32, 3)
      mask = b["mask"]
      assert np.all(b["image"][~mask] == 0)
      seen += [(digest(x), int(y)) for x, y in zip(b["image"][mask], b["label"][mask])]
    masks = np.concatenate([b["mask"] for b in batches])
    assert not np.any(np.diff(masks.astype(int)) > 0)   # padding only at the end
  return sorted(seen), counts


def test_eval_shards_cover_every_example_once_with_padding():
  config = make_config()
  whole, counts = _eval_examples(config, 100, 1)   # 360 = 3 x 100 + 60 padded
  assert len(whole) == 360 and counts == [4]
  halves, counts = _eval_examples(config, 100, 2)  # 180 per process = 3 x 50 + 30
  assert halves == whole and counts == [4, 4]
  thirds, counts = _eval_examples(config, 42, 3)   # 120 per process = 8 x 14 + 8
  assert thirds == whole and counts == [9, 9, 9]
  eleven, counts = _eval_examples(config, 11 * 7, 11)   # 360 / 11: parts of 33 and 32
  assert eleven == whole and counts == [5] * 11


# ----------------------------------------------------------------------------- folders

CLASSES = [f"{name}{i}" for i, name in enumerate(("b", "A", "c", "a", "B", "d") * 4)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """root/train/<class>/x.png: one noise image per class (the label names the image);
  root/val/<class>/*.jpg: 30 JPEG crops of a photo."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for i, name in enumerate(reversed(CLASSES)):
    os.makedirs(root / "train" / name / "nested")
    size = (20, 28) if i % 2 else (30, 22)
    Image.fromarray(rng.integers(0, 256, size + (3,), np.uint8)).save(
        root / "train" / name / "nested" / "x.png")
    (root / "train" / name / "notes.txt").write_text("not an image")
  chelsea = photo("chelsea")
  for i in range(30):
    os.makedirs(root / "val" / CLASSES[i % 24], exist_ok=True)
    crop = chelsea[i * 5:i * 5 + 120 + i, i * 7:i * 7 + 160 - i]
    Image.fromarray(crop).save(root / "val" / CLASSES[i % 24] / f"{i}.jpg", quality=90)
  return str(root)


def test_folder_classes_splits_and_errors(folder, tmp_path):
  config = make_config(f"folder:{folder}")
  info = data.dataset_info(config)
  assert info == data.DatasetInfo(f"folder:{folder}", 24, 24, 30)
  source = sources.get_source(f"folder:{folder}", None, 32, "train", 16)
  assert list(source.classes) == sorted(CLASSES)            # ImageFolder's order
  paths, labels = source.arrays("train")
  assert [os.path.basename(os.path.dirname(os.path.dirname(p))) for p in paths] == sorted(CLASSES)
  np.testing.assert_array_equal(labels, np.arange(24))
  with pytest.raises(data.DataError, match="no split folder 'validation'.*'train', 'val'"):
    data.dataset_info(make_config(f"folder:{folder}", eval_split="validation"))
  os.makedirs(tmp_path / "train" / "empty_class")
  with pytest.raises(data.DataError, match="holds no images"):
    data.dataset_info(make_config(f"folder:{tmp_path}", eval_split="train"))
  with pytest.raises(data.DataError, match="does not exist"):
    data.dataset_info(make_config(f"folder:{tmp_path}/nothing"))


def test_folder_jpeg_eval_matches_pil(folder):
  config = make_config(f"folder:{folder}", img_size=64, crop_pct=0.875)
  batches = list(data.eval_batches(config, 16))
  images = np.concatenate([b["image"] for b in batches])[:30]
  labels = np.concatenate([b["label"] for b in batches])[:30]
  paths, expected = sources.get_source(f"folder:{folder}", None, 64, "train", 16).arrays("val")
  np.testing.assert_array_equal(labels, expected)
  for image, path in zip(images, paths):
    reference = pil_eval(np.asarray(Image.open(path).convert("RGB")), 64, 0.875)
    assert np.abs(image * STD + MEAN - reference).max() <= 1.01 / 255


def test_the_global_batches_are_the_same_on_any_number_of_processes(folder):
  """One process and four (8 devices in all) yield the same global batches, augmentation,
  repeats and mixup pairs (one per device) included, resuming at step 1 and crossing an
  epoch boundary: a run resumes bit-identically on another topology."""
  config = make_config(f"folder:{folder}", mixup=0.8, cutmix=1.0)   # everything on, RA x3
  runs = {}
  for count in (1, 4):
    pipes = [data.TrainPipeline(config, 16, seed=3, process_index=p, process_count=count,
                                label_smoothing=0.1, mix_groups=8 // count)
             for p in range(count)]
    assert pipes[0].steps_per_epoch == 1
    runs[count] = [{k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
                   for batches in zip(*[take(pipe.iterate(1), 2) for pipe in pipes])]
  for one, four in zip(runs[1], runs[4]):
    for key in one:
      np.testing.assert_array_equal(one[key], four[key], err_msg=key)
  batch = runs[1][0]
  assert len({digest(x) for x in batch["image"]}) == 16
  np.testing.assert_array_equal(batch["mixed_label"].reshape(8, 2),
                                batch["label"].reshape(8, 2)[:, ::-1])


def test_resumption_is_exact_across_an_epoch_boundary(folder):
  config = make_config(f"folder:{folder}", mixup=0.8, cutmix=1.0)   # everything on, RA x3
  pipe = data.TrainPipeline(config, 8, seed=3, label_smoothing=0.1)
  assert pipe.steps_per_epoch == 3
  full = take(pipe.iterate(0), 5)
  resumed = take(pipe.iterate(2), 3)           # steps 2..4 cross into epoch 1 at 3
  for a, b in zip(full[2:], resumed):
    assert a.keys() == b.keys() == {"image", "label", "targets", "mixed_label"}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  again = take(data.TrainPipeline(config, 8, seed=3, label_smoothing=0.1).iterate(0), 2)
  np.testing.assert_array_equal(again[1]["image"], full[1]["image"])


def test_folder_hosts_are_disjoint_and_repeats_differ(folder):
  config = make_config(f"folder:{folder}", repeated_aug=1, randaugment="")
  parts = []
  for p in range(2):
    pipe = data.TrainPipeline(config, 8, seed=0, process_index=p, process_count=2)
    assert pipe.steps_per_epoch == 3
    epoch = take(pipe.iterate(0), 3)
    parts.append(np.concatenate([b["label"] for b in epoch]))
  assert sorted(np.concatenate(parts)) == list(range(24))   # the whole split, once
  config = make_config(f"folder:{folder}", repeated_aug=3)
  pipe = data.TrainPipeline(config, 8, seed=0)
  batches = take(pipe.iterate(0), 6)
  for epoch in (batches[:3], batches[3:]):
    labels = np.concatenate([b["label"] for b in epoch])
    images = np.concatenate([b["image"] for b in epoch])
    assert sorted(np.bincount(labels, minlength=24)) == [0] * 16 + [3] * 8
    for label in set(labels):
      copies = images[labels == label]
      assert len({digest(x) for x in copies}) == 3            # augmented independently
  firsts = [set(np.concatenate([b["label"] for b in e])) for e in (batches[:3], batches[3:])]
  assert firsts[0] != firsts[1]


# The outputs of a fixed seed, as SHA-1 of the exact bytes: any change to the transforms
# (a faster op, another threading setting) must leave them bit-identical. They are
# TensorFlow's own arithmetic (2.21 on x86-64); on another TensorFlow, check the batches
# against the previous code's and update the digests.
FINGERPRINTS = {
    "train": [
        "07bdd0b8f1fbf6f30577a4123f8c4ae05eb83c27a4907cb4",
        "ae2eb1c7c1453b8758c3664cc56dafe21d6d6b3fb1c2e482",
        "3d95b063679dca6d52536922c972ec67da4b6f5016b0bb4c",
        "3c8280cc2cd64cbef8363b522b6695123af34cf3de10c288",
        "5f9702cfe2c583b90de25ff705d00a8366dda26469123a19",
        "14593ca4e7cc1c0e17a1012b679f88f41f09fccc301f7221",
    ],
    "eval": [
        "0d83e2bbf7d43e92d620d468ef79f0666f0d93b1",
        "17953100f6a504c88a931904dd4e61d4da0fc2f4",
    ],
    "randaugment": "721662a45679126d0cf5ed779b42d29f80afb56d",
}


def _fingerprints(folder):
  config = make_config(f"folder:{folder}", img_size=48, train_split="val")   # 30 JPEGs
  pipe = data.TrainPipeline(config, 8, seed=11)
  train = [digest(b["image"]) + digest(b["label"])[:8] for b in take(pipe.iterate(0), 6)]
  evals = [digest(b["image"]) for b in data.eval_batches(config, 16)]
  spec = data.parse_randaugment("rand-m9-mstd0.5-inc1-n3")
  image = tf.constant(np.asarray(Image.fromarray(photo("coffee")).resize((40, 30))))
  ds = tf.data.Dataset.range(300).map(lambda i: augment.rand_augment(
      image, spec, augment.Seeds(tf.stack([i, 3 * i + 1])), FILL))
  randaugment = digest(np.stack(list(ds.as_numpy_iterator())))
  return {"train": train, "eval": evals, "randaugment": randaugment}


def test_fixed_seed_batches_are_bit_identical_to_the_fingerprints(folder):
  """The DeiT recipe (crop, flip, RandAugment m9 x2, erasing, repeated augmentation) on
  JPEGs, the evaluation batches, and RandAugment alone at 3 layers on 300 seeds (every op
  many times)."""
  assert _fingerprints(folder) == FINGERPRINTS


# ----------------------------------------------------------------------------- tfds

class MctfTinyImages(tfds.core.GeneratorBasedBuilder):
  """A small prepared tfds dataset of JPEG noise images (real TFRecord files)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, supervised_keys=("image", "label"),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=5)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(40, 0), "validation": self._generate_examples(13, 1)}

  def _generate_examples(self, count, seed):
    rng = np.random.default_rng(seed)
    for i in range(count):
      shape = (int(rng.integers(24, 48)), int(rng.integers(24, 48)), 3)
      yield i, {"image": rng.integers(0, 256, shape, np.uint8), "label": i % 5}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  MctfTinyImages(data_dir=data_dir).download_and_prepare(
      download_dir=os.path.join(data_dir, "downloads"))
  return data_dir


def test_tfds_source_shards_and_resumes(tiny_tfds):
  config = make_config("mctf_tiny_images", data_dir=tiny_tfds, eval_split="validation",
                       repeated_aug=1, randaugment="", shuffle_buffer=8)
  assert data.dataset_info(config) == data.DatasetInfo("mctf_tiny_images", 5, 40, 13)
  whole, counts = _eval_examples(config, 6, 1)
  assert len(whole) == 13 and counts == [3]
  halves, counts = _eval_examples(config, 6, 2)     # tfds.even_splits: 7 + 6
  assert halves == whole and counts == [3, 3]
  pipe = data.TrainPipeline(config, 8, seed=1)
  assert pipe.steps_per_epoch == 5
  full = take(pipe.iterate(0), 7)
  for a, b in zip(full[4:], take(pipe.iterate(4), 3)):   # epoch 0 ends at step 5
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  labels = np.concatenate([b["label"] for b in full[:5]])
  np.testing.assert_array_equal(np.bincount(labels), [8] * 5)   # each example once


def test_mock_imagenet2012(tmp_path):
  """imagenet2012 through tfds.testing.mock_data, with its real features and label names."""
  builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
  info = builder.info
  template = lambda split: tfds.core.ShardedFileTemplate(
      data_dir=builder.data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      dataset_name="imagenet2012", split=split, filetype_suffix="tfrecord")
  info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=name, shard_lengths=[24], num_bytes=0,
                          filename_template=template(name)) for name in ("train", "validation")]))
  os.makedirs(builder.data_dir)
  info.write_to_directory(builder.data_dir)
  config = make_config("imagenet2012", img_size=48, data_dir=str(tmp_path),
                       eval_split="validation", randaugment="", mixup=0.8, cutmix=1.0)
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(tmp_path)):
    assert data.dataset_info(config) == data.DatasetInfo("imagenet2012", 1000, 24, 24)
    batch = next(data.TrainPipeline(config, 8, seed=0, label_smoothing=0.1).iterate())
    assert batch["image"].shape == (8, 48, 48, 3) and batch["targets"].shape == (8, 1000)
    evals = list(data.eval_batches(config, 16))
    assert [b["mask"].sum() for b in evals] == [16, 8]


def test_unprepared_or_unknown_tfds_dataset_says_what_to_do(tmp_path):
  config = make_config("imagenet2012", data_dir=str(tmp_path))
  with pytest.raises(data.DataError) as error:
    data.dataset_info(config)
  message = str(error.value)
  for text in ("not prepared", str(tmp_path), "ILSVRC2012_img_train.tar",
               "ILSVRC2012_img_val.tar", f"{tmp_path}/downloads/manual",
               "download_and_prepare()", "tfds.builder('imagenet2012'"):
    assert text in message
  assert error.value.__cause__ is None and error.value.__context__ is None
  with pytest.raises(data.DataError, match="'no_such_dataset' is not a tfds dataset"):
    data.dataset_info(make_config("no_such_dataset", data_dir=str(tmp_path)))


# ----------------------------------------------------------------------------- evaluation

def pil_eval(image, size, crop_pct):
  """torchvision Resize(int(size / crop_pct), BICUBIC) + CenterCrop(size) on PIL, in [0, 1]."""
  pil = Image.fromarray(image)
  w, h = pil.size
  short = int(size / crop_pct)
  new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
  pil = pil.resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return np.asarray(pil.crop((left, top, left + size, top + size)), np.float32) / 255


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket", "camera",
                                  "hubble_deep_field"])
@pytest.mark.parametrize("size,crop_pct", [(224, 0.875), (96, 1.0), (37, 0.9)])
def test_eval_transform_matches_torchvision_on_photos(name, size, crop_pct):
  image = photo(name)
  ours = data.eval_transform(image, size, crop_pct, MEAN, STD)
  assert ours.shape == (size, size, 3) and ours.dtype == np.float32
  diff = np.abs(ours * STD + MEAN - pil_eval(image, size, crop_pct))
  assert diff.mean() < 0.05 / 255      # PIL's two passes and roundings, reproduced
  assert diff.max() < 1.01 / 255


def test_decoding_matches_pil():
  buffer = io.BytesIO()
  Image.fromarray(photo("coffee")).save(buffer, format="JPEG", quality=85)
  encoded = buffer.getvalue()
  reference = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
  np.testing.assert_array_equal(augment.decode_image(encoded).numpy(), reference)
  crop = augment.decode_crop(encoded, 33, 50, 101, 211).numpy()
  assert np.abs(crop.astype(int) - reference[33:134, 50:261]).max() <= 1
  grey = io.BytesIO()
  Image.fromarray(photo("camera")[..., 0]).save(grey, format="PNG")
  decoded = augment.decode_image(grey.getvalue()).numpy()
  np.testing.assert_array_equal(decoded, photo("camera"))


def test_random_resized_crop_follows_torchvision():
  crops = tf.data.Dataset.range(400).map(lambda i: tf.stack(augment.sample_crop(
      augment.Seeds(tf.stack([i, i])), 300, 200, (0.08, 1.0), (3 / 4, 4 / 3))))
  crops = np.stack(list(crops.as_numpy_iterator()))
  top, left, h, w = crops.T
  assert np.all((top >= 0) & (left >= 0) & (top + h <= 300) & (left + w <= 200))
  area = h * w / (300 * 200)
  assert area.min() > 0.07 and area.max() <= 1.0 and area.mean() > 0.3
  assert np.all((w / h > 0.7) & (w / h < 1.4))
  # A strip no crop in range fits: torchvision's fallback, the centre clamped to 4/3.
  top, left, h, w = (int(v) for v in augment.sample_crop(
      augment.Seeds([0, 0]), 10, 200, (0.9, 1.0), (3 / 4, 4 / 3)))
  assert (top, left, h, w) == (0, 93, 10, 13)


# ----------------------------------------------------------------------------- RandAugment

def test_randaugment_parsing():
  spec = data.parse_randaugment("rand-m9-mstd0.5-inc1")
  assert spec == data.RandAugmentSpec(magnitude=9, num_layers=2, magnitude_std=0.5,
                                      increasing=True)
  assert spec.ops == augment.RAND_INCREASING_TRANSFORMS and len(spec.ops) == 15
  spec = data.parse_randaugment("rand-n3-m7-mmax15-mstd101")
  assert (spec.num_layers, spec.magnitude, spec.magnitude_max) == (3, 7, 15)
  assert math.isinf(spec.magnitude_std) and spec.ops == augment.RAND_TRANSFORMS
  assert data.parse_randaugment("") is None
  for bad, message in [("rand-m9-x3", "unknown token 'x3'"), ("augmix-m5", "starting with"),
                       ("rand-m", "unknown token 'm'"), ("rand-n0", "n >= 1"),
                       ("rand-mstd0.5.1", "bad value")]:
    with pytest.raises(ValueError, match=message):
      data.parse_randaugment(bad)
  with pytest.raises(data.DataError, match="config.data.randaugment"):
    data.TrainPipeline(make_config(randaugment="rand-q1"), 8, seed=0)


def _timm_reference(name, image, level, negate):
  """timm 0.6 auto_augment: level -> argument, then the Pillow call (bicubic, fill)."""
  sign = -1 if negate else 1
  pil = Image.fromarray(image)
  kw = dict(resample=Image.BICUBIC, fillcolor=FILL)
  affine = lambda m: pil.transform(pil.size, Image.AFFINE, m, **kw)
  enhance = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
             "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
  base = name.replace("Increasing", "")
  if base in enhance:
    factor = (max(0.1, 1.0 + sign * level / 10 * 0.9) if name.endswith("Increasing")
              else level / 10 * 1.8 + 0.1)
    out = enhance[base](pil).enhance(factor)
  elif name == "Posterize":
    out = ImageOps.posterize(pil, int(level / 10 * 4))
  elif name == "PosterizeIncreasing":
    out = ImageOps.posterize(pil, 4 - int(level / 10 * 4))
  elif name == "Solarize":
    out = ImageOps.solarize(pil, int(level / 10 * 256))
  elif name == "SolarizeIncreasing":
    out = ImageOps.solarize(pil, 256 - int(level / 10 * 256))
  elif name == "SolarizeAdd":
    add = int(level / 10 * 110)
    out = pil.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
  else:
    out = {
        "AutoContrast": lambda: ImageOps.autocontrast(pil),
        "Equalize": lambda: ImageOps.equalize(pil),
        "Invert": lambda: ImageOps.invert(pil),
        "Rotate": lambda: pil.rotate(sign * level / 10 * 30, **kw),
        "ShearX": lambda: affine((1, sign * level / 10 * 0.3, 0, 0, 1, 0)),
        "ShearY": lambda: affine((1, 0, 0, sign * level / 10 * 0.3, 1, 0)),
        "TranslateXRel": lambda: affine((1, 0, sign * level / 10 * 0.45 * pil.size[0], 0, 1, 0)),
        "TranslateYRel": lambda: affine((1, 0, 0, 0, 1, sign * level / 10 * 0.45 * pil.size[1])),
    }[name]()
  return np.asarray(out)


@pytest.mark.parametrize("name", sorted({**augment.PIXEL_OPS, **augment.GEOMETRIC_OPS}))
def test_every_randaugment_op_matches_timm_and_pillow(name):
  image = np.asarray(Image.fromarray(photo("chelsea")).resize((72, 48), Image.BICUBIC))
  for level, negate in ((9.0, False), (5.3, True)):
    ours = augment.apply_op(name, tf.constant(image), tf.constant(level, tf.float64),
                            tf.constant(negate), FILL)
    assert ours.dtype == tf.uint8 and ours.shape == image.shape
    diff = np.abs(ours.numpy().astype(int) - _timm_reference(name, image, level, negate))
    assert diff.max() <= 1 and diff.mean() < 0.01, (level, negate)


def test_warps_that_keep_rows_or_columns_equal_the_general_warp_to_the_bit():
  rng = np.random.default_rng(0)
  for height, width in ((48, 72), (31, 17)):
    image = tf.constant(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    for name, keeps in augment.AFFINE_KEEPS.items():
      for level, negate in ((9.0, False), (3.7, True), (10.0, True)):
        matrix = augment.GEOMETRIC_OPS[name](height, width, tf.constant(level, tf.float64),
                                             tf.constant(negate))
        fast = augment.affine(image, matrix, FILL, keeps=keeps).numpy()
        np.testing.assert_array_equal(fast, augment.affine(image, matrix, FILL).numpy(),
                                      err_msg=f"{name} {level} {negate}")
  with pytest.raises(ValueError, match="keeps must be None, 'rows' or 'columns', got 'x'"):
    augment.affine(image, (1, 0, 0, 0, 1, 0), FILL, keeps="x")


def test_rand_augment_runs_every_op_at_random_magnitudes():
  spec = data.parse_randaugment("rand-m9-mstd0.5-inc1-n3")
  image = tf.constant(np.asarray(Image.fromarray(photo("coffee")).resize((40, 40))))
  ds = tf.data.Dataset.range(64).map(lambda i: augment.rand_augment(
      image, spec, augment.Seeds(tf.stack([i, 7 * i])), FILL))
  outputs = list(ds.as_numpy_iterator())
  assert all(o.shape == (40, 40, 3) and o.dtype == np.uint8 for o in outputs)
  changed = np.mean([not np.array_equal(o, image.numpy()) for o in outputs])
  assert 0.7 < changed <= 1.0     # 3 ops at p = 0.5 each: 7/8 of images change


# ----------------------------------------------------------------------------- erasing, mixup

def test_random_erasing_rate_and_rectangles():
  ds = tf.data.Dataset.range(1000).map(lambda i: augment.random_erasing(
      tf.zeros([32, 40, 3]), augment.Seeds(tf.stack([i, i + 1])), 0.25))
  erased = [x != 0 for x in ds.as_numpy_iterator()]
  hit = [m.any(-1) for m in erased if m.any()]
  assert abs(len(hit) / 1000 - 0.25) < 0.05
  for mask in hit:
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert mask.sum() == box                                  # one rectangle
    assert 0.015 < box / (32 * 40) < 0.36
  noise = np.concatenate([x[x != 0] for x in ds.take(200).as_numpy_iterator()])
  assert abs(noise.std() - 1) < 0.05


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_mixup_and_cutmix_targets(mixup, cutmix):
  smoothing, classes = 0.1, 10
  base = data.TrainPipeline(make_config(), 16, seed=5)
  mixed = data.TrainPipeline(make_config(mixup=mixup, cutmix=cutmix), 16, seed=5,
                             label_smoothing=smoothing)
  for plain, batch in zip(take(base.iterate(3), 4), take(mixed.iterate(3), 4)):
    targets, x = batch["targets"], plain["image"]
    np.testing.assert_array_equal(batch["label"], plain["label"])
    np.testing.assert_array_equal(batch["mixed_label"], plain["label"][::-1])
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)
    assert targets.min() >= smoothing / classes - 1e-6
    i = int(np.argmax(batch["label"] != batch["mixed_label"]))
    lam = (targets[i, batch["label"][i]] - smoothing / classes) / (1 - smoothing)
    assert 0 <= lam <= 1
    if cutmix:
      from_flipped = (batch["image"] == x[::-1]) & (x != x[::-1])
      from_self = (batch["image"] == x) & (x != x[::-1])
      assert np.all(from_flipped | from_self | (x == x[::-1]))
      area = from_flipped[i].all(-1) | (x[i] == x[::-1][i]).all(-1)
      rows, cols = np.nonzero(from_flipped[i].any(-1))
      if len(rows):
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert abs((1 - lam) - box / area.size) < 1e-5
    else:
      np.testing.assert_allclose(batch["image"], lam * x + (1 - lam) * x[::-1], atol=1e-5)
  with pytest.raises(ValueError, match=r"expected an even batch per device, got 9 \(local "
                                       r"batch 9 on 1 device"):
    data.TrainPipeline(make_config(mixup=0.8), 18, seed=0, process_count=2)
  with pytest.raises(ValueError, match="got 3 "):
    data.TrainPipeline(make_config(mixup=0.8), 24, seed=0, mix_groups=8)
  with pytest.raises(ValueError, match="mix_groups=5: expected an int >= 1 dividing"):
    data.TrainPipeline(make_config(mixup=0.8), 24, seed=0, mix_groups=5)


# ----------------------------------------------------------------------------- benchmark

@pytest.mark.benchmark
def test_throughput(tmp_path):
  """Images/s of the digits demo pipeline and of an ImageNet-like one (500x375 JPEGs,
  every augmentation, 224x224)."""
  rng = np.random.default_rng(0)
  base = photo("coffee")
  for i in range(64):
    os.makedirs(tmp_path / "train" / f"c{i % 8}", exist_ok=True)
    image = np.asarray(Image.fromarray(np.roll(base, 7 * i, axis=1)).resize((500, 375)))
    noisy = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "train" / f"c{i % 8}" / f"{i}.jpg", quality=90)
  cases = {
      "digits demo (32x32, crop only)": (make_config(
          hflip=False, randaugment="", reprob=0.0, repeated_aug=1, crop_scale=(0.6, 1.0)), 128),
      "digits, full DeiT augmentation": (make_config(), 128),
      "ImageNet-like JPEGs 500x375 -> 224": (make_config(
          f"folder:{tmp_path}", img_size=224, eval_split="train", mixup=0.8, cutmix=1.0), 32),
  }
  for name, (config, batch) in cases.items():
    it = data.TrainPipeline(config, batch, seed=0).iterate()
    take(it, 2)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < 10:
      count += len(next(it)["label"])
    print(f"{name}: {count / (time.perf_counter() - start):.0f} img/s")


def test_tensorflow_is_imported_when_the_pipeline_is_first_used():
  """train.py and eval.py catch DataError without TensorFlow's start-up (~5 s): its errors
  about arguments, configs and checkpoints come first."""
  code = ("import sys\n"
          "from mctf_jax.data import DataError\n"
          "assert 'tensorflow' not in sys.modules, 'imported TensorFlow'\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert done.returncode == 0, done.stderr
  # Here (TensorFlow imported by this module) the names resolve to the modules' own.
  assert data.DataError is sources.DataError and data.DatasetInfo is sources.DatasetInfo
  assert data.dataset_info.__module__ == "mctf_jax.data.pipeline"
  with pytest.raises(AttributeError, match="has no attribute 'Pipeline'"):
    data.Pipeline


def test_tensorflow_is_imported_without_keras_and_keras_still_loads():
  """TensorFlow's eager import of Keras (with scikit-learn and SciPy behind it) is skipped
  at every start; tf.keras loads in full when something asks for it."""
  code = ("import sys\n"
          "import mctf_jax.data.pipeline\n"
          "for name in ('keras', 'sklearn'):\n"
          "  assert name not in sys.modules, f'imported {name}'\n"
          "from mctf_jax.data._tf import tf\n"
          "assert tf.keras.optimizers.Adam.__module__.startswith('keras.'), tf.keras\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert done.returncode == 0, done.stderr
