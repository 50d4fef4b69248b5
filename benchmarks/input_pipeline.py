r"""Images per second per CPU core of the input pipelines, against decoding and cropping alone.

    python benchmarks/input_pipeline.py                      # builds the JPEGs in /tmp
    python benchmarks/input_pipeline.py --profile --json=/tmp/pipeline.json
    python benchmarks/input_pipeline.py --dir=/data/bench_jpegs --threads=2

The images: a folder of real photos at ImageNet's typical size, built once (and reused) from
scikit-image's colour samples: --num_images random crops of them (area 40-100%, flipped
or not, one in four portrait), resized with Pillow's bicubic to --width x --height
(500 x 375: ImageNet's median) and saved as JPEG quality --quality in --classes class
folders, the layout ``folder:`` datasets read (``mctf_jax.data.sources.FolderSource``).

Three pipelines run on these same files:

* reference: read the file, decode only a random crop (``tf.image.decode_and_crop_jpeg``,
  the crop drawn as the training one is), resize it to --img_size (bilinear, not
  antialiased) as uint8, batch: the least a training pipeline can do;
* pil_crop: the same, but the crop resized as the training pipeline resizes it (PIL's
  antialiased bicubic, ``augment.pil_resize``): the reference once the resize is the
  recipe's, so that the ratio against it is what the augmentations after the crop cost;
* train: ``TrainPipeline(config, --batch_size).iterate()`` with the DeiT recipe of
  ``recipes.base_config()`` (random resized crop with PIL's bicubic, flip, RandAugment
  rand-m9-mstd0.5-inc1, random erasing 0.25, repeated augmentation x3, normalisation,
  float32 batches), and each batch put on the first JAX device (``jax.device_put``,
  ``block_until_ready``);
* eval: ``eval_batches(config, --batch_size)`` (decode, resize the shorter side to
  img_size / 0.875 with PIL's bicubic, centre crop, normalise), put on the device likewise.

Per core. Every tf.data pipeline runs on a private thread pool of --threads threads (1 by
default; ``options.threading.private_threadpool_size``, one thread per op
(``max_intra_op_parallelism=1``)), and the figure is images per second of the process's CPU
time (``time.process_time()``: every thread, tf.data's, the Python loop and JAX's
transfer): what one core of a host delivers when the pipeline has the core to itself. The
wall-clock rate is reported too; on a busy machine it is lower than the CPU-time one, the
CPU-time one is not. The pipelines take turns (reference, train, eval, reference, ...,
--rounds times), each turn a fresh iterator (so none works ahead while another is timed),
--warmup untimed batches, then --batches timed ones; the ratios against the reference are
taken per round, and the median over rounds is reported.

Targets (the issue's): train >= 60% of the reference's rate per core, eval >= 80%. The
table also gives each rate over pil_crop's.

With --profile, each step of the pipelines is also timed in isolation, one tf.data map
per step on one thread over the same images (RandAugment's ops each at magnitude 9 on
img_size crops), and the CPU time per image of each step is printed: where the time goes.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from mctf_jax import data as data_lib  # noqa: E402  (lazy: TensorFlow loads on first use)
from mctf_jax import recipes  # noqa: E402
from mctf_jax.tools import benchmark, cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dir", None, "Folder for the JPEGs (built there unless it holds the same "
                    "set already); default: a folder under the system's temporary directory.")
flags.DEFINE_integer("num_images", 300, "Distinct JPEG files.", lower_bound=2)
flags.DEFINE_integer("classes", 10, "Class folders.", lower_bound=1)
flags.DEFINE_integer("width", 500, "JPEG width (landscape; portraits swap).", lower_bound=8)
flags.DEFINE_integer("height", 375, "JPEG height.", lower_bound=8)
flags.DEFINE_integer("quality", 90, "JPEG quality.", lower_bound=1, upper_bound=100)
flags.DEFINE_integer("img_size", 224, "Model input size.", lower_bound=8)
flags.DEFINE_integer("batch_size", 128, "Images per batch.", lower_bound=1)
flags.DEFINE_integer("threads", 1, "tf.data threads per pipeline (private thread pool).",
                     lower_bound=1)
flags.DEFINE_integer("rounds", 3, "Turns of each pipeline (median of the ratios).",
                     lower_bound=1)
flags.DEFINE_integer("batches", 3, "Timed batches per turn.", lower_bound=1)
flags.DEFINE_integer("warmup", 1, "Untimed batches at the start of each turn.", lower_bound=0)
flags.DEFINE_bool("profile", False, "Also time each step of the pipelines in isolation.")
flags.DEFINE_integer("profile_images", 64, "Images per step with --profile.", lower_bound=1)
flags.DEFINE_integer("profile_repeats", 2, "Runs per step with --profile (the fastest "
                     "counts).", lower_bound=1)
flags.DEFINE_string("json", None, "Write the figures as JSON to this path.")

# The targets: rate per core of each pipeline over the reference's.
TARGETS = {"train": 0.6, "eval": 0.8}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "stereo_motorcycle:0", "stereo_motorcycle:1")


# ----------------------------------------------------------------------------- the files

def _photos():
  import skimage.data   # here: scikit-image is optional (requirements-test.txt only)
  out = []
  for name in PHOTOS:
    name, _, index = name.partition(":")
    image = getattr(skimage.data, name)()
    image = image[int(index)] if index else image
    out.append(np.ascontiguousarray(image[..., :3]))
  return out


def build_folder(root: str, num_images: int, classes: int, size: tuple[int, int],
                 quality: int, seed: int = 0) -> str:
  """root/train/c<k>/<n>.jpg: num_images random crops of scikit-image's colour photos,
  resized (Pillow bicubic) to size = (width, height) (one in four as a portrait, height x
  width) and JPEG-encoded. Returns the dataset name, 'folder:<root>'. A root that already
  holds the same set (its manifest says so) is reused."""
  manifest = dict(num_images=num_images, classes=classes, size=list(size), quality=quality,
                  seed=seed, photos=list(PHOTOS), version=1)
  manifest_path = os.path.join(root, "manifest.json")
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      if json.load(f) == manifest:
        return f"folder:{root}"
  rng = np.random.default_rng(seed)
  photos = _photos()
  width, height = size
  for n in range(num_images):
    photo = photos[n % len(photos)]
    h, w = photo.shape[:2]
    out_w, out_h = (height, width) if n % 4 == 3 else (width, height)
    aspect = out_w / out_h
    area = rng.uniform(0.4, 1.0) * h * w
    crop_w = int(min(w, round(np.sqrt(area * aspect))))
    crop_h = int(min(h, round(crop_w / aspect)))
    top, left = rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
    crop = photo[top:top + crop_h, left:left + crop_w]
    if rng.uniform() < 0.5:
      crop = crop[:, ::-1]
    folder = os.path.join(root, "train", f"c{n % classes}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(crop)).resize((out_w, out_h), Image.BICUBIC).save(
        os.path.join(folder, f"{n:05d}.jpg"), quality=quality)
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  return f"folder:{root}"


def make_config(dataset: str, img_size: int):
  """The DeiT recipe (recipes.base_config) on the folder, evaluated on the same files."""
  config = recipes.base_config()
  config.model.img_size = img_size
  config.data.dataset = dataset
  config.data.eval_split = "train"
  return config


# ----------------------------------------------------------------------------- pipelines

def reference_batches(config, batch_size: int, threads: int, pil_resize: bool = False):
  """Read, decode a random crop, resize (bilinear) to img_size as uint8, batch: forever.
  pil_resize: resize as the training pipeline does instead (PIL's antialiased bicubic,
  ``augment.pil_resize``)."""
  # here: these import TensorFlow (~5 s), which --help and bad flags skip
  from mctf_jax.data import augment, pipeline, sources
  from mctf_jax.data._tf import tf

  s = pipeline.settings(config)
  paths, labels = sources.get_source(s.dataset, None, s.img_size, s.train_split,
                                     s.shuffle_buffer).arrays(s.train_split)
  size = s.img_size

  def decode_crop(number, path):
    data = tf.io.read_file(path)
    shape = tf.image.extract_jpeg_shape(data)
    seeds = augment.Seeds(tf.stack([number, tf.constant(0, tf.int64)]))
    top, left, h, w = augment.sample_crop(seeds, shape[0], shape[1], s.crop_scale,
                                          s.crop_ratio)
    crop = tf.image.decode_and_crop_jpeg(data, tf.stack([top, left, h, w]), channels=3)
    if pil_resize:
      image = augment.pil_resize(crop, (size, size), (size, size))
    else:
      image = tf.cast(tf.image.resize(crop, [size, size]), tf.uint8)
    image.set_shape([size, size, 3])
    return image

  ds = tf.data.Dataset.from_tensor_slices(paths).repeat().enumerate()
  ds = ds.map(tf.autograph.experimental.do_not_convert(decode_crop),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.with_options(pipeline.pipeline_options(threads)).as_numpy_iterator()


def _on_device(batches):
  for batch in batches:
    yield jax.block_until_ready(jax.device_put(batch))


def make_pipelines(config, batch_size: int, threads: int) -> dict:
  """name -> a function that starts a fresh iterator of that pipeline's batches."""
  train = data_lib.TrainPipeline(config, batch_size, seed=0, num_threads=threads)
  return {
      "reference": lambda: reference_batches(config, batch_size, threads),
      "pil_crop": lambda: reference_batches(config, batch_size, threads, pil_resize=True),
      "train": lambda: _on_device(train.iterate(0)),
      "eval": lambda: _on_device(data_lib.eval_batches(config, batch_size, num_threads=threads)),
  }


