r"""Train-step throughput on synthetic frames: step time, clips/s, FLOPs, MFU, memory.

    python -m cvc_jax.benchmark --config=configs/reference.py --config.batch_size=2
    python -m cvc_jax.benchmark --config=configs/ucf101.py --config.dtype=bfloat16 \
        --config.batch_size=64 --remat=dots --json=/tmp/bench.json

Times the whole jitted step of `cvc_jax.main`: the six views built on the device
from raw uint8 frames, forward, backward and the Adam update, with the state
donated, the batch sharded over a 1-D `data` mesh of every device and the state
replicated. Frames are random and already on the devices, so no input pipeline
(and no TensorFlow) is involved. The step runs at an epoch past every switch of
SPEC section 4 (queue in the Sinkhorn, L_loc in the total, prototypes free), the
steady state of a run. Compilation is timed on its own, then each of `--steps`
steps is timed between `block_until_ready`s.

`benchmarks/torch_baseline.py` prints the same table for the PyTorch model.
`cvc_jax.costs` counts this step's FLOPs by torch's counting rule and holds
the devices' peaks that both tables divide by.
"""

import dataclasses
import json
import os
import resource
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

import cvc_jax
from cvc_jax import costs
from cvc_jax import models
from cvc_jax import parallel
from cvc_jax import pretrain
from cvc_jax.models import convolutions
from cvc_jax.models import resnet3d


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines this program's flags; called by entry points only, so that importing
  the module (as tests and benchmarks/ do) defines nothing next to cvc_jax.main."""
  config_flags.DEFINE_config_file(
      "config", None, "Config file, optionally with variants after ':'.",
      flag_values=flag_values, lock_config=True)
  flags.DEFINE_integer("steps", 20, "Timed steps (the spread is over these).",
                       flag_values=flag_values)
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.",
                       flag_values=flag_values)
  flags.DEFINE_enum("remat", None, list(resnet3d.REMAT_POLICIES),
                    "Sets config.remat (default: the config's): what the encoder's "
                    "backward pass recomputes, for a larger batch in the same memory.",
                    flag_values=flag_values)
  flags.DEFINE_string("json", None, "Also write the results to this JSON file.",
                      flag_values=flag_values)
  flags.DEFINE_bool("count_flops", False, "Only print the step's FLOPs as the MFU "
                    "counts them (`costs.step_flops`), from shapes alone: nothing is "
                    "compiled or allocated, so any batch can be counted on any host.",
                    flag_values=flag_values)


@dataclasses.dataclass
class Result:
  """One benchmark run; `format_table` prints it, `dataclasses.asdict` saves it."""
  framework: str
  device_kind: str
  device_count: int
  dtype: str
  global_batch: int
  clip_shape: tuple[int, int, int]  # T, S, S
  step_times_s: list[float]
  flops_per_step: float | None  # the whole step, all devices
  flops_source: str
  peak_tflops_per_device: float | None
  peak_memory_bytes: int | None  # per device
  peak_memory_source: str
  compile_time_s: float
  notes: str = ""
  # As many steps again, each one's result read only once the next was queued.
  pipelined_step_time_s: float | None = None

  @property
  def step_time_s(self) -> float:
    return statistics.median(self.step_times_s)

  def summary(self) -> dict:
    """The derived figures: median and spread, throughput, MFU."""
    t = self.step_time_s
    times = np.asarray(self.step_times_s)
    mfu = None
    if self.flops_per_step and self.peak_tflops_per_device:
      mfu = self.flops_per_step / t / (self.peak_tflops_per_device * 1e12 *
                                        self.device_count)
    return dict(
        step_time_median_s=t, step_time_min_s=float(times.min()),
        step_time_max_s=float(times.max()),
        step_time_p10_s=float(np.percentile(times, 10)),
        step_time_p90_s=float(np.percentile(times, 90)),
        videos_per_s=self.global_batch / t,
        clips_per_s=self.global_batch * pretrain.NUM_VIEWS / t,
        tflops_per_s=self.flops_per_step / t / 1e12 if self.flops_per_step else None,
        mfu=mfu,
        pipelined_clips_per_s=(self.global_batch * pretrain.NUM_VIEWS /
                               self.pipelined_step_time_s
                               if self.pipelined_step_time_s else None))

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), **self.summary())


def format_table(r: Result) -> str:
  """The results as a two-column text table."""
  s = r.summary()
  na = lambda v, fmt: "n/a" if v is None else fmt.format(v)
  t, s_, _ = r.clip_shape
  rows = [
      ("framework", r.framework),
      ("device", f"{r.device_kind} x {r.device_count}"),
      ("dtype", r.dtype),
      ("global batch", f"{r.global_batch} videos = {r.global_batch * pretrain.NUM_VIEWS} "
                       f"clips of {t}x{s_}x{s_}"),
      ("step time (median)", f"{s['step_time_median_s'] * 1e3:.1f} ms"),
      ("step time spread", f"min {s['step_time_min_s'] * 1e3:.1f} / p10 "
                           f"{s['step_time_p10_s'] * 1e3:.1f} / p90 "
                           f"{s['step_time_p90_s'] * 1e3:.1f} / max "
                           f"{s['step_time_max_s'] * 1e3:.1f} ms over "
                           f"{len(r.step_times_s)} steps"),
      ("videos/s", f"{s['videos_per_s']:.2f}"),
      ("clips/s", f"{s['clips_per_s']:.2f}"),
      ("FLOPs per step", na(r.flops_per_step and r.flops_per_step / 1e12, "{:.3f} T") +
       f" ({r.flops_source})"),
      ("achieved", na(s["tflops_per_s"], "{:.2f} TFLOP/s")),
      ("MFU", na(s["mfu"], "{:.1%}") + (
          f" of {r.peak_tflops_per_device:g} TFLOP/s x {r.device_count}"
          if r.peak_tflops_per_device else " (no peak known for this device)")),
      ("peak memory", na(r.peak_memory_bytes and r.peak_memory_bytes / 2**30,
                         "{:.2f} GiB") + f" ({r.peak_memory_source})"),
      ("compile time", f"{r.compile_time_s:.1f} s"),
  ]
  if r.pipelined_step_time_s:
    rows.insert(6, ("pipelined step", (
        f"{r.pipelined_step_time_s * 1e3:.1f} ms = {s['pipelined_clips_per_s']:.2f} "
        f"clips/s, {len(r.step_times_s)} steps each read once the next was queued")))
  if r.notes:
    rows.append(("notes", r.notes))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _memory(device) -> tuple[int | None, str]:
  """Peak memory of one device: the allocator's count where the backend keeps
  one (GPU, TPU), else the process's peak resident set (CPU: host memory)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device allocator peak"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
  return int(rss), "process peak RSS, host"


