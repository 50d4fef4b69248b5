"""Regenerates the PyTorch fixtures of the tests (needs torch; the tests themselves do not).

  python tests/data/make_fixtures.py

- tiny_deit.pth: the tiny_default golden weights as an official-style checkpoint
  ({'model', 'model_ema', 'optimizer', 'epoch', 'args'}), float32.
- torch_reader.pth + torch_reader_expected.npz: tensors of many dtypes and layouts, and
  what torch.load returns for them, for the torch-free reader; torch_reader_legacy.pth the
  same object in torch's legacy (pre-1.6) format, tiny_deit_legacy.pth tiny_deit.pth's.
- pos_embed_resize.npz: torch.nn.functional.interpolate(bicubic, align_corners=False) of a
  position-embedding grid, up and down, as DeiT's fine-tuning code resizes it.
"""

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  golden = np.load(os.path.join(HERE, "..", "golden", "tiny_default.npz"))
  state = {k[len("param/"):]: torch.from_numpy(golden[k]).float()
           for k in golden.files if k.startswith("param/")}
  ema = {k: v * 0.5 for k, v in state.items()}
  torch.save({"model": state, "model_ema": ema,
              "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []},
              "epoch": 3, "args": argparse.Namespace(model="deit_tiny", lr=3e-5)},
             os.path.join(HERE, "tiny_deit.pth"))
  torch.save({"model": state, "epoch": 3, "args": argparse.Namespace(model="deit_tiny")},
             os.path.join(HERE, "tiny_deit_legacy.pth"), _use_new_zipfile_serialization=False)

  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=g, dtype=torch.float64)
  tensors = {
      "f32": torch.randn(3, 4, generator=g),
      "f64": base,
      "f16": torch.randn(7, generator=g).half(),
      "bf16": torch.randn(2, 3, generator=g).bfloat16(),
      "i64": torch.arange(-5, 5),
      "u8": torch.arange(250, 256, dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(2.5),
      "transposed": base.t(),                  # non-contiguous view of a shared storage
      "offset_slice": base[2:, 1:4],           # storage offset and strides
      "conv": torch.randn(4, 3, 2, 2, generator=g),
  }
  reader = {"tensors": tensors, "nested": [tensors["f32"], {"x": tensors["i64"]}]}
  torch.save(reader, os.path.join(HERE, "torch_reader.pth"))
  torch.save(reader, os.path.join(HERE, "torch_reader_legacy.pth"),
             _use_new_zipfile_serialization=False)
  expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in
              tensors.items()}
  np.savez(os.path.join(HERE, "torch_reader_expected.npz"), **expected)

  pos = torch.randn(1, 1 + 7 * 7, 8, generator=g, dtype=torch.float64)
  out = {"pos_embed": pos.numpy()}
  for new in (10, 4):
    grid = pos[:, 1:].reshape(1, 7, 7, 8).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
    out[f"resized_{new}"] = torch.cat([pos[:, :1], grid], dim=1).numpy()
  np.savez(os.path.join(HERE, "pos_embed_resize.npz"), **out)


if __name__ == "__main__":
  main()
