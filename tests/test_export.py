"""Export: the orbax encoder restores without the trainer; the torch export loads
into the PyTorch encoder of its layout (tests/torch_reference) with the same outputs.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from configs import demo
from cvc_jax import export
from cvc_jax import pretrain
from cvc_jax.downstream import evaluate
from cvc_jax.models import exported
from cvc_jax.models import resnet3d
from tests.torch_reference.video_resnet import TorchHaraResNet, TorchVideoResNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a fresh process that restores an export must not have imported.
TRAINER_MODULES = ("cvc_jax.pretrain", "cvc_jax.main", "cvc_jax.input_pipeline",
                   "cvc_jax.datasets",
                   "cvc_jax.downstream", "cvc_jax.export", "cvc_jax.views",
                   "cvc_jax.losses", "tensorflow", "tensorflow_datasets", "clu", "grain")


def _random_state(config, views_shape):
  """A train state of `config` with random values in every leaf: traced, not run,
  so it costs no model initialisation. BatchNorm variances are positive, and the
  running statistics and affine terms are all non-trivial, so each of them
  matters in eval mode."""
  abstract = jax.eval_shape(functools.partial(
      pretrain.create_train_state, config, views_shape=views_shape, steps_per_epoch=2),
                            jax.random.key(0))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  keys = jax.random.split(jax.random.key(1), len(leaves))

  def fill(path, leaf, key):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.zeros(leaf.shape, leaf.dtype)
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jax.random.uniform(key, leaf.shape, minval=0.5, maxval=1.5)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 100
    return jax.random.normal(key, leaf.shape) / np.sqrt(fan_in)

  return jax.tree_util.tree_unflatten(
      treedef, [fill(p, l, k) for (p, l), k in zip(leaves, keys)])


def _workdir(path, encoder=None, separate=False):
  """A pretraining workdir: config.json and a checkpoint saved as pretrain saves."""
  config = demo.get_config()
  with config.unlocked():
    # 4-frame clips keep these tests fast, and the visualiser's tests' geometry
    # (clip offsets, controls 5 frames away) is laid out for them.
    config.input.num_frames = 4
    if encoder:
      config.model.encoder = encoder
    config.model.separate_encoders = separate
  t, s = config.input.num_frames, config.input.crop_size
  rng = jax.random.key(0)
  state = _random_state(config, (2, 6, t, s, s, 3))
  write_workdir(path, config.to_json_best_effort(),
                pretrain._checkpoint_tree(state, rng), step=3)  # pylint: disable=protected-access
  return config, state


def write_workdir(path, config_json: str, tree, *, step: int) -> str:
  """config.json and one orbax checkpoint of `tree`, laid out as pretraining
  leaves a workdir."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config_json)
  with ocp.CheckpointManager(os.path.join(path, "checkpoints")) as manager:
    manager.save(step, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
  return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("pretrain"))
  config, state = _workdir(path)
  return path, config, state


def _clips(config, seed=0, batch=2):
  t, s = config.input.num_frames, config.input.crop_size
  return np.random.default_rng(seed).normal(size=(batch, t, s, s, 3)).astype(np.float32)


_RESTORE = r"""
import sys
import numpy as np
from cvc_jax.models import exported
module, variables = exported.load_encoder(sys.argv[1])
pooled, fmap = module.apply(variables, np.load(sys.argv[2]), train=False)
np.savez(sys.argv[3], pooled=pooled, fmap=fmap)
print("IMPORTED", " ".join(sorted(sys.modules)))
"""


