r"""MCTF fine-tuning: ``python train.py --config=configs/deit_s.py --workdir=DIR``.

Rerunning the same command resumes from the latest checkpoint in DIR. Config fields are
overridden with ``--config.<field>=value`` (e.g. ``--config.batch_size=256``); see
configs/default.py for all of them. On several hosts, the same command runs on every host
(``jax.distributed.initialize()`` is called when the environment describes several
processes, or with ``--distributed=true``).
"""

import os

from absl import app, flags
from ml_collections import config_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before jax and tensorflow load
from mctf_jax import parallel  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_s.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and TensorBoard events.")
parallel.define_runtime_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")

  def train():
    from mctf_jax.training import trainer   # (not in the supervising parent: TensorFlow)
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  parallel.run_entry_point(FLAGS, train)


if __name__ == "__main__":
  app.run(main)
