r"""The train step compiled for an accelerator this machine lacks: memory and traffic.

    # a GPU: jax's CUDA plugin at jax's version (4.9 GB with CUDA's libraries), once
    pip install "jax-cuda12-plugin[with-cuda]==$JAX" "jax-cuda12-pjrt==$JAX"
    python benchmarks/compile_for.py --config=configs/ucf101.py --config.dtype=bfloat16 \
        --target=h100 --remats=none,dots,blocks [--json=FILE] [--hlo_dir=DIR]  # or h200
    # a TPU slice: the libtpu that jax[tpu] pins ("pip install jax[tpu]==$JAX" says)
    python benchmarks/compile_for.py --config=configs/ucf101.py --config.dtype=bfloat16 \
        --target=tpu:v5e:2x2

XLA compiles for a device from a description of it, with none present: jax's
deviceless ahead-of-time compilation (`jax.experimental.topologies`; for a GPU a
`GpuTargetConfig` with its core count, memory, compute capability and cuDNN
version, for a TPU the topology's name). Nothing runs. For each
rematerialisation policy in `--remats` this compiles the step of `python -m
cvc_jax.benchmark` at `--min_batch` (the global batch, split over the target's
devices) and twice that, finds the largest batch under `--fraction` of a
device's memory limit as `benchmarks/fit_batch.py` does on the device
(`benchmark.largest_batch`, by XLA's memory analysis), compiles that batch, and
prints a table: the memory at each batch, per video, the largest batch, the
convolutions the program at `--min_batch` runs (rematerialisation adds forward
ones) and what one device's kernels move per step: on a GPU from the optimised
HLO (`hlo_reading.kernel_traffic`, XLA's kernels and cuDNN's apart), on a TPU
XLA's cost analysis ("bytes accessed"). Cheaper than a card for the questions
of memory and fusion: what a batch needs, whether remat buys one, what a change
to the model's code does to the bytes XLA's kernels move (the step is
bandwidth-bound on an H100), and whether the step compiles for a TPU at all.

What the compile cannot see: times, and on a GPU cuDNN's choice of algorithm
(autotuning runs on the card; here every convolution takes its heuristic choice,
as `fit_batch.py`'s probes do with autotuning off), so no workspace beyond the
heuristic's. Checked against the H100 (benchmarks/RESULTS.md): stage 4's probes
on the card gave 23.02 and 45.55 GiB at 16 and 32 videos, this 23.01 and 45.55;
its trace's XLA kernels moved 72.9 GB (elementwise) and 40.7 GB (reductions) per
step at 16, this program's 72.4 and 40.0.

`--target=local` compiles for this machine's own devices the same way (no
plugin needed; the tests run it on the CPU). 'auto' in `conv_impl` and
`stem_impl` and the convolutions' compiler options are decided for the target's
device, not this machine's.
"""

import json
import os
import sys
import time

# The CUDA plugin checks the CUDA driver's version when it loads, and there is
# no driver here: the versions that matter are the target's.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
from jax.experimental import topologies
from ml_collections import config_flags

from cvc_jax import benchmark
from cvc_jax import costs
from cvc_jax import models
from cvc_jax import parallel
from cvc_jax import pretrain
from cvc_jax.models import convolutions
from cvc_jax.models import resnet3d
import hlo_reading  # pylint: disable=g-bad-import-order

# An H100 SXM (80GB HBM3) as XLA's GPU compiler sees it: its SM count, memory and
# caches as the card reports them (session 11: 132 SMs, 81559 MiB), compute
# capability 9.0, cuDNN 9.8 and CUDA 12.9 (jax 0.10's wheels). The memory limit
# is the allocator's bytes_limit on that card under gpu_run.sh's
# XLA_PYTHON_CLIENT_MEM_FRACTION=0.95: 75.2 GiB.
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 85520809984
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def _changed(text: str, *changes: tuple[str, str]) -> str:
  """`text` with each (old, new) replaced once; an old it lacks is an error."""
  for old, new in changes:
    if text.count(old) != 1:
      raise ValueError(f"{old!r} is not in the text exactly once.")
    text = text.replace(old, new)
  return text


# An H200 (141GB HBM3e): the H100 SXM's SMs, caches and clock (NVIDIA's
# datasheets), the memory session 8's card reported (143771 MiB) and its rated
# 4.8 TB/s. Its allocator's limit: 132.8 GiB, from session 8's stage 4 on the
# card, which filled "119.53 GiB (90 % of the allocator's limit)".
H200 = _changed(H100_SXM,
                ("memory_bandwidth: 3352320000000", "memory_bandwidth: 4800000000000"),
                ("device_memory_size: 85520809984", "device_memory_size: 150754820096"),
                ('"NVIDIA H100 80GB HBM3"', '"NVIDIA H200"'))
