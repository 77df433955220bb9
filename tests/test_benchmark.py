"""The train-step benchmark and its PyTorch baseline (tiny), and the GPU path's
freedom from TensorFlow; the other tools in benchmarks/ are tested in
tests/test_benchmark_tools.py."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import reference
from cvc_jax import benchmark
from cvc_jax import costs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_ROWS = ("framework", "device", "dtype", "global batch", "step time (median)",
              "step time spread", "videos/s", "clips/s", "FLOPs per step", "MFU",
              "peak memory", "compile time")


def _result(**kw):
  fields = dict(framework="x", device_kind="NVIDIA H100 80GB HBM3", device_count=2,
                dtype="bfloat16", global_batch=16, clip_shape=(16, 112, 112),
                step_times_s=[0.5, 0.4, 0.6, 0.5], flops_per_step=4.0e14,
                flops_source="test", peak_tflops_per_device=989.0,
                peak_memory_bytes=2**30, peak_memory_source="test", compile_time_s=1.0)
  return benchmark.Result(**dict(fields, **kw))


def test_mfu_and_throughput_of_a_result():
  s = _result().summary()
  assert s["step_time_median_s"] == 0.5
  assert s["videos_per_s"] == 32.0 and s["clips_per_s"] == 192.0
  # 4e14 FLOPs in 0.5 s on 2 devices of 989 TFLOP/s.
  np.testing.assert_allclose(s["mfu"], 4e14 / 0.5 / (2 * 989e12))
  assert _result(peak_tflops_per_device=None).summary()["mfu"] is None
  assert "MFU                 n/a" in benchmark.format_table(
      _result(peak_tflops_per_device=None))


# Modules the benchmark and the GPU path must not need (the GPU machine lacks them).
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "grain")


def _run_blocked(module, args, env=None):
  """`python -m module args` in a subprocess where importing BLOCKED fails."""
  code = (f"import runpy, sys\nfor m in {BLOCKED!r}: sys.modules[m] = None\n"
          f"sys.argv = [{module!r}] + {list(args)!r}\n"
          f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
  # The environment carries tests/conftest.py's 8 fake devices and XLA cache.
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=env, check=False)


def test_jax_benchmark_command_without_tensorflow_on_fake_devices(tmp_path):
  path = tmp_path / "bench.json"
  proc = _run_blocked("cvc_jax.benchmark", [
      "--config=" + os.path.join(ROOT, "configs/reference.py:runlocal"), "--steps=3",
      "--warmup=1", f"--json={path}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = proc.stdout
  for row in TABLE_ROWS:
    assert row in table, row
  r = json.loads(path.read_text())
  config = reference.get_config("runlocal")
  assert r["device_count"] == 8 and r["device_kind"] == "cpu"
  assert r["global_batch"] == config.batch_size == 8
  assert r["clip_shape"] == [4, 32, 32]
  assert len(r["step_times_s"]) == 3
  assert r["step_time_median_s"] == np.median(r["step_times_s"]) > 0
  assert r["step_time_min_s"] <= r["step_time_median_s"] <= r["step_time_max_s"]
  np.testing.assert_allclose(r["clips_per_s"], 6 * 8 / r["step_time_median_s"])
  # The FLOPs of the step it timed, exactly as step_flops counts them from shapes
  # alone (the same convolutions and products); no peak known for CPUs, so no MFU.
  assert r["flops_per_step"] == costs.step_flops(config)
  assert r["mfu"] is None
  assert r["peak_memory_bytes"] > 0 and "RSS" in r["peak_memory_source"]
  assert r["compile_time_s"] > 0
  assert "conv_impl=2d1d" in r["notes"] and "remat=none" in r["notes"]
  assert r["notes"].endswith(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")  # the 8 devices
  np.testing.assert_allclose(r["pipelined_clips_per_s"], 6 * 8 / r["pipelined_step_time_s"])
  assert f"{r['pipelined_step_time_s'] * 1e3:.1f} ms = " in table
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import summarize  # pylint: disable=g-import-not-at-top
  row = summarize.table([path]).splitlines()[-1]
  assert f"| {r['pipelined_step_time_s'] * 1e3:.1f} ({r['pipelined_clips_per_s']:.2f}) |" in row
  assert f"{r['step_time_median_s'] * 1e3:.1f} ms" in table


class _ScriptedStep(benchmark.TrainStep):
  """`TrainStep` with its compiled step replaced by a script of finite flags:
  the real `finish`, `result`, `__call__` and `wait`, nothing compiled."""

  def __init__(self, finite, log):  # pylint: disable=super-init-not-called
    self.config, self.log, self.devices = reference.get_config("runlocal"), log, jax.devices()
    self.compile_time, self.compiler_options = 1.0, None
    self.flops, self.flops_source = 1e9, "test"
    self.state, self.steps_run, self.nonfinite = jnp.zeros(()), 0, []
    self._finite = iter(finite)

  def launch(self):
    return {"finite": jnp.asarray(next(self._finite))}


def test_measure_counts_non_finite_steps_in_the_notes():
  logs = []
  # 1 warm-up, 2 timed, 2 pipelined: steps 3 and 5 not finite.
  step = _ScriptedStep([True, True, False, True, False], logs.append)
  notes = benchmark.measure(step, steps=2, warmup=1).notes
  assert (", non-finite loss or gradient in 2 of 5 steps (the first: step 3; state "
          "kept)") in notes
  assert len(logs) == 1 and "step 3 had a non-finite loss" in logs[0]
  assert "non-finite" not in benchmark.measure(
      _ScriptedStep([True] * 5, logs.append), steps=2, warmup=1).notes


def test_count_flops_command_compiles_nothing():
  proc = _run_blocked("cvc_jax.benchmark", [
      "--config=" + os.path.join(ROOT, "configs/reference.py:runlocal"),
      "--config.model.encoder.conv_impl=3d", "--config.batch_size=16", "--count_flops"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Compiling" not in proc.stderr
  config = reference.get_config("runlocal")
  config.model.encoder.conv_impl, config.batch_size = "3d", 16
  expected = costs.step_flops(config)
  assert proc.stdout.strip() == (f"{expected / 1e12:.3f} TFLOP per step: batch 16, "
                                 "conv_impl=3d, remat=none")
  # The views and heads aside, the count grows with the batch.
  config.batch_size = 8
  assert expected == pytest.approx(2 * costs.step_flops(config), rel=0.01)


def test_largest_batch_extrapolates_from_two_probes_and_steps_down():
  calls = []

  def need(batch, probe):  # 2 GiB + 0.5 GiB a video, and 1 GiB more past 40
    calls.append((batch, probe))
    return (2 + 0.5 * batch + (batch > 40)) * 2**30

  batch, nbytes, how = benchmark.largest_batch(
      need, min_batch=16, max_batch=1024, multiple=8, limit=24.5 * 2**30, log=str)
  # The probes say 45 videos fit, so 40 (a multiple of 8), which does: 22 GiB.
  assert (batch, nbytes) == (40, 22 * 2**30) and calls == [(16, True), (32, True),
                                                          (40, False)]
  assert "within 24.5 GiB" in how and "22.00 GiB" in how
  calls.clear()
  batch, nbytes, _ = benchmark.largest_batch(
      need, min_batch=16, max_batch=1024, multiple=4, limit=24.5 * 2**30, log=str)
  # 44 by the probes, but 25 GiB there (the step up past 40): one step down.
  assert (batch, nbytes) == (40, 22 * 2**30)
  assert calls == [(16, True), (32, True), (44, False), (40, False)]
  calls.clear()
  batch, _, how = benchmark.largest_batch(need, min_batch=16, max_batch=16, multiple=8,
                                          limit=4 * 2**30, log=str)
  assert batch == 16 and calls == [(16, False)] and "over 4.0 GiB" in how


def test_gpu_path_imports_without_tensorflow_clu_grain():
  proc = subprocess.run([sys.executable, "-c", (
      f"import sys\nfor m in {BLOCKED!r}: sys.modules[m] = None\n"
      "import cvc_jax.benchmark, cvc_jax.pretrain, cvc_jax.views, cvc_jax.losses\n"
      "import cvc_jax.sampling\n"
      "import cvc_jax.models.cvc, cvc_jax.models.heads, cvc_jax.models.resnet3d\n"
      "sys.path.insert(0, 'benchmarks')\n"
      "import fit_batch, compile_for, hlo_reading, summarize, time_views\n"
      "print('ok')")], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_torch_baseline_counts_the_same_flops():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import torch_baseline  # pylint: disable=g-import-not-at-top
  config = reference.get_config("runlocal")
  args = torch_baseline.args_from_config(config, ["--steps=2", "--warmup=1"])
  assert (args.batch_size, args.frames, args.size, args.width, args.concepts) == (
      8, 4, 32, 8, 8)
  r = torch_baseline.run(args)
  assert len(r.step_times_s) == 2 and r.framework.startswith("torch")
  assert r.pipelined_step_time_s > 0
  assert r.global_batch == 8 and r.clip_shape == (4, 32, 32)
  # One numerator for both frameworks' MFU: the JAX step's convolutions and
  # matrix products (2.06 GFLOP with 3D convolutions, the form the GPU runs;
  # view resizing included) and torch's operator count of its model (2.01).
  config.model.encoder.conv_impl = "3d"
  assert r.flops_per_step == pytest.approx(costs.step_flops(config), rel=0.05)
  assert "clips/s" in benchmark.format_table(r)