def test_orbax_export_restores_in_a_fresh_process_without_the_trainer(tmp_path, workdir):
  path, config, state = workdir
  out = str(tmp_path / "encoder")
  subprocess.run([sys.executable, "-m", "cvc_jax.export", f"--workdir={path}",
                  f"--out={out}"], cwd=ROOT, check=True, capture_output=True)
  info = json.load(open(os.path.join(out, exported.ARCH_FILE)))
  assert info["encoder"]["arch"] == "r2plus1d" and info["feature_dim"] == 64
  assert info["source"]["step"] == 3 and info["input"]["num_frames"] == 4

  clips = _clips(config)
  np.save(tmp_path / "clips.npy", clips)
  run = subprocess.run(
      [sys.executable, "-c", _RESTORE, out, str(tmp_path / "clips.npy"),
       str(tmp_path / "features.npz")], cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  imported = run.stdout.split("IMPORTED", 1)[1].split()
  trainer = [m for m in imported
             if any(m == t or m.startswith(t + ".") for t in TRAINER_MODULES)]
  assert not trainer, f"restoring an export imported {trainer}"

  # The same features as the checkpoint's own encoder.
  module = resnet3d.build_encoder(config.model.encoder)
  want = module.apply({"params": state.params["backbone"],
                       "batch_stats": state.batch_stats["backbone"]}, clips, train=False)
  got = np.load(tmp_path / "features.npz")
  np.testing.assert_allclose(got["pooled"], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["fmap"], want[1], rtol=1e-5, atol=1e-5)

  # And the downstream evaluators take the exported folder as init_from.
  with config.unlocked():
    config.init_from = out
  module, variables, described = evaluate.load_encoder(config)
  assert described.startswith("exported encoder")
  np.testing.assert_allclose(module.apply(variables, clips, train=False)[0], want[0],
                             rtol=1e-5, atol=1e-5)


def _torch_features(net, path, clips):
  net.load_state_dict(torch.load(path, weights_only=True), strict=True)
  with torch.no_grad():
    pooled, fmap = net.eval()(torch.from_numpy(clips).permute(0, 4, 1, 2, 3))
  return pooled.numpy(), fmap.permute(0, 2, 3, 4, 1).numpy()


@pytest.mark.parametrize("layout", ["torchvision", "hara"])
def test_torch_export_loads_strictly_and_agrees(tmp_path, workdir, layout):
  if layout == "torchvision":
    path, config, state = workdir
    net = TorchVideoResNet("r2plus1d", (1, 1, 1, 1), width=8)
  else:
    path = str(tmp_path / "hara")
    encoder = dict(arch="hara", depth=10, width=8, conv1_t_size=3)
    config, state = _workdir(path, encoder=encoder)
    net = TorchHaraResNet(10, width=8, conv1_t_size=3)
  umask = os.umask(0o022)  # whatever CI's: a mode that differs from 0600
  try:
    written = export.export(path, str(tmp_path / "enc.safetensors"), fmt="torch")
  finally:
    os.umask(umask)
  assert [os.path.basename(p) for p in written] == ["enc.safetensors", "enc.pth"]

  clips = _clips(config)
  pooled, fmap = _torch_features(net, written[1], clips)
  module = resnet3d.build_encoder(config.model.encoder)
  want = module.apply({"params": state.params["backbone"],
                       "batch_stats": state.batch_stats["backbone"]}, clips, train=False)
  scale = lambda x: float(np.abs(x).max())
  assert np.abs(pooled - want[0]).max() <= 1e-4 * scale(want[0])
  assert np.abs(fmap - want[1]).max() <= 1e-4 * scale(want[1])

  # The .safetensors holds the same tensors and the architecture as metadata.
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(written[0], "np") as f:
    info = json.loads(f.metadata()["cvc_jax"])
    pth = torch.load(written[1], weights_only=True)
    assert set(f.keys()) == set(pth)
    for key in f.keys():
      np.testing.assert_array_equal(f.get_tensor(key), pth[key].numpy(), err_msg=key)
  assert info["encoder"]["arch"] == config.model.encoder.arch
  # Both files have the mode any new file gets (safetensors writes 0600 itself).
  assert [os.stat(p).st_mode & 0o777 for p in written] == [0o644, 0o644]
  # An export never replaces an earlier one.
  with pytest.raises(FileExistsError, match="enc.safetensors exists; an export never"):
    export.export(path, str(tmp_path / "enc"), fmt="torch")


def test_separate_encoders_export_the_chosen_one(tmp_path, workdir):
  path = str(tmp_path / "separate")
  config, state = _workdir(path, separate=True)
  clips = _clips(config)
  module = resnet3d.build_encoder(config.model.encoder)
  for name in exported.ENCODER_NAMES:
    out = str(tmp_path / name)
    export.export(path, out, encoder=name)
    loaded, variables = exported.load_encoder(out)
    want = module.apply({"params": state.params[name],
                         "batch_stats": state.batch_stats[name]}, clips, train=False)[0]
    np.testing.assert_allclose(loaded.apply(variables, clips, train=False)[0], want,
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no encoder 'backbone_s'"):
    export.export(workdir[0], str(tmp_path / "x"), encoder="backbone_s")
  with pytest.raises(FileExistsError, match="backbone exists; an export never replaces"):
    export.export(path, str(tmp_path / "backbone"))


def test_the_exports_checkpointers_and_managers_are_closed(monkeypatch, tmp_path, workdir):
  # An open checkpointer or manager keeps orbax's machinery running until exit.
  opened, closed = [], []

  def recording(cls):
    class Recording(cls):
      def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        opened.append(self)

      def close(self):
        closed.append(self)
        super().close()
    return Recording

  for name in ("CheckpointManager", "StandardCheckpointer"):
    monkeypatch.setattr(ocp, name, recording(getattr(ocp, name)))
  path, step = exported.latest_checkpoint(workdir[0])
  assert step == 3 and path.endswith(os.path.join("checkpoints", "3", "default"))
  export.export(workdir[0], str(tmp_path / "export"))
  exported.load_encoder(str(tmp_path / "export"))
  kinds = [type(o).__mro__[1].__name__ for o in opened]
  assert set(kinds) == {"CheckpointManager", "StandardCheckpointer"}
  assert closed == opened
