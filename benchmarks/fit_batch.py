r"""The largest batch whose JAX train step fits the device's memory, then timed.

    python benchmarks/fit_batch.py --config=configs/ucf101.py \
        --config.dtype=bfloat16 [--remat=dots] --min_batch=16 --json=FILE

Compiles the step at `min_batch` and `2 * min_batch` videos (on GPU without
autotuning, see PROBE_OPTIONS) and reads XLA's memory analysis of each
(arguments + outputs + temporaries - donated aliases); memory grows linearly in
the batch, so the two give the largest batch under `--fraction` of the
device's memory limit, rounded down to `--multiple`. That batch is compiled
(and stepped down while its analysis is over the limit), then timed as
`python -m cvc_jax.benchmark` times it. Compiling, not running, keeps a batch
that does not fit from ever allocating. With `--max_batch` equal to
`--min_batch` there are no probes: that batch is compiled once and timed.
Flags: those of `cvc_jax.benchmark` and the ones below.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax

from cvc_jax import benchmark
from cvc_jax import costs

FLAGS = flags.FLAGS
benchmark.define_flags()
_MIN_BATCH = flags.DEFINE_integer("min_batch", 16, "Smallest batch to accept.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 1024, "Largest batch to try.")
_MULTIPLE = flags.DEFINE_integer("multiple", 8, "Round the batch down to this.")
_FRACTION = flags.DEFINE_float("fraction", 0.9, "Share of the memory limit to fill.")
_LIMIT_GB = flags.DEFINE_float(
    "memory_limit_gb", None, "Memory limit per device in GiB; default: the device "
    "allocator's bytes_limit (GPU, TPU). Required on CPU.")
_TRACE_DIR = flags.DEFINE_string(
    "trace_dir", None, "After timing, trace 3 more steps with jax.profiler into this "
    "folder and write the optimised HLO beside it (step.hlo), for "
    "`benchmarks/profile_step.py`'s per-op reading without another compilation.")


# XLA options for the two probe compilations, per platform: on GPU, autotuning
# every convolution of each probe would take most of a compile that is never run.
PROBE_OPTIONS = {"gpu": {"xla_gpu_autotune_level": 0}}  # jax's platform name for CUDA


def _log(message):
  print(message, file=sys.stderr, flush=True)


def with_batch(config, batch):
  """A copy of the (locked) config with another global batch size."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.batch_size = batch
  return config


def fit(config, *, remat, min_batch, max_batch, multiple, limit,
        probe_options=None) -> tuple[benchmark.TrainStep, str]:
  """The compiled step at the largest batch under `limit` bytes, and how it was found.

  The two probes are compiled with `probe_options` (GPU: autotuning off, which
  changes only the convolutions' workspace, not what the batch needs); the batch
  that is timed is compiled with the defaults.
  """
  steps = {}  # the last compiled step, reused when the search asks for it again

  def compiled(batch, probe=False):
    if (batch, probe) not in steps:
      steps.clear()  # one step's state and frames on the device at a time
      steps[batch, probe] = benchmark.TrainStep(
          with_batch(config, batch), remat=remat, log=_log,
          compiler_options=probe_options if probe else None)
    return steps[batch, probe]

  batch, _, how = benchmark.largest_batch(
      lambda batch, probe: costs.compiled_bytes(compiled(batch, probe).compiled),
      min_batch=min_batch, max_batch=max_batch, multiple=multiple, limit=limit,
      log=_log)
  return steps[batch, False], how


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _LIMIT_GB.value:
    limit = _LIMIT_GB.value * 2**30
  else:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
      raise app.UsageError("This device reports no memory limit: pass --memory_limit_gb.")
    limit = stats["bytes_limit"]
  step, how = fit(FLAGS.config, remat=FLAGS.remat, min_batch=_MIN_BATCH.value,
                  max_batch=_MAX_BATCH.value, multiple=_MULTIPLE.value,
                  limit=_FRACTION.value * limit,
                  probe_options=PROBE_OPTIONS.get(jax.devices()[0].platform))
  result = benchmark.measure(step, steps=FLAGS.steps, warmup=FLAGS.warmup)
  result.notes += "; " + how
  print(benchmark.format_table(result))
  if FLAGS.json:
    benchmark.write_json(result, FLAGS.json)
  if _TRACE_DIR.value:
    os.makedirs(_TRACE_DIR.value, exist_ok=True)
    with open(os.path.join(_TRACE_DIR.value, "step.hlo"), "w") as f:
      f.write(step.compiled.as_text())
    jax.profiler.start_trace(_TRACE_DIR.value)
    benchmark.time_steps(step, steps=3, warmup=0)
    jax.profiler.stop_trace()


if __name__ == "__main__":
  app.run(main)
