"""Training and evaluation input pipelines (tf.data, numpy batches per process).

Training epochs. In-memory sources (digits, image folders: lists of images or paths) have
one global order, whatever the number of processes: epoch e is a permutation of the whole
train split seeded by (seed, e), cut into `steps_per_epoch` global batches, and process p
takes the p-th slice of each; an example's running number is its global position
(e * epoch length + position) and its augmentation is drawn from stateless random ops keyed
by (seed, number). The batches of a step are therefore the same on 1, 2 or 8 processes, and
a run resumes bit-identically on another number of processes (with as many devices in all).
tfds datasets are read per process instead (each reads its own 1/P of the files, shuffled by
(seed, p, e) with a buffer, numbers and keys per process): reading a global order would
make every host read every record, so their order depends on the number of processes.
With repeated augmentation r > 1 (DeiT's RASampler) an epoch takes the first
ceil(length / r) records of the permutation and repeats each r times in a row, so the epoch
length stays the same and each image in it appears r times. Mixup/CutMix pair each image
with the reverse of its device's batch (timm's per-GPU batch), one lambda per global batch.
Resuming at a step only skips raw records (paths or encoded bytes) of the interrupted
epoch, and an interrupted run and an uninterrupted one see identical batches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator, Optional

import numpy as np

from mctf_jax.data import augment, sources
from mctf_jax.data._tf import tf
from mctf_jax.data.augment import MixupSpec, RandAugmentSpec
from mctf_jax.data.sources import DataError, DatasetInfo

AUTOTUNE = tf.data.AUTOTUNE
_TAG_AUGMENT, _TAG_SHUFFLE, _TAG_MIX = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Settings:
  """config.data (and config.model.img_size), validated."""
  dataset: str
  data_dir: Optional[str]
  train_split: str
  eval_split: str
  img_size: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  hflip: bool
  randaugment: Optional[RandAugmentSpec]
  reprob: float
  mixup: float
  cutmix: float
  mixup_prob: float
  mixup_switch_prob: float
  repeated_aug: int
  shuffle_buffer: int
  crop_pct: float
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  @property
  def fill(self) -> tuple[int, ...]:
    """timm's RandAugment fill colour: the mean as pixels, min(255, round(255 * m))."""
    return tuple(min(255, round(255 * m)) for m in self.mean)


def _pair(data, name: str, low: float = 0.0) -> tuple[float, float]:
  value = data[name]
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
      or not low < value[0] <= value[1]):
    raise DataError(f"config.data.{name}={value!r}: expected (lo, hi) with {low} < lo <= hi")
  return float(value[0]), float(value[1])


