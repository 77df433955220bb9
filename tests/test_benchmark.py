"""The train-step benchmark (cvc_jax.benchmark) and its PyTorch baseline, tiny."""

import json
import os
import sys

from absl import flags
import numpy as np
import pytest

from configs import reference
from cvc_jax import benchmark

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


def test_peaks_and_mfu():
  assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 67.0
  assert benchmark.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
  assert benchmark.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 19.5
  assert benchmark.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
  assert benchmark.peak_tflops("TPU v5", "bfloat16") == 459.0
  assert benchmark.peak_tflops("TPU v4", "float32") == 275.0
  assert benchmark.peak_tflops("TPU v6 lite", "bfloat16") == 918.0
  assert benchmark.peak_tflops("cpu", "float32") is None
  s = _result().summary()
  assert s["step_time_median_s"] == 0.5
  assert s["videos_per_s"] == 32.0 and s["clips_per_s"] == 192.0
  # 4e14 FLOPs in 0.5 s on 2 devices of 989 TFLOP/s.
  np.testing.assert_allclose(s["mfu"], 4e14 / 0.5 / (2 * 989e12))
  assert _result(peak_tflops_per_device=None).summary()["mfu"] is None
  assert "MFU                 n/a" in benchmark.format_table(
      _result(peak_tflops_per_device=None))


def test_jax_benchmark_command_on_fake_devices(tmp_path, capsys):
  path = tmp_path / "bench.json"
  fv = flags.FlagValues()  # not the global flags: cvc_jax.main may have defined those
  benchmark.define_flags(fv)
  fv(["benchmark", "--config=" + os.path.join(ROOT, "configs/reference.py:runlocal"),
      "--steps=3", "--warmup=1", f"--json={path}"])
  benchmark.main(["benchmark"], fv)
  table = capsys.readouterr().out
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
  assert r["flops_per_step"] > 1e9 and r["mfu"] is None  # no peak known for CPUs
  assert r["peak_memory_bytes"] > 0 and "RSS" in r["peak_memory_source"]
  assert r["compile_time_s"] > 0
  assert f"{r['step_time_median_s'] * 1e3:.1f} ms" in table


def test_torch_baseline_counts_the_same_flops():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import torch_baseline  # pylint: disable=g-import-not-at-top
  config = reference.get_config("runlocal")
  args = torch_baseline.args_from_config(config, ["--steps=2", "--warmup=1"])
  assert (args.batch_size, args.frames, args.size, args.width, args.concepts) == (
      8, 4, 32, 8, 8)
  r = torch_baseline.run(args)
  assert len(r.step_times_s) == 2 and r.framework.startswith("torch")
  assert r.global_batch == 8 and r.clip_shape == (4, 32, 32)
  # The JAX step of this config has 1.88 GFLOPs by XLA's count (views and
  # elementwise work included); the operator count of the same model agrees.
  assert r.flops_per_step == pytest.approx(1.88e9, rel=0.15)
  assert "clips/s" in benchmark.format_table(r)
