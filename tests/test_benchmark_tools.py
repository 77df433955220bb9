"""The tools in benchmarks/ that the GPU script runs, on CPU: the script's stages
end to end, profiles and kernel traffic read from GPU traces and HLO, the
deviceless compile for a named card, and the per-pass timers (norm fusions,
views, convolution forms)."""

import gzip
import json
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import reference
from configs import ucf101
from cvc_jax.models import resnet3d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_norm_fusions_times_every_pass_per_channel_count():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import norm_fusions  # pylint: disable=g-import-not-at-top
  rows = norm_fusions.run(4096, [16, 23], reps=1)
  assert [(c, name) for c, name, _, _ in rows] == [
      (c, name) for c in (16, 23)
      for name in ("copy", "stats", "stats_wide", "forward", "backward")]
  assert all(t > 0 and rate > 0 for _, _, t, rate in rows)
  # The forward pass is the encoder's BatchNorm and ReLU.
  x = jax.random.normal(jax.random.key(0), (64, 16), jnp.bfloat16)
  y, _ = resnet3d.BatchNorm().init_with_output(jax.random.key(1), x)
  np.testing.assert_array_equal(norm_fusions._forward(x), jax.nn.relu(y))
  for wide, plain in zip(norm_fusions._stats_wide(x), norm_fusions._stats(x)):
    np.testing.assert_allclose(wide, plain, rtol=1e-5, atol=1e-6)


