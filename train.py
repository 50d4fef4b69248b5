r"""MCTF fine-tuning: ``python train.py --config=configs/deit_s.py --workdir=DIR``.

Rerunning the same command resumes from the latest checkpoint in DIR. Config fields are
overridden with ``--config.<field>=value`` (e.g. ``--config.batch_size=256``); see
configs/default.py for all of them. On several hosts, the same command runs on every host
(``jax.distributed.initialize()`` is called when the environment describes several
processes, or with ``--distributed=true``).
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_s.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and TensorBoard events.")
flags.DEFINE_string("compilation_cache", None, "Directory of JAX's persistent compilation "
                    "cache (default: $JAX_COMPILATION_CACHE_DIR or ~/.cache/mctf_jax/xla); "
                    "'' turns it off.")
flags.DEFINE_enum("distributed", "auto", ["auto", "true", "false"],
                  "Call jax.distributed.initialize() (auto: when running on several hosts).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process "
                    "runs without a cluster manager (with --num_processes, --process_id).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.getLogger("absl").setLevel(logging.WARNING)
  from mctf_jax import parallel, trainer
  from mctf_jax.config import ConfigError
  from mctf_jax.convert import CheckpointMismatchError
  from mctf_jax.data import DataError
  parallel.maybe_initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address,
                                        FLAGS.num_processes, FLAGS.process_id)
  parallel.enable_compilation_cache(parallel.default_compilation_cache()
                                    if FLAGS.compilation_cache is None else FLAGS.compilation_cache)
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (trainer.TrainingError, ConfigError, CheckpointMismatchError, DataError,
          FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
