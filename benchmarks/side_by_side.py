r"""JAX and PyTorch train steps timed in turns in one process, on a shared CPU.

    python benchmarks/side_by_side.py --config=configs/reference.py \
        --config.batch_size=2 --steps=20 --json_prefix=/tmp/cpu_b2

On a machine other jobs share, load comes and goes over minutes; timing one
framework after the other lets a burst land on one of them only. Here the two
compiled steps alternate (JAX then PyTorch, then PyTorch then JAX, ...), so both
meet the same load on average and the ratio of their medians is fair. Each side
times what its own benchmark times (`python -m cvc_jax.benchmark`: views on the
device + forward + backward + update; `benchmarks/torch_baseline.py`: forward +
backward + update on prebuilt views), at the batch shape and model the config
gives. CPU only: both frameworks share this process's cores. Flags: those of
`cvc_jax.benchmark` (--config, --steps, --warmup, --remat) and the two below.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

from cvc_jax import benchmark
import torch_baseline

FLAGS = flags.FLAGS
benchmark.define_flags()  # --config, --steps, --warmup, --remat (--json unused)
_TORCH_ARGS = flags.DEFINE_string(
    "torch_args", "", "Extra torch_baseline.py flags, e.g. '--channels_last --compile'.")
_JSON_PREFIX = flags.DEFINE_string(
    "json_prefix", None, "Write PREFIX_jax.json and PREFIX_torch.json.")


def run(config, *, steps: int, warmup: int, remat: str | None = None, torch_args=()):
  """Builds both steps, then times `steps` of each in alternating pairs.

  Returns:
    (JAX `Result`, PyTorch `Result`).
  """
  log = lambda m: print(m, file=sys.stderr, flush=True)
  jax_step = benchmark.TrainStep(config, remat=remat, log=log)
  torch_step = torch_baseline.TorchStep(
      torch_baseline.args_from_config(config, list(torch_args)))
  for _ in range(warmup):
    jax_step()
    torch_step()
  times = {jax_step: [], torch_step: []}
  for i in range(steps):
    for step in (jax_step, torch_step)[::1 if i % 2 == 0 else -1]:
      times[step] += benchmark.time_steps(step, steps=1, warmup=0)
    log(f"pair {i + 1}/{steps}: jax {times[jax_step][-1]:.2f} s, "
        f"torch {times[torch_step][-1]:.2f} s")
  return jax_step.result(times[jax_step]), torch_step.result(times[torch_step])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  jax_result, torch_result = run(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup,
                                 remat=FLAGS.remat, torch_args=_TORCH_ARGS.value.split())
  print(benchmark.format_table(jax_result))
  print()
  print(benchmark.format_table(torch_result))
  print()
  ratio = jax_result.step_time_s / torch_result.step_time_s
  pairs = np.asarray(jax_result.step_times_s) / np.asarray(torch_result.step_times_s)
  print(f"JAX / PyTorch median step time: {ratio:.2f} (median of per-pair ratios "
        f"{np.median(pairs):.2f}); peak RSS is this one process's, both frameworks.")
  if _JSON_PREFIX.value:
    benchmark.write_json(jax_result, f"{_JSON_PREFIX.value}_jax.json")
    benchmark.write_json(torch_result, f"{_JSON_PREFIX.value}_torch.json")


if __name__ == "__main__":
  app.run(main)