# name: (GpuTargetConfig text, memory limit GiB)
TARGETS = {"h100": (H100_SXM, 75.2), "h200": (H200, 132.8)}
# HBM per chip in GiB (Google Cloud's TPU system-architecture pages), the memory
# limit of a TPU target, by its lower-cased device_kind, first match wins. A v4
# topology compiled without a device has one device per TensorCore, half a chip,
# so it is left out: pass --memory_limit_gb.
TPU_HBM_GIB = (("tpu v5 lite", 16.0), ("tpu v5", 95.0), ("tpu v6 lite", 32.0))

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This script's flags; only when it runs as one, so that the tests can import
  it beside the scripts that define some of the same names."""
  config_flags.DEFINE_config_file("config", None, "Pretraining config.",
                                  lock_config=True)
  flags.DEFINE_string(
      "target", "h100", f"A GPU of {sorted(TARGETS)}, 'tpu:TOPOLOGY' (a TPU slice "
      "as jax names it: tpu:v5e:2x2, tpu:v5p:2x2x1, tpu:v6e:2x2), 'local' (this "
      "machine's devices) or a file holding a GpuTargetConfig in text form (then "
      "--memory_limit_gb too).")
  flags.DEFINE_list("remats", ["none", "dots", "blocks"],
                    f"Policies of {sorted(resnet3d.REMAT_POLICIES)} to compare.")
  flags.DEFINE_integer("min_batch", 16, "Smallest batch (and first probe).")
  flags.DEFINE_integer("max_batch", 1024, "Largest batch to consider.")
  flags.DEFINE_integer("multiple", 8, "Round the batch down to this.")
  flags.DEFINE_float("fraction", 0.9, "Share of the memory limit to fill.")
  flags.DEFINE_float("memory_limit_gb", None, "Memory limit per device in GiB; "
                     "default: the target's (required for a file).")
  flags.DEFINE_string("json", None, "Also write the rows to this file.")
  flags.DEFINE_string("hlo_dir", None, "Write each compiled program's HLO here "
                      "(REMAT_BATCH.hlo), for `profile_step.py` readings.")


def _log(message):
  print(message, file=sys.stderr, flush=True)


def target_devices(target: str) -> tuple[list, float | None]:
  """The devices to compile for and one's memory limit in GiB (None: not known)."""
  if target == "local":
    return jax.devices(), None
  if target.startswith("tpu:"):
    try:
      devices = topologies.get_topology_desc(target[4:], "tpu").devices
    except Exception as e:  # pylint: disable=broad-except  (libtpu's own message)
      raise app.UsageError(
          f"Could not describe the TPU slice {target[4:]!r} ({e}). Deviceless TPU "
          "compilation needs the libtpu that jax[tpu] pins for this jax: pip "
          f"install 'jax[tpu]=={jax.__version__}'.") from e
    kind = devices[0].device_kind.lower()
    return devices, next((gib for k, gib in TPU_HBM_GIB if kind.startswith(k)), None)
  if target in TARGETS:
    config, limit_gb = TARGETS[target]
  elif os.path.exists(target):
    with open(target) as f:
      config, limit_gb = f.read(), None
  else:
    raise app.UsageError(f"--target={target!r} is none of {sorted(TARGETS)}, "
                         "'tpu:TOPOLOGY', 'local' or a file.")
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=config,
                                            topology="1x1x1")
  except Exception as e:  # pylint: disable=broad-except  (the plugin's own message)
    raise app.UsageError(
        f"Could not describe the GPU ({e}). Deviceless GPU compilation needs jax's "
        "CUDA plugin at jax's version: pip install 'jax-cuda12-plugin[with-cuda]=="
        f"{jax.__version__}' 'jax-cuda12-pjrt=={jax.__version__}'.") from e
  return topology.devices, limit_gb


def for_device(config, device, batch: int, remat: str):
  """`config` at `batch` and `remat`, its 'auto' forms decided for `device`."""
  config = config.copy_and_resolve_references()
  encoder = config.model.encoder
  with config.unlocked():
    config.batch_size, config.remat = batch, remat
    encoder.conv_impl = convolutions.resolve_conv_impl(encoder.get("conv_impl", "auto"),
                                                       device)
    encoder.stem_impl = convolutions.resolve_stem_impl(encoder.get("stem_impl", "auto"),
                                                       config.dtype, device=device)
  return config


def compile_step(config, devices):
  """The step of `config` compiled for `devices` from shapes alone, with the
  options `TrainStep` uses on such a device and autotuning off (it needs the
  card): (compiled, seconds)."""
  mesh = parallel.data_mesh(config.batch_size, devices)
  step = pretrain.jitted_train_step(config, 1, mesh)
  args = costs.abstract_inputs(config, *parallel.shardings(mesh))
  options = dict(models.conv_compiler_options(config.dtype, devices[0]) or {})
  if devices[0].platform == "gpu":
    options["xla_gpu_autotune_level"] = 0
  start = time.perf_counter()
  compiled = step.trace(*args).lower().compile(compiler_options=options or None)
  return compiled, time.perf_counter() - start


