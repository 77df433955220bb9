"""Which frames each video gives (SPEC sections 1 and 6): pretraining's random
windows and evaluation's uniformly spaced clips, in `cvc_jax.sampling`."""

import numpy as np
import pytest

from cvc_jax import sampling


def test_sample_indices_rate_and_offset_bounds():
  n, num_out, max_rate = 1000, 32, 3.0
  rates = []
  for seed in range(300):
    idx = sampling.sample_indices(n, seed, num_out=num_out, max_rate=max_rate)
    assert idx.dtype == np.int32 and idx.shape == (num_out,)
    assert (np.diff(idx) >= 1).all() and (np.diff(idx) <= 3).all()
    assert 0 <= idx[0] and idx[-1] < n
    rates.append((idx[-1] - idx[0]) / (num_out - 1))
  rates = np.array(rates)  # Exact up to rounding: +- 1 / (num_out - 1).
  tol = 1 / (num_out - 1)
  assert rates.min() >= 1 - tol and rates.max() <= max_rate + tol
  assert rates.min() < 1.1 and rates.max() > 2.9  # The whole range is used,
  assert abs(rates.mean() - 2.0) < 0.15  # uniformly.
  starts = [sampling.sample_indices(n, s, num_out=num_out, max_rate=1.0)[0]
            for s in range(300)]
  assert min(starts) < 50 and max(starts) > n - num_out - 50  # U{0..n - 2T}


def test_sample_indices_rate_capped_by_video_length():
  for seed in range(100):
    idx = sampling.sample_indices(40, seed, num_out=32, max_rate=3.0)
    assert idx[-1] <= 39
    rate = (idx[-1] - idx[0]) / 31
    assert 1 - 1 / 31 <= rate <= 40 / 32 + 1 / 31  # r <= n / 2T
  np.testing.assert_array_equal(  # n = 2T: every frame once.
      sampling.sample_indices(32, 0, num_out=32, max_rate=3.0), np.arange(32))


def test_sample_indices_short_video_repeats_frames():
  n, num_out = 24, 32
  idx = sampling.sample_indices(n, 0, num_out=num_out, max_rate=3.0)
  # r = n / 2T = 0.75 and start 0: the window stretches over the whole video.
  np.testing.assert_array_equal(idx, np.floor(0.75 * np.arange(32) + 0.5))
  assert set(idx.tolist()) == set(range(n))  # nothing skipped, some repeated
  np.testing.assert_array_equal(
      sampling.sample_indices(1, 0, num_out=8, max_rate=3.0), 0)


def test_sample_indices_takes_generator_or_seed_and_checks_args():
  a = sampling.sample_indices(500, 7, num_out=8, max_rate=3.0)
  b = sampling.sample_indices(500, np.random.default_rng(7), num_out=8, max_rate=3.0)
  np.testing.assert_array_equal(a, b)
  for bad in (dict(num_frames=0, max_rate=3.0), dict(num_frames=10, max_rate=0.5)):
    with pytest.raises(ValueError):
      sampling.sample_indices(bad["num_frames"], 0, num_out=8,
                              max_rate=bad["max_rate"])


def test_eval_clip_indices_long_short_and_single():
  idx = sampling.eval_clip_indices(100, num_clips=10, clip_length=16)
  assert idx.dtype == np.int32 and idx.shape == (10, 16)
  np.testing.assert_array_equal(np.diff(idx, axis=1), 1)  # consecutive frames
  np.testing.assert_array_equal(  # round(c * 84 / 9), halves up
      idx[:, 0], [0, 9, 19, 28, 37, 47, 56, 65, 75, 84])
  assert idx[-1, -1] == 99
  np.testing.assert_array_equal(  # n = L: the whole video, ten times
      sampling.eval_clip_indices(16, num_clips=10, clip_length=16),
      np.tile(np.arange(16), (10, 1)))
  short = sampling.eval_clip_indices(5, num_clips=10, clip_length=16)
  # Stretched over the video: every frame, in order, some repeated.
  np.testing.assert_array_equal(short, np.tile(
      [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], (10, 1)))
  np.testing.assert_array_equal(
      sampling.eval_clip_indices(1, num_clips=2, clip_length=3), 0)
  np.testing.assert_array_equal(  # One clip: the centre one.
      sampling.eval_clip_indices(40, num_clips=1, clip_length=16),
      [np.arange(12, 28)])
  with pytest.raises(ValueError):
    sampling.eval_clip_indices(0, num_clips=10, clip_length=16)