def largest_batch(need, *, min_batch: int, max_batch: int, multiple: int,
                  limit: float, log=print) -> tuple[int, int, str]:
  """The largest batch whose step needs at most `limit` bytes: (batch, its bytes,
  how it was found).

  `need(batch, probe)` compiles the step at `batch` and gives the bytes one
  device needs by XLA's memory analysis; `probe` marks the two compilations that
  only size the memory. Memory grows linearly in the batch, so `min_batch` and
  `2 * min_batch` give the batch under `limit`, rounded down to `multiple`; it is
  stepped down while its own analysis is over. With `max_batch <= min_batch`
  there are no probes: `min_batch` is compiled once.
  """
  batch = min_batch
  if max_batch > min_batch:
    b1, b2 = min_batch, 2 * min_batch
    m1, m2 = need(b1, True), need(b2, True)
    per_video = max((m2 - m1) / (b2 - b1), 1.0)
    batch = int(b1 + (limit - m1) / per_video) // multiple * multiple
    batch = max(min(batch, max_batch), min_batch)
    log(f"Memory at batch {b1}: {m1 / 2**30:.2f} GiB, at {b2}: {m2 / 2**30:.2f} "
        f"GiB; limit {limit / 2**30:.2f} GiB -> batch {batch}.")
  while True:
    nbytes = need(batch, False)
    if nbytes <= limit or batch - multiple < min_batch:
      break
    log(f"Batch {batch} needs {nbytes / 2**30:.2f} GiB: trying {batch - multiple}.")
    batch -= multiple
  how = (f"largest batch (multiple of {multiple}) within {limit / 2**30:.1f} GiB by "
         f"XLA memory analysis: {nbytes / 2**30:.2f} GiB")
  if max_batch <= min_batch:
    how = f"batch as asked; {nbytes / 2**30:.2f} GiB by XLA memory analysis"
  if nbytes > limit:
    how = f"batch {batch} needs {nbytes / 2**30:.2f} GiB, over {limit / 2**30:.1f} GiB"
  return batch, nbytes, how


