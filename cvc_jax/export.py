r"""Exports the pretrained encoder of a workdir, for use without the trainer.

    python -m cvc_jax.export --workdir=/tmp/cvc_demo --out=/tmp/cvc_demo_encoder
    python -m cvc_jax.export --workdir=/tmp/cvc_demo --out=/tmp/r2plus1d --format=torch

`--format=orbax` (default) writes a folder: a plain orbax checkpoint of the
encoder's params and BatchNorm statistics plus `encoder.json`, its architecture;
`cvc_jax.models.exported.load_encoder(folder)` restores it with orbax alone.
`--format=torch` writes the torchvision-layout (R(2+1)D, R3D, MC3) or
Hara-layout (arch 'hara') state dict as OUT.safetensors (the architecture in its
metadata) and, where PyTorch is installed, OUT.pth; the PyTorch encoder of that
layout loads either with `load_state_dict(strict=True)`.
"""

import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import numpy as np

from cvc_jax import convert
from cvc_jax.models import exported

_FORMATS = ("orbax", "torch")


def export(workdir: str, out: str, *, fmt: str = "orbax", encoder: str = "backbone",
           step: int | None = None) -> list[str]:
  """Writes one encoder of a pretraining checkpoint; returns the paths written.

  Args:
    workdir: the pretraining workdir.
    out: the folder (orbax) or the path without extension (torch; a
      `.safetensors` or `.pth` ending is dropped).
    fmt: 'orbax' or 'torch'.
    encoder: 'backbone' (shared; the RGB one with separate encoders),
      'backbone_s' or 'backbone_d'.
    step: the checkpoint's step; None for the newest.
  """
  if fmt not in _FORMATS:
    raise ValueError(f"format must be one of {_FORMATS}, got {fmt!r}.")
  targets = [out] if fmt == "orbax" else [_torch_base(out) + e for e in (".safetensors", ".pth")]
  for target in targets:
    if os.path.exists(target) and not (os.path.isdir(target) and not os.listdir(target)):
      raise FileExistsError(f"{target} exists; an export never replaces one. Choose "
                            "another --out, or remove it first.")
  config, enc_vars, step = exported.encoder_from_workdir(workdir, encoder=encoder,
                                                        step=step)
  enc_cfg, inputs = config["model"]["encoder"], config["input"]
  info = dict(
      encoder=enc_cfg,
      # What the encoder saw in pretraining: clips normalised with these.
      input=dict(num_frames=inputs["num_frames"], crop_size=inputs["crop_size"],
                 mean=inputs["mean"], std=inputs["std"]),
      source=dict(workdir=os.path.abspath(workdir), step=step, encoder=encoder))
  if fmt == "orbax":
    exported.save_encoder(out, enc_vars, info)
    return [os.path.abspath(out)]
  return _write_torch(out, convert.encoder_to_torch(enc_vars, enc_cfg), info)


def _torch_base(out: str) -> str:
  """OUT without a .safetensors, .pth or .pt ending."""
  for ending in (".safetensors", ".pth", ".pt"):
    if out.endswith(ending):
      return out[:-len(ending)]
  return out


def _write_torch(out: str, state_dict: dict[str, np.ndarray], info: dict[str, Any]
                 ) -> list[str]:
  """OUT.safetensors (architecture as metadata) and, with torch, OUT.pth."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  base = _torch_base(out)
  os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
  written = [base + ".safetensors"]
  save_file(dict(state_dict), written[0], metadata={"cvc_jax": json.dumps(info)})
  # safetensors writes through a private temporary file (mode 0600): give it the
  # mode any new file gets, as the .pth beside it has.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(written[0], 0o666 & ~umask)
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return written
  convert.save_torch(state_dict, base + ".pth")
  return written + [base + ".pth"]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # orbax logs every array it reads
  for path in export(f.workdir, f.out, fmt=f.format, encoder=f.encoder, step=f.step):
    print(f"Wrote {path}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "The pretraining workdir.")
  flags.DEFINE_string("out", None, "orbax: a folder; torch: a path (.safetensors and "
                      ".pth are written).")
  flags.DEFINE_enum("format", "orbax", _FORMATS, "What to write.")
  flags.DEFINE_enum("encoder", "backbone", exported.ENCODER_NAMES,
                    "Which encoder: the shared one (backbone), or with "
                    "model.separate_encoders the static (backbone_s) or "
                    "frame-difference (backbone_d) one.")
  flags.DEFINE_integer("step", None, "The checkpoint's step; default the newest.")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
