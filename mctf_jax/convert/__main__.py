"""``python -m mctf_jax.convert``: a PyTorch or big_vision checkpoint to an Orbax parameter
checkpoint.

    python -m mctf_jax.convert --config=configs/deit_s.py --torch=deit_small.pth --out=DIR
    python -m mctf_jax.convert --config=configs/vit_b16_augreg.py --big_vision=ViT-B_16.npz \
        --out=DIR
    python -m mctf_jax.convert --config=configs/siglip_b16.py \
        --big_vision=webli_en_b16_224_63724782.npz:img --out=DIR

The result loads in train.py (``--config.init.checkpoint=DIR``), eval.py
(``--checkpoint=DIR``) and ``mctf_jax.checkpoint.load_variables``.
"""

from __future__ import annotations

import logging

from absl import app, flags
from flax import traverse_util
from ml_collections import config_flags

from mctf_jax import checkpoint, convert, parallel
from mctf_jax.errors import MctfError


def main(argv=None):
  flags_ = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Model config file (e.g. configs/deit_s.py).")
  flags.DEFINE_string("torch", None, "PyTorch checkpoint: .pth (.pt, .bin, .ckpt, timm's "
                      ".pth.tar), .npz or .safetensors, in the backbone's PyTorch naming.")
  flags.DEFINE_string("big_vision", None, "big_vision / vision_transformer checkpoint (.npz; "
                      "FILE.npz:SUBTREE for a sub-tree, e.g. ':img' of SigLIP), for "
                      "model.arch='vit'.")
  flags.DEFINE_string("out", None, "Output directory for the Orbax checkpoint.")
  flags.DEFINE_bool("ema", False, "Take the EMA weights of the checkpoint ('model_ema', "
                    "or timm's 'state_dict_ema').")
  flags.DEFINE_bool("allow_unexpected", False, "Ignore weights the model does not have.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
  flags.mark_flags_as_required(["config", "out"])

  def run(_):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parallel.quiet_library_logs(flags_)
    config = flags_.config
    if (flags_.torch is None) == (flags_.big_vision is None):
      raise app.UsageError("give the checkpoint to convert as --torch=FILE or "
                           "--big_vision=FILE.npz (one of them)")
    source = flags_.torch or flags_.big_vision
    try:
      checkpoint.check_save_target(flags_.out, overwrite=flags_.overwrite)  # before reading
      # (A big_vision .npz given as --torch is recognised by its keys.)
      variables = convert.file_to_variables(
          source, config, ema=flags_.ema, allow_unexpected=flags_.allow_unexpected,
          kind="big_vision" if flags_.big_vision else "auto")
      params = variables.pop("params")
      n = sum(v.size for v in traverse_util.flatten_dict(params).values())
      path = checkpoint.save_params(flags_.out, params, config, overwrite=flags_.overwrite,
                                    model_state=variables)
    except (MctfError, OSError) as e:   # OSError: a path that cannot be written
      raise app.UsageError(str(e))
    print(f"converted {source} ({n:,} parameters) -> {path}")

  app.run(run, argv=argv)


if __name__ == "__main__":
  main()