class TrainStep:
  """The compiled train step of a config on every visible device, ready to time.

  Calling it runs one step to completion; `result(times)` makes the `Result`.

  Args:
    config: a full pretraining config (reads `batch_size`, `dtype`, `input`, ...).
    remat: None (the config's `remat`) or a key of `resnet3d.REMAT_POLICIES`.
    log: where progress lines go.
    compiler_options: XLA options for this compilation alone (`fit_batch.py`
      sizes batches with GPU autotuning off: its probes are never run).
  """

  def __init__(self, config, *, remat: str | None = None, log=print,
               compiler_options: dict | None = None):
    if remat is not None:
      config = config.copy_and_resolve_references()
      config.remat = remat
    self.config, self.log = config, log
    self.devices = jax.devices()
    mesh = parallel.data_mesh(config.batch_size, self.devices)
    replicated, batch_sharding = parallel.shardings(mesh)
    shape = pretrain.batch_shapes(config)["frames"].shape  # [B, 2T, H, W, 3]
    b, (h, w) = config.batch_size, shape[2:4]
    # Epoch = step: from `steady_epoch` on every term and the queue are on.
    steps_per_epoch = 1
    steady_epoch = max(config.loss.loc_start_epoch, config.loss.queue_start_epoch,
                       config.loss.freeze_prototypes_epochs)

    state = pretrain.init_train_state(config, jax.random.key(config.seed),
                                      pretrain.views_shape_of(config), steps_per_epoch,
                                      sharding=replicated)
    state = state.replace(step=jax.device_put(np.int32(steady_epoch), replicated))

    frames = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
    self.batch = {
        "frames": jax.device_put(frames, batch_sharding),
        "sizes": jax.device_put(np.tile(np.int32([h, w]), (b, 1)), batch_sharding)}
    self.rng = jax.device_put(jax.random.key(config.seed + 1), replicated)

    p_step = pretrain.jitted_train_step(config, steps_per_epoch, mesh)
    log(f"Compiling the step: {b} videos on {len(self.devices)} x "
        f"{self.devices[0].device_kind}.")
    start = time.perf_counter()
    traced = p_step.trace(state, self.batch, self.rng)
    # The options pretraining compiles its step with, and this compilation's own.
    self.compiler_options = {**(models.conv_compiler_options(config.dtype) or {}),
                             **(compiler_options or {})}
    self.compiled = traced.lower().compile(compiler_options=self.compiler_options or None)
    self.compile_time = time.perf_counter() - start
    self.state = state
    self.steps_run = 0  # by `finish`, from 1, warm-up included
    self.nonfinite = []  # those of them whose loss or gradient was not finite
    # MFU counts the step's convolutions and matrix products from its jaxpr, as
    # torch's flop_counter counts the baseline's: XLA's cost analysis of the
    # compiled program leaves out library calls (on an H100 it counted 0.28 of
    # the 23 TFLOP of configs/ucf101.py's step at batch 16: the cuDNN
    # convolutions are missing), so it is shown beside, not used.
    model_config = costs.model_work(config)
    self.flops = (costs.jaxpr_flops(traced.jaxpr) if model_config is config
                  else costs.step_flops(model_config))
    # SPMD programs are per device: the compiled cost analysis counts one share.
    xla = costs.compiled_flops(self.compiled)
    self.flops_source = ("the model's convolutions and matrix products (jaxpr; no "
                         "padding, no remat recomputation); XLA cost ") + (
        f"analysis {xla * len(self.devices) / 1e12:.3f} T" if xla else "analysis n/a")

  def launch(self):
    """Queues one step and returns its metrics without waiting for them."""
    self.state, metrics = self.compiled(self.state, self.batch, self.rng)
    return metrics

  def finish(self, metrics) -> None:
    """Waits for the step that returned `metrics`; counts it, and warns at the
    first whose loss or gradient was not finite (`result` gives the count)."""
    self.steps_run += 1
    if not bool(metrics["finite"]):
      if not self.nonfinite:
        self.log(f"Warning: step {self.steps_run} had a non-finite loss or gradient "
                 "(the state was kept); the result's notes count every such step.")
      self.nonfinite.append(self.steps_run)

  def wait(self) -> None:
    """Waits for every queued step."""
    jax.block_until_ready(self.state)

  def __call__(self) -> None:
    metrics = self.launch()
    jax.block_until_ready((self.state, metrics))
    self.finish(metrics)

  def result(self, times: list[float]) -> Result:
    memory, memory_source = _memory(self.devices[0])
    kind, c = self.devices[0].device_kind, self.config
    encoder = c.model.encoder
    conv_impl = convolutions.resolve_conv_impl(encoder.get("conv_impl", "auto"))
    stem_impl = convolutions.resolve_stem_impl(encoder.get("stem_impl", "auto"), c.dtype)
    notes = (f"views+fwd+bwd+Adam, frames on device, conv_impl={conv_impl}, "
             f"stem_impl={stem_impl}, remat={c.get('remat', 'none')}, host memory "
             f"{'kept' if cvc_jax.HOST_MEMORY_KEPT else 'glibc default'}")
    if self.nonfinite:
      # A non-finite step keeps the old state but has done all the step's work,
      # so the times stand; the count says the training did not.
      notes += (f", non-finite loss or gradient in {len(self.nonfinite)} of "
                f"{self.steps_run} steps (the first: step {self.nonfinite[0]}; "
                "state kept)")
    if self.compiler_options:
      notes += ", compiler options " + " ".join(
          f"{k}={v}" for k, v in sorted(self.compiler_options.items()))
    if os.environ.get("XLA_FLAGS"):  # compiler flags change the step's speed
      notes += f", XLA_FLAGS={os.environ['XLA_FLAGS']}"
    return Result(
        framework=f"jax {jax.__version__}", device_kind=kind,
        device_count=len(self.devices), dtype=c.dtype, global_batch=c.batch_size,
        clip_shape=(c.input.num_frames, c.input.crop_size, c.input.crop_size),
        step_times_s=times, flops_per_step=self.flops, flops_source=self.flops_source,
        peak_tflops_per_device=costs.peak_tflops(kind, c.dtype), peak_memory_bytes=memory,
        peak_memory_source=memory_source, compile_time_s=self.compile_time, notes=notes)