def measure(pipelines: dict, batch_size: int, rounds: int, batches: int, warmup: int) -> dict:
  """Turns of each pipeline (fresh iterator, warm-up, timed batches): per name the lists
  of img/s of CPU time and of wall time per round, and per round the ratios over the
  first pipeline's."""
  per = {name: {"cpu": [], "wall": []} for name in pipelines}
  for _ in range(rounds):
    for name, start in pipelines.items():
      iterator = start()
      for _ in range(warmup):
        next(iterator)
      cpu, wall = time.process_time(), time.perf_counter()
      for _ in range(batches):
        next(iterator)
      cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
      del iterator
      gc.collect()
      per[name]["cpu"].append(batches * batch_size / cpu)
      per[name]["wall"].append(batches * batch_size / wall)
      print(f"  {name:<9s} {per[name]['cpu'][-1]:7.1f} img/s per core "
            f"({per[name]['wall'][-1]:.1f} img/s wall)", flush=True)
  first = next(iter(pipelines))
  out = {}
  for name, rates in per.items():
    ratios = [a / b for a, b in zip(rates["cpu"], per[first]["cpu"])]
    out[name] = {"img_per_cpu_s": statistics.median(rates["cpu"]),
                 "img_per_wall_s": statistics.median(rates["wall"]),
                 "img_per_cpu_s_each": rates["cpu"], "img_per_wall_s_each": rates["wall"],
                 "ratio": statistics.median(ratios), "ratio_each": ratios}
  return out


