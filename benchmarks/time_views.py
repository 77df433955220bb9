r"""The pretraining views alone: `views.pretrain_views` jitted, timed on its own.

    python benchmarks/time_views.py --config=configs/ucf101.py [--batch=2] \
        [--config.input.blur=False]

Builds the six views of `--batch` videos of random uint8 frames in the config's
raw size (the input pipeline's canvas) with a fresh key per call, and prints
the median and minimum of `--reps` calls after one compiling call. The train
step builds the same views inside its jitted function; this isolates them,
e.g. to weigh one augmentation (`--config.input.blur=False` leaves out the blur).
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from cvc_jax import sampling
from cvc_jax import views

FLAGS = flags.FLAGS


def _define_flags():
  """Only when run as a program: importing this (tests do, next to the other
  benchmarks' flags) defines nothing."""
  config_flags.DEFINE_config_file("config", None, "Config file (FILE[:variants]).",
                                  lock_config=True)
  flags.DEFINE_integer("batch", 2, "Videos per call.")
  flags.DEFINE_integer("reps", 5, "Timed calls.")


def time_views(config, batch: int, reps: int) -> list[float]:
  """Seconds of each of `reps` jitted `pretrain_views` calls, after compiling."""
  t, (h, w) = config.input.num_frames, sampling.raw_size(config)
  frames = np.random.default_rng(0).integers(0, 256, (batch, 2 * t, h, w, 3), np.uint8)
  build = jax.jit(lambda f, key: views.pretrain_views(f, key, config))
  jax.block_until_ready(build(frames, jax.random.key(0)))
  times = []
  for i in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(build(frames, jax.random.key(i + 1)))
    times.append(time.perf_counter() - start)
  return times


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  times = time_views(config, FLAGS.batch, FLAGS.reps)
  print(f"{jax.devices()[0].device_kind}: views of {FLAGS.batch} videos "
        f"({config.input.num_frames} frames, crop {config.input.crop_size}, blur "
        f"{config.input.blur}): median {statistics.median(times):.4f} s, "
        f"min {min(times):.4f} s over {len(times)} calls")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
