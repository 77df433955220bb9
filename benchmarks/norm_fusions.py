r"""BatchNorm + ReLU as XLA runs them on video-ResNet activations, against a copy.

    python benchmarks/norm_fusions.py [--elements=694e6] [--channels=64,128,144,230,256]

The H200 profile of the bf16 train step (benchmarks/RESULTS.md, session 8) had
XLA's BatchNorm and ReLU fusions at 31.9 % of the device time. Read per kernel run
(session 9: identical fusions share one kernel, which that reading had counted as
one op), the elementwise ones moved their operands and results at 3.5 TB/s and the
reductions (the batch statistics and the gradient's sums) at 2.3 TB/s, on a card
whose memory is rated at 4.8 TB/s. This times them alone, on bf16 activations
[N, C] of `--elements` values (default: layer 1 of R(2+1)D-18 at 16 videos,
96 x 16 x 56 x 56 x 144) for several channel counts C:

  copy        y = x + 1: reads x, writes y (2 S, S the bytes of x): the ceiling;
  stats       `resnet3d._batch_norm`'s batch mean and variance in float32 (S);
  stats_wide  the same sums over [N / 8, 8 C], then over the 8 (S): whether
              XLA's column reduction runs faster over more columns;
  forward     statistics, normalisation, ReLU, as the encoder runs them (3 S:
              the statistics read x, the normalisation reads it again, writes y);
  backward    the input gradient of `forward` for a given dy, the forward pass
              recomputed inside (6 S: statistics S, the gradient's reductions
              read x and dy, its elementwise pass reads both and writes dx).

Each line gives the median time of `--reps` runs and those bytes over it. A
row far under the copy's rate is XLA's fusion, not the memory, at fault.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp

from cvc_jax.models import resnet3d

_ELEMENTS = flags.DEFINE_float("elements", 96 * 16 * 56 * 56 * 144,
                               "Values per activation (N x C).")
_CHANNELS = flags.DEFINE_list("channels", ["64", "128", "144", "230", "256"],
                              "Channel counts C to time.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed runs per line (median).")

EPS = 1e-5


def _batch_norm(x):
  """(y, mean, var): the encoder's own training-mode BatchNorm, scale 1, bias 0."""
  c = x.shape[-1]
  return resnet3d._batch_norm(x, jnp.ones(c), jnp.zeros(c), EPS)  # pylint: disable=protected-access


def _stats(x):
  return _batch_norm(x)[1:]


def _stats_wide(x, group: int = 8):
  """`_stats` with `group` rows side by side: sums over [N / group, group C] first."""
  n, c = x.shape
  g = group if n % group == 0 else 1
  xf = x.astype(jnp.float32).reshape(n // g, g * c)
  mean = jnp.sum(xf, 0).reshape(g, c).sum(0) / n
  mean_sq = jnp.sum(jnp.square(xf), 0).reshape(g, c).sum(0) / n
  return mean, jnp.maximum(0.0, mean_sq - jnp.square(mean))


def _forward(x):
  return jax.nn.relu(_batch_norm(x)[0]).astype(x.dtype)


# name -> (function of (x, dy), the bytes it must move in units of x's bytes)
PASSES = {
    "copy": (lambda x, dy: x + 1, 2),
    "stats": (lambda x, dy: _stats(x), 1),
    "stats_wide": (lambda x, dy: _stats_wide(x), 1),
    "forward": (lambda x, dy: _forward(x), 3),
    "backward": (lambda x, dy: jax.vjp(_forward, x)[1](dy)[0], 6),
}


def time_pass(fn, x, dy, reps: int) -> float:
  """Median seconds of the jitted `fn(x, dy)`, after one compiling call."""
  jitted = jax.jit(fn)
  jax.block_until_ready(jitted(x, dy))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(jitted(x, dy))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(elements: int, channels: list[int], reps: int) -> list[tuple[int, str, float, float]]:
  """(C, pass, median seconds, GB/s) for every channel count and pass."""
  rows = []
  for c in channels:
    n = int(elements) // c
    kx, kdy = jax.random.split(jax.random.key(c))
    # Random values, never zeros: a ReLU of zeros and its gradient are trivial.
    x = jax.random.normal(kx, (n, c), jnp.bfloat16)
    dy = jax.random.normal(kdy, (n, c), jnp.bfloat16)
    for name, (fn, units) in PASSES.items():
      t = time_pass(fn, x, dy, reps)
      rows.append((c, name, t, units * x.nbytes / t / 1e9))
    del x, dy
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  device = jax.devices()[0]
  print(f"{device.device_kind}, jax {jax.__version__}, {_ELEMENTS.value:.3g} bf16 "
        f"values per activation, median of {_REPS.value}")
  print(f"{'C':>5} {'pass':<10} {'ms':>9} {'GB/s':>8}")
  for c, name, t, rate in run(_ELEMENTS.value, [int(c) for c in _CHANNELS.value],
                              _REPS.value):
    print(f"{c:>5} {name:<10} {t * 1e3:9.3f} {rate:8.1f}")


if __name__ == "__main__":
  app.run(main)