# ----------------------------------------------------------------------------- profile

def profile_steps(config, num_images: int, repeats: int = 2) -> dict:
  """CPU ms per image of each step of the pipelines, timed alone (one tf.data map per step
  on one thread over the same images; its overhead, the 'nothing' step, subtracted)."""
  # here: these import TensorFlow (~5 s), which --help and bad flags skip
  from mctf_jax.data import augment, pipeline, sources
  from mctf_jax.data._tf import tf

  s = pipeline.settings(config)
  size = s.img_size
  paths = sources.get_source(s.dataset, None, size, s.train_split,
                             s.shuffle_buffer).arrays(s.train_split)[0][:num_images]
  encoded = [tf.io.read_file(p).numpy() for p in paths]
  windows = []
  for i, data in enumerate(encoded):
    h, w = tf.image.extract_jpeg_shape(data).numpy()[:2]
    windows.append([int(v) for v in augment.sample_crop(
        augment.Seeds(tf.constant([i, 1], tf.int64)), h, w, s.crop_scale, s.crop_ratio)])
  crops = [augment.decode_crop(d, *c).numpy() for d, c in zip(encoded, windows)]
  images = np.stack([augment.pil_resize(tf.constant(c), (size, size), (size, size)).numpy()
                     for c in crops])
  floats = augment.normalize(images, s.mean, s.std).numpy()
  level = tf.constant(9.0, tf.float64)
  fill = s.fill
  options = pipeline.pipeline_options(1)

  def seeds(i):
    return augment.Seeds(tf.stack([i, tf.constant(5, tf.int64)]))

  steps = {  # name -> (input kind, fn(i, x))
      "nothing (tf.data overhead)": ("image", lambda i, x: x),
      "read file": ("path", lambda i, x: tf.io.read_file(x)),
      "decode whole JPEG": ("bytes", lambda i, x: augment.decode_image(x)),
      "decode crop window (train)": (
          "bytes+window", lambda i, x, c: augment.decode_crop(x, c[0], c[1], c[2], c[3])),
      "resize crop -> img_size (PIL bicubic)": (
          "crop", lambda i, x: augment.pil_resize(x, (size, size), (size, size))),
      "flip": ("image", lambda i, x: augment.random_flip(x, seeds(i))),
      "RandAugment (2 layers, as trained)": (
          "image", lambda i, x: augment.rand_augment(x, s.randaugment, seeds(i), fill)),
  }
  for name in s.randaugment.ops:
    steps[f"  op {name} (m9)"] = ("image", lambda i, x, name=name: augment.apply_op(
        name, x, level, tf.constant(False), fill))
  steps.update({
      "normalize": ("image", lambda i, x: augment.normalize(x, s.mean, s.std)),
      "random erasing (p 0.25)": ("float", lambda i, x: augment.random_erasing(
          x, seeds(i), s.reprob)),
      "eval resize + centre crop": ("decoded", lambda i, x: augment.resize_shorter_and_center_crop(
          x, size, s.crop_pct)),
  })
  decoded = [augment.decode_image(d).numpy() for d in encoded]
  inputs = {"path": lambda: tf.data.Dataset.from_tensor_slices(paths),
            "bytes": lambda: tf.data.Dataset.from_tensor_slices(encoded),
            "bytes+window": lambda: tf.data.Dataset.from_tensor_slices(
                (encoded, np.array(windows, np.int32))),
            "crop": lambda: tf.data.Dataset.from_generator(
                lambda: iter(crops), output_signature=tf.TensorSpec([None, None, 3], tf.uint8)),
            "decoded": lambda: tf.data.Dataset.from_generator(
                lambda: iter(decoded), output_signature=tf.TensorSpec([None, None, 3],
                                                                      tf.uint8)),
            "image": lambda: tf.data.Dataset.from_tensor_slices(images),
            "float": lambda: tf.data.Dataset.from_tensor_slices(floats)}
  # Generator inputs cost Python time per element: their own 'nothing' is subtracted.
  baselines = {}
  out = {}
  for name, (kind, fn) in steps.items():
    def run(fn=fn, kind=kind):
      ds = inputs[kind]().enumerate()
      if kind == "bytes+window":
        mapped = ds.map(lambda i, xc: fn(i, xc[0], xc[1]))
      else:
        mapped = ds.map(lambda i, x: fn(i, x))
      it = mapped.with_options(options).as_numpy_iterator()
      next(it)   # builds and starts the pipeline
      start = time.process_time()
      count = 1 + sum(1 for _ in it)
      return (time.process_time() - start) / max(count - 1, 1)
    if kind not in baselines:
      baselines[kind] = min(run(lambda i, x, *rest: x) for _ in range(repeats))
    seconds = min(run() for _ in range(repeats))
    overhead = baselines["image"] if name.startswith("nothing") else baselines[kind]
    out[name] = (seconds if name.startswith("nothing") else max(seconds - overhead, 0.0)) * 1e3
    print(f"  {name:<40s} {out[name]:7.2f} ms", flush=True)
  return out