def _fraction(data, name: str, default: Optional[float] = None) -> float:
  value = data.get(name, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
    raise DataError(f"config.data.{name}={value!r}: expected a number in [0, 1]")
  return float(value)


def settings(config: Any) -> Settings:
  """Reads and checks config.data and config.model.img_size."""
  data = config.data
  img_size = config.model.img_size
  if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
    raise DataError(f"config.model.img_size={img_size!r}: expected a positive int")
  for name in ("dataset", "train_split", "eval_split"):
    if not isinstance(data[name], str) or not data[name]:
      raise DataError(f"config.data.{name}={data[name]!r}: expected a non-empty string")
  for name in ("mixup", "cutmix"):
    if isinstance(data[name], bool) or not isinstance(data[name], (int, float)) or data[name] < 0:
      raise DataError(f"config.data.{name}={data[name]!r}: expected an alpha >= 0 (0 = off)")
  for name in ("repeated_aug", "shuffle_buffer"):
    if isinstance(data[name], bool) or not isinstance(data[name], int) or data[name] < 1:
      raise DataError(f"config.data.{name}={data[name]!r}: expected an int >= 1")
  crop_pct = data.crop_pct
  if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
    raise DataError(f"config.data.crop_pct={crop_pct!r}: expected a number in (0, 1]")
  mean, std = tuple(data.mean), tuple(data.std)
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise DataError(f"config.data.mean={mean!r}, std={std!r}: expected 3 values each, std > 0")
  if not isinstance(data.hflip, bool):
    raise DataError(f"config.data.hflip={data.hflip!r}: expected True or False")
  try:
    randaugment = augment.parse_randaugment(data.randaugment or "")
  except ValueError as error:
    raise DataError(f"config.data.{error}") from None
  return Settings(
      dataset=data.dataset, data_dir=data.get("data_dir"), train_split=data.train_split,
      eval_split=data.eval_split, img_size=img_size,
      crop_scale=_pair(data, "crop_scale"), crop_ratio=_pair(data, "crop_ratio"),
      hflip=data.hflip, randaugment=randaugment, reprob=_fraction(data, "reprob"),
      mixup=float(data.mixup), cutmix=float(data.cutmix),
      mixup_prob=_fraction(data, "mixup_prob", 1.0),
      mixup_switch_prob=_fraction(data, "mixup_switch_prob", 0.5),
      repeated_aug=data.repeated_aug, shuffle_buffer=data.shuffle_buffer,
      crop_pct=float(crop_pct), mean=tuple(float(m) for m in mean),
      std=tuple(float(s) for s in std))


# The transforms are written with tf ops (Python control flow only on settings): tracing
# them without AutoGraph's source conversion is several times faster.
_plain = tf.autograph.experimental.do_not_convert


def _source(s: Settings):
  return sources.get_source(s.dataset, s.data_dir, s.img_size, s.train_split, s.shuffle_buffer)


def pipeline_options(num_threads: Optional[int] = None) -> tf.data.Options:
  """The options of every pipeline here: ordered, one thread per op, and with num_threads
  a private pool of that many threads (default: TensorFlow's shared pool, one per core)."""
  options = tf.data.Options()
  options.deterministic = True     # parallel maps keep their order
  options.threading.max_intra_op_parallelism = 1
  if num_threads is not None:
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
      raise ValueError(f"num_threads={num_threads!r}: expected an int >= 1 or None")
    options.threading.private_threadpool_size = num_threads
  return options


def _check_processes(global_batch_size: int, process_index: int, process_count: int) -> int:
  """The local batch size; checks the process arguments."""
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"process_count={process_count!r}: expected an int >= 1")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index!r}: expected an int in "
                     f"[0, process_count={process_count})")
  if not isinstance(global_batch_size, int) or global_batch_size < 1:
    raise ValueError(f"global_batch_size={global_batch_size!r}: expected an int >= 1")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={process_count}; expected a multiple of it")
  return global_batch_size // process_count


def dataset_info(config: Any) -> DatasetInfo:
  """Name, number of classes and split sizes of the configured dataset."""
  s = settings(config)
  source = _source(s)
  return DatasetInfo(name=source.name, num_classes=source.num_classes,
                     num_train=source.num_examples(s.train_split),
                     num_eval=source.num_examples(s.eval_split))


