"""The pretraining program end to end on the tiny synthetic data set.

`python -m cvc_jax.main` runs in subprocesses (as a user runs it); the resume test
kills one with SIGKILL at a random moment and checks the parameters bitwise.
"""

import contextlib
import glob
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo, ucf101
from cvc_jax import checkpointing, pretrain
from tests import overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8  # tiny synthetic train split: 16 videos / batch 8 = 2 steps per epoch


def _overrides(data_dir):
  return {**overrides.tiny_pretraining(data_dir, STEPS), "log_every_steps": 2,
          "loss.loc_start_epoch": 2}


def _config(data_dir):
  return overrides.apply(demo.get_config(), _overrides(data_dir))


def _main(workdir, data_dir, *extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
  return subprocess.Popen(
      [sys.executable, "-m", "cvc_jax.main", "--config=configs/demo.py",
       f"--workdir={workdir}", *overrides.flags(_overrides(data_dir)), *extra], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final_params(workdir):
  path = os.path.join(workdir, "checkpoints", str(STEPS), "default")
  return ocp.StandardCheckpointer().restore(path)["params"]


def _scalar_tags(workdir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  return {tag: [e for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}


def test_main_runs_and_resumes_bitwise_after_sigkill(tmp_path, data_dir):
  # 1) An uninterrupted run: checkpoints, TensorBoard scalars for every term,
  #    config.json, and a loss that falls.
  full = str(tmp_path / "full")
  out = _main(full, data_dir).communicate(timeout=600)[0]
  assert os.path.exists(os.path.join(full, "config.json")), out[-3000:]
  assert os.path.isdir(os.path.join(full, "checkpoints", str(STEPS))), out[-3000:]
  tags = _scalar_tags(full)
  for name in pretrain.TERMS + ("total", "lr", "grad_norm", "steps_per_sec",
                                "clips_per_sec"):
    assert name in tags, f"no TensorBoard scalar {name!r}; have {sorted(tags)}"

  # 2) The same run stopped by a preemption signal (SIGTERM: it saves and exits
  #    cleanly), resumed, killed with SIGKILL at a random moment after its next
  #    checkpoint, and started again with the same command each time.
  killed = str(tmp_path / "killed")

  def start_and_wait_for_checkpoint():
    proc = _main(killed, data_dir)
    before = set(glob.glob(os.path.join(killed, "checkpoints", "[0-9]*")))
    deadline = time.time() + 300
    while not set(glob.glob(os.path.join(killed, "checkpoints", "[0-9]*"))) - before:
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
      time.sleep(0.1)
    return proc

  proc = start_and_wait_for_checkpoint()
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "Stopped at step" in out or os.path.isdir(
      os.path.join(killed, "checkpoints", str(STEPS))), out[-3000:]
  proc = start_and_wait_for_checkpoint()
  time.sleep(random.uniform(0.0, 2.0))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = _main(killed, data_dir).communicate(timeout=600)[0]
  assert os.path.isdir(os.path.join(killed, "checkpoints", str(STEPS))), out[-3000:]

  want, got = _final_params(full), _final_params(killed)
  for path, leaf in jax.tree_util.tree_flatten_with_path(want)[0]:
    other = got
    for key in path:
      other = other[key.key]
    np.testing.assert_array_equal(other, leaf, err_msg=jax.tree_util.keystr(path))

  # 3) Resuming with a config whose model does not fit the checkpoints is refused,
  #    naming a parameter, and leaves config.json (the checkpoints' config) as it was.
  with open(os.path.join(full, "config.json")) as f:
    before = f.read()
  proc = _main(full, data_dir, "--config.model.encoder.width=16")
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode != 0
  assert "does not fit this run's config: " in out, out[-3000:]
  assert "params/backbone/" in out and "in the checkpoint," in out, out[-3000:]
  assert "Event loop is closed" not in out, out[-3000:]
  with open(os.path.join(full, "config.json")) as f:
    assert f.read() == before


def test_preemption_awaits_the_last_save_before_giving_sigterm_back():
  class Manager:  # what Preemption uses of orbax's CheckpointManager, one process
    def __init__(self):
      self.handlers_while_waiting = []

    def wait_until_finished(self):
      self.handlers_while_waiting.append(signal.getsignal(signal.SIGTERM))

  previous = signal.getsignal(signal.SIGTERM)
  for fail in (False, True):  # the loop ending, or raising
    manager = Manager()
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
      with checkpointing.Preemption(manager) as preemption:
        ours = signal.getsignal(signal.SIGTERM)
        assert ours is not previous and not preemption.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.reached(1)
        if fail:
          raise RuntimeError("a step failed")
    # The save was awaited once, under our handler; then the old one is back.
    assert manager.handlers_while_waiting == [ours]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_nonfinite_loss_stops_naming_step_and_term(tmp_path, data_dir, monkeypatch):
  real = pretrain.compute_losses

  def poisoned(out, config, *, queue=None, epoch=0):
    terms = real(out, config, queue=queue, epoch=epoch)
    bad = jax.numpy.where(epoch >= 1, jax.numpy.nan, terms["rec_s"])  # steps 2, 3, ...
    terms["total"] = terms["total"] - terms["rec_s"] + bad
    terms["rec_s"] = bad
    return terms

  monkeypatch.setattr(pretrain, "compute_losses", poisoned)
  workdir = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match=r"step 2 .*rec_s.*step 2\) is intact"):
    pretrain.train_and_evaluate(_config(data_dir), workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) == [1, 2]
  params = ocp.StandardCheckpointer().restore(os.path.join(ckpts, "2", "default"))["params"]
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_a_misspelt_config_key_is_one_line_naming_it(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "cvc_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--config.bacth_size=2"], cwd=ROOT,
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert "FATAL: no such config key: 'bacth_size'" in proc.stderr, proc.stderr[-2000:]
  assert 'Did you mean "batch_size"' in proc.stderr and "Traceback" not in proc.stderr
  assert not os.listdir(tmp_path)  # nothing written


def test_process_flags_without_distributed_are_refused(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "cvc_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--num_processes=2", "--process_id=1"], cwd=ROOT,
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert ("--num_processes, --process_id take effect only with --distributed"
          in proc.stderr), proc.stderr[-2000:]
  assert not os.listdir(tmp_path)  # nothing written


def test_a_config_files_own_attribute_error_keeps_its_traceback(tmp_path):
  # Not reported as a misspelt override: the bug is in the file, at its line.
  config_file = tmp_path / "broken.py"
  config_file.write_text("from configs import demo\n\n\ndef get_config():\n"
                         "  return demo.get_config().no_such_field\n")
  proc = subprocess.run(
      [sys.executable, "-m", "cvc_jax.main", f"--config={config_file}",
       f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 1
  assert "no such config key" not in proc.stderr
  assert "Traceback" in proc.stderr and "no_such_field" in proc.stderr, proc.stderr[-2000:]
  assert f'File "{config_file}", line 5' in proc.stderr


# Every named variant that differs from the defaults (supplementary Tables 1-5).
VARIANTS = ["sigma=linear", "sigma=mlp", "decoder=linear", "decoder=128", "topk=2",
            "topk=10", "encoders=separate", "backbone=r2plus1d18_224", "backbone=r3d34",
            "backbone=r3d50"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_takes_a_step(variant):
  config = ucf101.get_config(f"{variant},runlocal")
  # runlocal shrinks the variant, but it is still a variant.
  assert config.to_dict() != ucf101.get_config("runlocal").to_dict()
  t, (h, w) = config.input.num_frames, config.input.raw_size
  frames = np.random.default_rng(0).integers(0, 256, (4, 2 * t, h, w, 3), np.uint8)
  state = pretrain.init_train_state(config, jax.random.key(0),
                                   pretrain.views_shape_of(config, batch=4), 1)
  batch = {"frames": frames, "sizes": np.tile(np.int32([h, w]), (4, 1))}
  new, metrics = jax.jit(pretrain.frames_train_step(config, steps_per_epoch=1))(
      state, batch, jax.random.key(1))
  assert bool(metrics["finite"]) and int(new.step) == 1
  assert not np.allclose(new.params["fvv_0"]["kernel"], state.params["fvv_0"]["kernel"])
  if variant == "encoders=separate":
    assert {"backbone", "backbone_s", "backbone_d"} <= set(new.params)
  if variant == "decoder=128":  # runlocal: 128 / 16
    assert new.params["gv_0"]["kernel"].shape == (2 * config.model.num_concepts, 8)
  if variant == "backbone=r3d50":  # bottleneck blocks: D = width x 8 x 4
    assert config.model.sigma_dim is None  # unset: the concept space follows D
    assert new.params["fvv_0"]["kernel"].shape[0] == 8 * 8 * 4