def test_gpu_script_runs_its_stages_on_cpu(tmp_path):
  # benchmarks/gpu_run.sh's frame (packages, caches, stage timeouts, the summary)
  # with its quickest stage; RESULTS.md has the dry runs of the others.
  env = dict(os.environ, OUT=str(tmp_path / "out"), STAGES="9", DEADLINE="120",
             JAX_CACHE=str(tmp_path / "cache"), NORM_EXTRA="--elements=4096 --reps=1")
  proc = subprocess.run(["bash", "benchmarks/gpu_run.sh"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "=== norm_fusions: exit 0" in proc.stdout
  assert proc.stdout.count(" backward ") == 5  # one line per channel count
  assert (tmp_path / "out" / "log").read_text() == proc.stdout
  assert (tmp_path / "out" / "jax_cache.tar.gz").exists()


def test_profile_reads_device_time_per_op_from_a_gpu_trace(tmp_path, capsys):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import hlo_reading  # pylint: disable=g-import-not-at-top
  import profile_step  # pylint: disable=g-import-not-at-top
  # A cuDNN convolution as the optimised HLO of a GPU step writes it, and two
  # identical fusions that XLA compiled once (one deduplicated_name).
  hlo = ('  %cudnn-conv.2 = (bf16[96,16,56,56,45]{4,3,2,1,0}, u8[77]{0}) custom-call('
         '%a, %b), window={size=1x7x7 stride=1x2x2}, dim_labels=b012f_o012i->b012f, '
         'custom_call_target="__cudnn$convForward", metadata={op_name="jit(step_fn)/'
         'jvp(CVCModel)/backbone/stem_0/conv_general_dilated"}\n'
         '  %p = bf16[1000,1000]{1,0} parameter(0)\n'
         '  %loop_fusion.1 = bf16[1000,1000]{1,0} fusion(%p), kind=kLoop, calls=%fused_1, '
         'metadata={op_name="jit(step_fn)/jvp(CVCModel)/max" '
         'deduplicated_name="loop_fusion.1"}\n'
         '  %loop_fusion.2 = bf16[1000,1000]{1,0} fusion(%loop_fusion.1), kind=kLoop, '
         'calls=%fused_1, metadata={deduplicated_name="loop_fusion.1"}\n'
         '  ROOT %input_reduce_fusion = f32[1000]{0} fusion(%loop_fusion.2), kind=kInput, '
         'calls=%f\n')
  ops = hlo_reading.hlo_ops(hlo)
  assert ops["cudnn-conv.2"].startswith("custom-call (bf16[96,16,56,56,45]")
  assert "dim_labels=b012f_o012i->b012f" in ops["cudnn-conv.2"]
  assert 'custom_call_target="__cudnn$convForward"' in ops["cudnn-conv.2"]
  assert "kind=kLoop" in ops["loop_fusion.1"]
  assert profile_step.step_part(ops["cudnn-conv.2"]) == "forward"
  nbytes = hlo_reading.op_bytes(hlo)
  assert nbytes["loop_fusion.1"] == 4_000_000  # reads and writes 1000 x 1000 bf16
  assert nbytes["input_reduce_fusion"] == 2_004_000
  assert nbytes["cudnn-conv.2"] == 96 * 16 * 56 * 56 * 45 * 2  # not its u8 scratch
  assert hlo_reading.kernel_sharers(hlo) == {"loop_fusion.1": ["loop_fusion.2"],
                                              "loop_fusion.2": ["loop_fusion.1"]}
  trace = tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz"
  trace.parent.mkdir(parents=True)
  # The event forms of a jax 0.11 trace on an H200: host thunks carry the op's
  # name; kernels name their op in args.hlo_op, or, inside a command buffer,
  # through their own name ("_" for the "."), one name for every op that runs
  # the kernel (here both loop fusions of one step).
  cuda_graph = {"hlo_op": "command_buffer_7"}
  events = [
      {"ph": "X", "name": "fusion.1", "dur": 900},
      {"ph": "X", "name": "sm90_xmma_fprop", "dur": 30, "args": {"hlo_op": "cudnn-conv.2"}},
      {"ph": "X", "name": "nhwcAddPaddingKernel", "dur": 12,
       "args": {"hlo_op": "cudnn-conv.2"}},
      {"ph": "X", "name": "loop_fusion_1", "dur": 2, "args": cuda_graph},
      {"ph": "X", "name": "loop_fusion_1", "dur": 2, "args": cuda_graph},
      {"ph": "X", "name": "input_reduce_fusion", "dur": 4, "args": cuda_graph},
      {"ph": "X", "name": "memcpy128", "dur": 1, "args": cuda_graph},
      {"ph": "i", "name": "marker"}]
  with gzip.open(trace, "wt") as f:
    json.dump({"traceEvents": events}, f)
  times, runs, kernels = profile_step.op_times(str(tmp_path), ops.keys())
  assert times == {"cudnn-conv.2": 42, "loop_fusion.1": 4, "input_reduce_fusion": 4,
                   "command_buffer_7": 1}
  assert runs == {"loop_fusion.1": 2, "input_reduce_fusion": 1}  # no cuDNN kernel
  assert kernels["nhwcAddPaddingKernel"] == 12 and sum(kernels.values()) == 51
  # Without the padding kernel, the two XLA kernels' 10.004 MB at 1000 GB/s.
  floor = profile_step.step_floor(profile_step.read_hlo(hlo), times, runs, kernels, 1, 1000)
  assert floor == pytest.approx({"cudnn_ms": 0.042, "padding_ms": 0.012, "xla_ms": 0.008,
                                 "xla_gb": 0.010004, "rest_ms": 0.001,
                                 "floor_ms": 0.030 + 0.010004 + 0.001})
  profile_step.print_table(profile_step.read_hlo(hlo), times, 51, 1, runs, kernels,
                           "device time")
  table = capsys.readouterr().out
  # 2 runs of 4 MB in 4 us; the reduction 2 MB in 4 us; per kind of fusion too.
  assert "   2x   2000 GB/s  loop_fusion.1: fusion" in table
  assert "[one kernel with loop_fusion.2]" in table
  assert "   1x    501 GB/s  input_reduce_fusion: fusion" in table
  assert ("kLoop 0.008 GB per step at 2000 GB/s, kInput 0.002 GB per step at 501 GB/s") in table
  assert re.search(r"\s{17}  cudnn-conv.2: custom-call", table)
  # A CPU trace (no kernels) is summed by event name.
  with gzip.open(trace, "wt") as f:
    json.dump({"traceEvents": events[:1] + events[-1:]}, f)
  assert profile_step.op_times(str(tmp_path), ops.keys()) == ({"fusion.1": 900}, {}, {})


def test_kernel_traffic_sums_kernels_by_kind_through_loops_and_branches():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import hlo_reading  # pylint: disable=g-import-not-at-top
  mib = "bf16[1024,512]{1,0}"  # 1 MiB
  hlo = (f"%body (p: {mib}) -> {mib} {{\n"
         f"  %p = {mib} parameter(0)\n"
         f"  ROOT %loop_fusion.9 = {mib} fusion(%p), kind=kLoop, calls=%f9\n}}\n\n"
         f"%cond (p: {mib}) -> pred[] {{\n"
         f"  %p = {mib} parameter(0)\n"
         "  ROOT %c = pred[] constant(false)\n}\n\n"
         f"%yes (p: {mib}) -> {mib} {{\n"
         f"  %p = {mib} parameter(0)\n"
         f"  ROOT %copy.1 = {mib} copy(%p)\n}}\n\n"
         f"%no (p: {mib}) -> {mib} {{\n"
         f"  ROOT %p = {mib} parameter(0)\n}}\n\n"
         f"ENTRY %main (a: {mib}, k: bf16[3,3,512,512]) -> {mib} {{\n"
         f"  %a = {mib} parameter(0)\n"
         "  %k = bf16[3,3,512,512]{3,2,1,0} parameter(1)\n"
         f"  %conv = ({mib}, u8[4096]{{0}}) custom-call(%a, %k), "
         'custom_call_target="__cudnn$convForward"\n'
         f"  %gte = {mib} get-tuple-element(%conv), index=0\n"
         f"  %loop_fusion = {mib} fusion(%gte, %a), kind=kLoop, calls=%f1\n"
         "  %input_reduce_fusion = f32[512]{0} fusion(%loop_fusion), kind=kInput, "
         "calls=%f2\n"
         f"  %w = {mib} while(%loop_fusion), condition=%cond, body=%body\n"
         "  %i = s32[] constant(0)\n"
         f"  ROOT %b = {mib} conditional(%i, %w, %w), branch_computations={{%yes, %no}}"
         "\n}\n")
  traffic = hlo_reading.kernel_traffic(hlo)
  m = 2**20 / 1e9
  assert traffic.keys() == {"cuDNN convolutions", "XLA elementwise fusions",
                            "XLA reductions and transposes", "copies"}
  conv = traffic["cuDNN convolutions"]
  assert conv["ops"] == 1 and conv["gb"] == pytest.approx(2 * m + 9 * 512 * 512 * 2 / 1e9)
  # The entry's fusion (2 reads, 1 write) and the loop body's (1 and 1), once each.
  assert traffic["XLA elementwise fusions"] == {"ops": 2, "gb": pytest.approx(5 * m)}
  assert traffic["XLA reductions and transposes"] == {
      "ops": 1, "gb": pytest.approx(m + 512 * 4 / 1e9)}
  assert traffic["copies"] == {"ops": 1, "gb": pytest.approx(2 * m)}  # a branch's


def test_compile_for_describes_an_h200_as_an_h100_with_its_memory():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import compile_for  # pylint: disable=g-import-not-at-top
  h100, h200 = (compile_for.TARGETS[k][0].splitlines() for k in ("h100", "h200"))
  changed = {(a.strip(), b.strip()) for a, b in zip(h100, h200) if a != b}
  assert len(h100) == len(h200) and changed == {
      ("memory_bandwidth: 3352320000000", "memory_bandwidth: 4800000000000"),
      ("device_memory_size: 85520809984", "device_memory_size: 150754820096"),
      ('device_description_str: "NVIDIA H100 80GB HBM3"',
       'device_description_str: "NVIDIA H200"')}
  assert compile_for.TARGETS["h200"][1] == pytest.approx(119.53 / 0.9, abs=0.05)
  with pytest.raises(ValueError, match="exactly once"):
    compile_for._changed("core_count: 132", ("core_count: 144", "x"))  # pylint: disable=protected-access


def test_compile_for_compiles_the_step_for_a_device_from_shapes(monkeypatch):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import compile_for  # pylint: disable=g-import-not-at-top
  config = reference.get_config("runlocal")
  config.dtype = "bfloat16"
  card = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
  on_card = compile_for.for_device(config, card, 24, "blocks")
  assert (on_card.batch_size, on_card.remat) == (24, "blocks")
  assert on_card.model.encoder.conv_impl == "3d"
  assert on_card.model.encoder.stem_impl == "space_to_depth"
  here = compile_for.for_device(config, jax.devices()[0], 2, "none")
  assert (here.model.encoder.conv_impl, here.model.encoder.stem_impl) == ("2d1d", "conv")
  # One compilation for this CPU, nothing allocated: what the step needs by
  # XLA's analysis, and the kernels it runs.
  with pytest.raises(ValueError, match="multiples of the 8 devices"):
    compile_for.compare(config, jax.devices(), remats=["none"], limit_bytes=2**30,
                    min_batch=2, max_batch=2, multiple=2)
  rows = compile_for.compare(config, jax.devices()[:1], remats=["none"], limit_bytes=2**30,
                         min_batch=2, max_batch=2, multiple=2)
  (row,) = rows
  assert row["batch"] == 2 and 0.005 < row["gib"] < 1 and row["convolutions"] > 0
  assert row["traffic_gb"]["XLA elementwise fusions"] > 0
  table = compile_for.format_rows(rows, 2, "1 x cpu")
  assert re.search(r"\| none \| [\d.]+ \| - \| - \| 2 \([\d.]+\) \| \d+ \| [\d.]+ \| - \|",
                   table), table
  # A GPU target needs jax's CUDA plugin; without it the error says what to install.
  try:
    devices, limit_gb = compile_for.target_devices("h100")
  except compile_for.app.UsageError as e:
    assert f"jax-cuda12-plugin[with-cuda]=={jax.__version__}" in str(e)
  else:
    assert devices[0].device_kind == "NVIDIA H100 80GB HBM3" and limit_gb == 75.2
  # A TPU's program: XLA's cost analysis, no convolution count (its fusions hold
  # the convolutions, and matrix products are convolutions there too).
  tpu_program = types.SimpleNamespace(cost_analysis=lambda: [{"bytes accessed": 6.2e10}])
  assert compile_for.program_traffic(tpu_program, "tpu") == (
      None, {"XLA (cost analysis)": 62.0})
  rows = [dict(rows[0], convolutions=None, traffic_gb={"XLA (cost analysis)": 62.0})]
  assert "| - | 62.0 | - |" in compile_for.format_rows(rows, 2, "4 x TPU v5 lite")
  with pytest.raises(compile_for.app.UsageError, match="'tpu:TOPOLOGY', 'local' or a file"):
    compile_for.target_devices("h101")
  # A TPU slice needs libtpu; without it the error says so.
  try:
    devices, limit_gb = compile_for.target_devices("tpu:v5e:2x2")
  except compile_for.app.UsageError as e:
    assert f"jax[tpu]=={jax.__version__}" in str(e)
  else:
    assert len(devices) == 4 and devices[0].device_kind == "TPU v5 lite"
    assert limit_gb == 16.0


def test_time_views_builds_the_views_of_a_config_per_call():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import time_views  # pylint: disable=g-import-not-at-top
  config = ucf101.get_config("runlocal")
  assert config.input.blur  # the path the blur's rewrite changed
  times = time_views.time_views(config, batch=1, reps=2)
  assert len(times) == 2 and all(t > 0 for t in times)


def test_conv_forms_times_the_stem_in_each_form_asked_for():
  proc = subprocess.run(
      [sys.executable, "benchmarks/conv_forms.py", "--config=configs/reference.py:runlocal",
       "--config.batch_size=1", "--stem", "--reps=1", "--stem_conv_impls=3d,2d1d"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = re.findall(r"conv_impl=(\S+) +stem_impl=(\S+) +forward +([\d.]+) ms .*"
                    r"kernel gradient +([\d.]+) ms", proc.stdout)
  assert [(impl, stem) for impl, stem, _, _ in rows] == [
      (impl, stem) for impl in ("3d", "2d1d") for stem in ("conv", "space_to_depth")
  ], proc.stdout
  assert all(float(fwd) > 0 and float(dw) > 0 for _, _, fwd, dw in rows)
  # runlocal: 6 clips of 4x32x32 frames, width 8 (R(2+1)D's stem: 45 * 8 // 64 = 5).
  assert "(6, 4, 32, 32, 3) -> (6, 4, 16, 16, 5)" in proc.stdout
