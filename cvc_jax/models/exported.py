"""Encoders outside the trainer: exported folders and pretraining workdirs.

An exported encoder (`python -m cvc_jax.export`) is a folder with

    encoder.json   its architecture (the keys `resnet3d.build_encoder` reads), the
                   input it was trained on and where it came from;
    variables/     a plain orbax checkpoint of {'params', 'batch_stats'}.

Restoring one needs only orbax and `cvc_jax.models`, not the trainer, TensorFlow
or clu:

    from cvc_jax.models import exported
    module, variables = exported.load_encoder("/tmp/encoder")
    pooled, feature_map = module.apply(variables, clips, train=False)

where `clips` is float32 [B, T, H, W, 3], normalised with the mean and std in
encoder.json.
"""

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from cvc_jax.models import resnet3d

ARCH_FILE = "encoder.json"
VARIABLES_DIR = "variables"
FORMAT = "cvc_jax.encoder/1"
# The encoders of a pretraining checkpoint: one shared, or one per kind of view.
ENCODER_NAMES = ("backbone", "backbone_s", "backbone_d")


def is_exported(path: str) -> bool:
  """True for a folder written by `save_encoder`."""
  return os.path.isfile(os.path.join(path, ARCH_FILE))


def save_encoder(path: str, variables: dict[str, Any], info: dict[str, Any]) -> None:
  """Writes an encoder's variables and `info` (with an `encoder` config) to `path`.

  Args:
    path: the folder to create; it must not hold an earlier export.
    variables: {'params', 'batch_stats'} of the encoder.
    info: JSON-able; `info['encoder']` is the config `resnet3d.build_encoder`
      takes. `format` and `feature_dim` are added.
  """
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  info = dict(info, format=FORMAT, feature_dim=resnet3d.feature_dim(info["encoder"]))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, VARIABLES_DIR),
                      {c: variables[c] for c in ("params", "batch_stats")})
    checkpointer.wait_until_finished()
  # The JSON last: a folder with encoder.json is a complete export.
  with open(os.path.join(path, ARCH_FILE), "w") as f:
    json.dump(info, f, indent=2)


def read_info(path: str) -> dict[str, Any]:
  """The encoder.json of an exported folder."""
  with open(os.path.join(path, ARCH_FILE)) as f:
    info = json.load(f)
  if info.get("format") != FORMAT:
    raise ValueError(f"{path}: {ARCH_FILE} has format {info.get('format')!r}; this "
                     f"version of cvc_jax reads {FORMAT!r}.")
  return info


def load_encoder(path: str, dtype=jnp.float32):
  """The encoder module and its variables from an exported folder.

  Returns:
    (module, {'params', 'batch_stats'}): `module.apply(variables, x, train=False)`
    gives (pooled [B, D], feature map [B, T', H', W', D]) for x [B, T, H, W, 3].
  """
  info = read_info(path)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.path.join(os.path.abspath(path), VARIABLES_DIR))
  variables = {c: jax.tree_util.tree_map(jnp.asarray, restored[c])
               for c in ("params", "batch_stats")}
  return resnet3d.build_encoder(info["encoder"], dtype=dtype), variables


def latest_checkpoint(workdir: str, step: int | None = None) -> tuple[str, int]:
  """(path of the checkpoint's item, step): `step`, or the newest finished one."""
  ckpts = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(ckpts):
    raise FileNotFoundError(f"{workdir!r} has no checkpoints/ (nor {ARCH_FILE}): give a "
                            "pretraining workdir or an exported encoder.")
  if step is None:
    with ocp.CheckpointManager(ckpts) as manager:
      step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"No finished checkpoint in {ckpts}.")
  path = os.path.join(ckpts, str(step), "default")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint of step {step} in {ckpts}.")
  return path, step


def read_checkpoint(path: str):
  """The whole tree of the checkpoint item at `path`, on this process's first
  device, whatever devices wrote it: orbax would otherwise place it as saved, and
  refuse a checkpoint of several processes."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata.tree)
    return checkpointer.restore(path, target)


def read_workdir(workdir: str, *, step: int | None = None) -> tuple[dict, dict, int]:
  """The config and the model variables of a pretraining checkpoint.

  Reads the workdir's config.json and the checkpoint's `params` and
  `batch_stats` (the whole CVCModel's, not the optimiser state or queues).

  Returns:
    (config as a dict, {'params', 'batch_stats'}, step).
  """
  path, step = latest_checkpoint(workdir, step)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  restored = read_checkpoint(path)
  variables = {c: jax.tree_util.tree_map(jnp.asarray, restored[c])
               for c in ("params", "batch_stats")}
  return config, variables, step


def encoder_from_workdir(workdir: str, *, encoder: str = "backbone",
                         step: int | None = None) -> tuple[dict, dict, int]:
  """One encoder of a pretraining checkpoint, and the run's config.

  Args:
    workdir: the pretraining workdir (config.json, checkpoints/).
    encoder: 'backbone' (the shared encoder; with separate encoders, the RGB
      one), 'backbone_s' or 'backbone_d' (the static and frame-difference
      encoders of `model.separate_encoders`).
    step: which checkpoint; None for the newest.

  Returns:
    (the run's config as a dict, whose `model.encoder` builds the encoder,
    the encoder's {'params', 'batch_stats'}, step).
  """
  if encoder not in ENCODER_NAMES:
    raise ValueError(f"encoder must be one of {ENCODER_NAMES}, got {encoder!r}.")
  config, variables, step = read_workdir(workdir, step=step)
  if encoder not in variables["params"]:
    have = [n for n in ENCODER_NAMES if n in variables["params"]]
    raise ValueError(f"{workdir} has no encoder {encoder!r}, only {have} "
                     "(separate encoders exist only with model.separate_encoders).")
  return config, {c: variables[c][encoder] for c in ("params", "batch_stats")}, step