def time_steps(step, *, steps: int, warmup: int) -> list[float]:
  """Runs `warmup` untimed calls of `step`, then returns the wall time of `steps`."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def time_pipelined(step, *, steps: int) -> float:
  """Seconds per step over `steps` steps run as `pretrain` runs them.

  Each step's result is read only after the next step is queued, so the host
  prepares step n + 1 while the device runs step n; `time_steps`, which waits
  for each step, also times the device idling while the host dispatches (9 of
  125 ms of the H200 step of configs/ucf101.py, benchmarks/RESULTS.md). `step`
  has `launch()` (queue a step, return a handle), `finish(handle)` and `wait()`.
  """
  start = time.perf_counter()
  pending = step.launch()
  for _ in range(steps - 1):
    queued = step.launch()
    step.finish(pending)
    pending = queued
  step.finish(pending)
  step.wait()
  return (time.perf_counter() - start) / steps


def measure(step, *, steps: int, warmup: int) -> Result:
  """`step`'s `Result`: `warmup` untimed steps, `steps` timed one by one (the
  median and spread), then `steps` more pipelined (`time_pipelined`)."""
  times = time_steps(step, steps=steps, warmup=warmup)
  pipelined = time_pipelined(step, steps=steps)
  result = step.result(times)  # after every step, so its notes cover them all
  result.pipelined_step_time_s = pipelined
  return result


def run(config, *, steps: int = 20, warmup: int = 2, remat: str | None = None,
        log=print) -> Result:
  """Compiles and times the train step of `config` on every visible device.

  Args:
    config: a full pretraining config.
    steps: timed steps; the table gives their median and spread.
    warmup: untimed steps after compilation.
    remat: None (the config's `remat`) or a key of `resnet3d.REMAT_POLICIES`.
    log: where progress lines go.

  Returns:
    The `Result`.
  """
  return measure(TrainStep(config, remat=remat, log=log), steps=steps, warmup=warmup)


def write_json(result: Result, path: str) -> None:
  """Writes `result.to_json()` to path."""
  with open(path, "w") as f:
    json.dump(result.to_json(), f, indent=2)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  fv = flag_values
  if fv.count_flops:
    c = fv.config
    conv_impl = convolutions.resolve_conv_impl(c.model.encoder.get("conv_impl", "auto"))
    print(f"{costs.step_flops(c) / 1e12:.3f} TFLOP per step: batch {c.batch_size}, "
          f"conv_impl={conv_impl}, remat={c.get('remat', 'none')}")
    return
  result = run(fv.config, steps=fv.steps, warmup=fv.warmup, remat=fv.remat,
               log=lambda m: print(m, file=sys.stderr, flush=True))
  print(format_table(result))
  if fv.json:
    write_json(result, fv.json)


if __name__ == "__main__":
  define_flags()
  app.run(main)