# ----------------------------------------------------------------------------- main

def main(argv):
  cli.begin_script(argv, FLAGS)

  root = FLAGS.dir or os.path.join(
      tempfile.gettempdir(),
      f"mctf_pipeline_jpegs_{FLAGS.num_images}_{FLAGS.width}x{FLAGS.height}_q{FLAGS.quality}")
  print(f"JPEGs: {FLAGS.num_images} in {root} ({FLAGS.width}x{FLAGS.height}, quality "
        f"{FLAGS.quality}) ...", flush=True)
  dataset = build_folder(root, FLAGS.num_images, FLAGS.classes, (FLAGS.width, FLAGS.height),
                         FLAGS.quality)
  config = make_config(dataset, FLAGS.img_size)
  device = jax.devices()[0]
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"{benchmark.machine_summary(device)}; {cores} CPU cores visible; tf.data threads "
        f"{FLAGS.threads}; batch {FLAGS.batch_size}, {FLAGS.img_size}x{FLAGS.img_size}",
        flush=True)
  result = {"dir": root, "num_images": FLAGS.num_images, "size": [FLAGS.width, FLAGS.height],
            "quality": FLAGS.quality, "img_size": FLAGS.img_size,
            "batch_size": FLAGS.batch_size, "threads": FLAGS.threads, "cores_visible": cores,
            "device": str(device), "jax": jax.__version__}
  if FLAGS.profile:
    print(f"\nCPU ms per image of each step alone (one thread, {FLAGS.profile_images} "
          f"images):", flush=True)
    result["profile_ms_per_image"] = profile_steps(config, FLAGS.profile_images,
                                                   FLAGS.profile_repeats)

  print(f"\ntimed turns ({FLAGS.rounds} rounds x {FLAGS.batches} batches after "
        f"{FLAGS.warmup} warm-up):", flush=True)
  rates = measure(make_pipelines(config, FLAGS.batch_size, FLAGS.threads), FLAGS.batch_size,
                  FLAGS.rounds, FLAGS.batches, FLAGS.warmup)
  result["pipelines"] = rates
  # Also against pil_crop: what is left once the crop is resized as the recipe resizes it.
  for row in rates.values():
    row["ratio_pil_crop_each"] = [a / b for a, b in zip(row["img_per_cpu_s_each"],
                                                        rates["pil_crop"]["img_per_cpu_s_each"])]
    row["ratio_pil_crop"] = statistics.median(row["ratio_pil_crop_each"])
  print(f"\n{'pipeline':<10s} {'img/s/core':>10s} {'img/s wall':>10s} {'of reference':>12s} "
        f"{'of pil_crop':>11s}")
  for name, row in rates.items():
    print(f"{name:<10s} {row['img_per_cpu_s']:10.1f} {row['img_per_wall_s']:10.1f} "
          f"{row['ratio']:11.0%} {row['ratio_pil_crop']:11.0%}")
  result["targets"] = {name: {"min_ratio": t, "met": bool(rates[name]["ratio"] >= t)}
                       for name, t in TARGETS.items()}
  print("targets: " + ", ".join(
      f"{name} >= {t['min_ratio']:.0%} of reference {'met yes' if t['met'] else 'met NO'}"
      for name, t in result["targets"].items()))
  if FLAGS.json:
    cli.write_json(FLAGS.json, result)


if __name__ == "__main__":
  app.run(main)