class TrainPipeline:
  """Augmented training batches of one process, reproducible from any step.

  `iterate(start_step)` yields dicts of numpy arrays with the process's share of each global
  batch: 'image' float32 (B, S, S, 3) normalised, 'label' int32 (B,), and with mixup/cutmix
  'targets' float32 (B, num_classes) (label smoothing folded in) and 'mixed_label' int32.
  mix_groups: the local batch's devices; mixup/cutmix pair each image with the reverse of
  its group (default 1: the whole local batch).
  num_threads: a private tf.data thread pool of that size (default: the shared one); the
  batches are the same with any.
  """

  def __init__(self, config: Any, global_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, label_smoothing: float = 0.0,
               num_threads: Optional[int] = None, mix_groups: int = 1):
    self.settings = s = settings(config)
    self.local_batch_size = _check_processes(global_batch_size, process_index, process_count)
    self.global_batch_size = global_batch_size
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
      raise ValueError(f"seed={seed!r}: expected an int in [0, 2**63)")
    if not 0 <= label_smoothing < 1:
      raise ValueError(f"label_smoothing={label_smoothing!r}: expected a number in [0, 1)")
    self.seed = seed
    self._options = pipeline_options(num_threads)
    self.process_index, self.process_count = process_index, process_count
    self._source = _source(s)
    self.num_classes = self._source.num_classes
    self.num_examples = self._source.num_examples(s.train_split)
    # Whole global batches (tfds: each process's part has at least this many local ones).
    self.steps_per_epoch = self.num_examples // global_batch_size
    if self.steps_per_epoch < 1:
      raise DataError(f"train split {s.train_split!r} of {self._source.name} has "
                      f"{self.num_examples} examples, fewer than one global batch of "
                      f"{global_batch_size}; expected a smaller config.batch_size")
    self._epoch_length = self.steps_per_epoch * self.local_batch_size
    self._mixup, self.mix_groups = None, mix_groups
    if s.mixup > 0 or s.cutmix > 0:
      if (isinstance(mix_groups, bool) or not isinstance(mix_groups, int) or mix_groups < 1
          or self.local_batch_size % mix_groups):
        raise ValueError(f"mix_groups={mix_groups!r}: expected an int >= 1 dividing the local "
                         f"batch {self.local_batch_size}")
      group = self.local_batch_size // mix_groups
      if group % 2:
        raise ValueError(f"mixup/cutmix pair each image with its device's batch reversed; "
                         f"expected an even batch per device, got {group} (local batch "
                         f"{self.local_batch_size} on {mix_groups} device(s))")
      self._mixup = MixupSpec(mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, prob=s.mixup_prob,
                              switch_prob=s.mixup_switch_prob, label_smoothing=label_smoothing)

  # ---- the stream of raw records

  def _key(self, tag: int, process_index: Optional[int] = None):
    base = tf.constant([self.seed, self.process_index if process_index is None
                        else process_index], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tag)

  def _one_epoch(self, records: tf.data.Dataset) -> tf.data.Dataset:
    """The epoch's records: exactly _epoch_length, repeated-augmentation copies adjacent."""
    repeats = self.settings.repeated_aug
    if repeats > 1:
      records = records.take(-(-self._epoch_length // repeats)).flat_map(_plain(
          lambda data, label: tf.data.Dataset.from_tensors((data, label)).repeat(repeats)))
    return records.take(self._epoch_length)

  def _stream(self, epoch: int, offset: int, whole_run: bool) -> tf.data.Dataset:
    """(number, (data, label)) from epoch `epoch`, skipping `offset` raw records: in-memory
    sources (whole_run) in the global order, all later epochs too; tfds this process's part
    of epoch `epoch` only."""
    if whole_run:
      return self._global_epochs(epoch).skip(offset)
    shuffle_seed = int(np.random.SeedSequence(
        [self.seed, self.process_index, epoch, _TAG_SHUFFLE]).generate_state(1)[0] >> 1)
    stream = self._one_epoch(self._source.records(
        self.settings.train_split, self.process_index, self.process_count,
        shuffle_seed=shuffle_seed))
    return stream.enumerate(epoch * self._epoch_length).skip(offset)

  def _global_epochs(self, epoch: int) -> tf.data.Dataset:
    """This process's slices of the global batches of epochs `epoch`, `epoch` + 1, ..."""
    data, labels = self._source.tensors(self.settings.train_split)
    size, local, repeats = self.global_batch_size, self.local_batch_size, self.settings.repeated_aug
    length = self.steps_per_epoch * size
    positions = tf.constant((np.arange(self.steps_per_epoch)[:, None] * size
                             + self.process_index * local + np.arange(local)).reshape(-1),
                            tf.int64)
    key = self._key(_TAG_SHUFFLE, process_index=0)

    def one_epoch(e):
      seed = tf.random.experimental.stateless_fold_in(key, e)
      order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(labels)[0]), seed)
      if repeats > 1:
        order = tf.repeat(order[:-(-length // repeats)], repeats)
      mine = tf.gather(order, positions)
      return tf.data.Dataset.from_tensor_slices(
          (e * length + positions, (tf.gather(data, mine), tf.gather(labels, mine))))

    return tf.data.Dataset.range(epoch, 2**62).flat_map(_plain(one_epoch))

  # ---- per-example transform and batching

  def _example(self, number, record):
    s = self.settings
    data, label = record
    # Numbers are global positions for in-memory sources, this process's for tfds.
    key = self._key(_TAG_AUGMENT, process_index=0 if self._source.graph_epochs else None)
    seeds = augment.Seeds(tf.random.experimental.stateless_fold_in(key, number))
    if self._source.kind == "path":
      data = tf.io.read_file(data)
    image = augment.random_resized_crop(data, seeds, s.img_size, s.crop_scale, s.crop_ratio,
                                        decoded=self._source.kind == "decoded")
    if s.hflip:
      image = augment.random_flip(image, seeds)
    if s.randaugment is not None:
      image = augment.rand_augment(image, s.randaugment, seeds, s.fill)
    image = augment.normalize(image, s.mean, s.std)
    if s.reprob > 0:
      image = augment.random_erasing(image, seeds, s.reprob)
    image.set_shape([s.img_size, s.img_size, 3])
    return {"image": image, "label": label}

  def _mix(self, step, batch):
    # One lambda per global batch: the key ignores the process.
    key = tf.random.experimental.stateless_fold_in(self._key(_TAG_MIX, process_index=0), step)
    images, targets, mixed = augment.mix_batch(batch["image"], batch["label"],
                                               augment.Seeds(key), self._mixup,
                                               self.num_classes, groups=self.mix_groups)
    return dict(batch, image=images, targets=targets, mixed_label=mixed)

  def _batches(self, stream: tf.data.Dataset, first_step: int) -> Iterator[dict]:
    ds = stream.map(_plain(self._example), num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(self.local_batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE,
                  deterministic=True)
    if self._mixup is not None:
      ds = ds.enumerate(first_step).map(_plain(self._mix), num_parallel_calls=AUTOTUNE,
                                        deterministic=True)
    return ds.prefetch(AUTOTUNE).with_options(self._options).as_numpy_iterator()

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches from global step `start_step` on, forever (epoch after epoch)."""
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
      raise ValueError(f"start_step={start_step!r}: expected an int >= 0")
    epoch, step_in_epoch = divmod(start_step, self.steps_per_epoch)
    offset = step_in_epoch * self.local_batch_size
    if self._source.graph_epochs:
      yield from self._batches(self._stream(epoch, offset, whole_run=True), start_step)
      return
    while True:
      expected = self.steps_per_epoch - step_in_epoch
      count = 0
      for batch in self._batches(self._stream(epoch, offset, whole_run=False),
                                 epoch * self.steps_per_epoch + step_in_epoch):
        count += 1
        yield batch
      if count != expected:
        raise DataError(f"epoch {epoch} of process {self.process_index} ended after {count} "
                        f"of {expected} batches: {self._source.name} split "
                        f"{self.settings.train_split!r} has fewer examples than its "
                        f"metadata says ({self.num_examples})")
      epoch, step_in_epoch, offset = epoch + 1, 0, 0


def eval_batches(config: Any, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, split: Optional[str] = None,
                 num_threads: Optional[int] = None) -> Iterator[dict[str, np.ndarray]]:
  """The evaluation split (config.data.eval_split or `split`) in this process's batches.

  Yields dicts 'image' float32 (B, S, S, 3), 'label' int32 (B,), 'mask' bool (B,). The
  processes split the examples (each scored once in all); the last batches are padded with
  mask False, and every process yields ceil(ceil(N / process_count) / B) batches.
  num_threads: a private tf.data thread pool of that size (default: the shared one).
  """
  s = settings(config)
  local_batch = _check_processes(global_batch_size, process_index, process_count)
  split = split or s.eval_split
  source = _source(s)
  num_batches = math.ceil(math.ceil(source.num_examples(split) / process_count) / local_batch)
  records = source.records(split, process_index, process_count)

  def prepare(data, label):
    if source.kind == "path":
      data = tf.io.read_file(data)
    image = data if source.kind == "decoded" else augment.decode_image(data)
    image = augment.eval_image(image, s.img_size, s.crop_pct, s.mean, s.std)
    return {"image": image, "label": label, "mask": tf.constant(True)}

  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([s.img_size, s.img_size, 3], tf.float32),
      "label": tf.constant(0, tf.int32), "mask": tf.constant(False)}).repeat()
  ds = records.map(_plain(prepare), num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.concatenate(padding).take(num_batches * local_batch).batch(local_batch)
  ds = ds.prefetch(AUTOTUNE).with_options(pipeline_options(num_threads))
  return ds.as_numpy_iterator()


@functools.lru_cache(maxsize=16)
def _eval_fn(img_size: int, crop_pct: float, mean: tuple, std: tuple):
  return tf.function(lambda image: augment.eval_image(image, img_size, crop_pct, mean, std),
                     input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)],
                     autograph=False)


def eval_transform(image: np.ndarray, img_size: int, crop_pct: float, mean, std) -> np.ndarray:
  """The evaluation preprocessing of one uint8 image (H, W, 3), (H, W) grey or RGBA (alpha
  dropped, as PIL's convert('RGB')): float32 (img_size, img_size, 3), as in eval_batches."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"eval_transform: expected a uint8 image, got dtype {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"eval_transform: expected (H, W, 3), (H, W), (H, W, 1) or (H, W, 4), "
                     f"got shape {image.shape}")
  image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
  if not 0 < crop_pct <= 1:
    raise ValueError(f"eval_transform: crop_pct={crop_pct!r}: expected a number in (0, 1]")
  fn = _eval_fn(int(img_size), float(crop_pct), tuple(map(float, mean)),
                tuple(map(float, std)))
  return fn(tf.constant(image)).numpy()