def program_traffic(compiled, platform: str) -> tuple[int | None, dict[str, float]]:
  """(the convolution calls of a compiled step, the GB one device's kernels move
  per step by kind). A GPU's come from its optimised HLO; a TPU fuses its
  convolutions and writes matrix products as convolutions too, so only XLA's
  cost analysis of the whole program is given, and no count."""
  if platform == "tpu":
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return None, {"XLA (cost analysis)": cost["bytes accessed"] / 1e9}
  traffic = hlo_reading.kernel_traffic(compiled.as_text())
  calls = traffic.get("cuDNN convolutions") or traffic.get("convolution") or {"ops": 0}
  return calls["ops"], {kind: t["gb"] for kind, t in sorted(traffic.items())}


def compare(config, devices, *, remats, limit_bytes, min_batch, max_batch, multiple,
            hlo_dir=None) -> list[dict]:
  """One row per policy: memory at the probes and the largest batch, and what
  the program at `min_batch` calls and moves."""
  if min_batch % len(devices) or multiple % len(devices):
    raise ValueError(f"min_batch {min_batch} and multiple {multiple} must be multiples "
                     f"of the {len(devices)} devices: every batch is split over them.")
  rows = []
  for remat in remats:
    compiled = {}

    def need(batch, probe, remat=remat, compiled=compiled):
      del probe  # autotuning is off for every compilation here
      if batch not in compiled:
        c, seconds = compile_step(for_device(config, devices[0], batch, remat), devices)
        compiled[batch] = (c, seconds)
        _log(f"remat={remat} batch {batch}: {costs.compiled_bytes(c) / 2**30:.2f} "
             f"GiB, compiled in {seconds:.0f} s.")
        if hlo_dir:
          with open(os.path.join(hlo_dir, f"{remat}_{batch}.hlo"), "w") as f:
            f.write(c.as_text())
      return costs.compiled_bytes(compiled[batch][0])

    batch, nbytes, how = benchmark.largest_batch(
        need, min_batch=min_batch, max_batch=max_batch, multiple=multiple,
        limit=limit_bytes, log=_log)
    first, first_s = compiled[min_batch]
    conv_calls, traffic = program_traffic(first, devices[0].platform)
    row = {"remat": remat, "batch": batch, "gib": nbytes / 2**30, "how": how,
           "gib_by_batch": {b: costs.compiled_bytes(c) / 2**30
                            for b, (c, _) in sorted(compiled.items())},
           "convolutions": conv_calls,
           "traffic_gb": {k: round(gb, 2) for k, gb in traffic.items()},
           "compile_s": first_s}
    if max_batch > min_batch:
      row["gib_per_video"] = ((row["gib_by_batch"][2 * min_batch] -
                               row["gib_by_batch"][min_batch]) / min_batch)
    rows.append(row)
  return rows


def format_rows(rows: list[dict], min_batch: int, kind: str) -> str:
  """The comparison as a markdown table; batches are global, memory and traffic
  one device's."""
  xla = lambda r: sum(v for k, v in r["traffic_gb"].items() if k.startswith("XLA"))
  cudnn = lambda r: r["traffic_gb"].get("cuDNN convolutions")
  text = lambda value, spec: "-" if value is None else format(value, spec)
  lines = [f"Compiled for {kind} (nothing run): one device's memory by XLA's "
           f"analysis, its kernels' traffic in the program at {min_batch} videos.", "",
           f"| remat | GiB at {min_batch} | GiB at {2 * min_batch} | GiB per video | "
           "largest batch (GiB) | convolution calls | XLA kernels GB / step | "
           "cuDNN operands GB / step | compile s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    at = r["gib_by_batch"]
    lines.append(
        f"| {r['remat']} | {at[min_batch]:.2f} | {text(at.get(2 * min_batch), '.2f')} | "
        f"{text(r.get('gib_per_video'), '.3f')} | {r['batch']} ({r['gib']:.2f}) | "
        f"{text(r['convolutions'], 'd')} | {xla(r):.1f} | {text(cudnn(r), '.1f')} | "
        f"{r['compile_s']:.0f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = set(FLAGS.remats) - set(resnet3d.REMAT_POLICIES)
  if unknown:
    raise app.UsageError(f"--remats: {sorted(unknown)} not in "
                         f"{sorted(resnet3d.REMAT_POLICIES)}.")
  devices, limit_gb = target_devices(FLAGS.target)
  limit_gb = FLAGS.memory_limit_gb or limit_gb
  if limit_gb is None:
    raise app.UsageError(f"--target={FLAGS.target} has no known memory limit: pass "
                         "--memory_limit_gb.")
  if FLAGS.hlo_dir:
    os.makedirs(FLAGS.hlo_dir, exist_ok=True)
  rows = compare(FLAGS.config, devices, remats=FLAGS.remats,
                 limit_bytes=FLAGS.fraction * limit_gb * 2**30,
                 min_batch=FLAGS.min_batch, max_batch=FLAGS.max_batch,
                 multiple=FLAGS.multiple, hlo_dir=FLAGS.hlo_dir)
  print(format_rows(rows, FLAGS.min_batch,
                    f"{len(devices)} x {devices[0].device_kind}"))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"target": FLAGS.target, "device_kind": devices[0].device_kind,
                 "device_count": len(devices), "memory_limit_gib": limit_gb,
                 "fraction": FLAGS.fraction, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("config")
  app.run(main)
