"""Which videos each step reads, and which frames of them (SPEC sections 1 and 6).

The order of the videos over the epochs and each video's frame window (two
clips of T for pretraining, one for supervised training) depend only on the
seed, the global step and the video's index; evaluation's ten clips only on the
video's length. Never on threads, prefetching or processes: a resumed run reads
exactly the batches an uninterrupted one would have. Pure NumPy, so these
import without TensorFlow (`cvc_jax.input_pipeline` reads the data).
"""

import functools
from typing import Any

import numpy as np

# Independent random streams derived from config.seed.
_ORDER_STREAM, _SAMPLE_STREAM = 0, 1


def _seed(seed: int) -> int:
  return int(seed) % 2**64  # SeedSequence takes non-negative entropy only.


def raw_size(config) -> tuple[int, int]:
  """`config.input.raw_size`, the (height, width) canvas every frame is read into."""
  size = tuple(int(s) for s in config.input.raw_size)
  if len(size) != 2:
    raise ValueError(f"config.input.raw_size is the frame canvas (height, width), "
                     f"e.g. (128, 228); got {config.input.raw_size}.")
  return size


def whole_batches(n: int, batch_size: int) -> int:
  """Whole global batches in a split of n videos (the rest is skipped each epoch)."""
  if n < batch_size:
    raise ValueError(f"The split has {n} videos, fewer than the global batch of "
                     f"{batch_size}: lower config.batch_size or use more data.")
  return n // batch_size


def sample_indices(num_frames: int, rng: Any, *, num_out: int,
                   max_rate: float) -> np.ndarray:
  """Frame indices of one window of `num_out` frames (SPEC section 1).

  Rate r ~ U[1, min(max_rate, n / num_out)], start ~ U{0..floor(n - r num_out)},
  index i = round(start + r i) (halves up), clipped to n - 1. A video shorter
  than the window (n < num_out) gets r = n / num_out < 1 and start 0: the
  window spans the whole video, repeating frames, instead of being dropped.

  Args:
    num_frames: n, frames in the video (>= 1).
    rng: a `np.random.Generator`, or a seed (int or sequence of ints) for one.
    num_out: frames to sample (2T for the two clips of SPEC section 1).
    max_rate: r_max (>= 1).

  Returns:
    int32 [num_out], non-decreasing indices in [0, n).
  """
  if num_frames < 1 or num_out < 1 or max_rate < 1:
    raise ValueError(f"Need num_frames, num_out >= 1 and max_rate >= 1; got "
                     f"{num_frames}, {num_out}, {max_rate}.")
  rng = np.random.default_rng(rng)  # A Generator passes through unchanged.
  high = min(max_rate, num_frames / num_out)
  rate = rng.uniform(1.0, high) if high > 1.0 else high
  # The epsilon absorbs rounding in r * num_out when the window fills the video.
  last_start = max(0, int(np.floor(num_frames - rate * num_out + 1e-9)))
  start = rng.integers(0, last_start + 1)
  indices = np.floor(start + rate * np.arange(num_out) + 0.5)
  return np.minimum(indices, num_frames - 1).astype(np.int32)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The epoch's permutation of the split's video indices (read-only: cached)."""
  order = np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n)
  order.setflags(write=False)
  return order


def step_videos(seed: int, step: int, *, split_size: int,
                batch_size: int) -> np.ndarray:
  """Video indices of global step `step`: int64 [batch_size], all distinct.

  Epoch e = step // `whole_batches` takes a permutation seeded by (seed, e) and
  its steps take consecutive slices; the videos left over by the last whole
  batch of an epoch are skipped in that epoch only.
  """
  epoch, position = divmod(step, whole_batches(split_size, batch_size))
  order = _epoch_order(_seed(seed), epoch, split_size)
  return order[position * batch_size:(position + 1) * batch_size]


def video_rng(seed: int, step: int, video_index: int) -> np.random.Generator:
  """The generator that samples video `video_index`'s frames at global step `step`."""
  return np.random.default_rng([_seed(seed), _SAMPLE_STREAM, step, video_index])


def eval_clip_indices(num_frames: int, *, num_clips: int,
                      clip_length: int) -> np.ndarray:
  """Frame indices of `num_clips` uniformly spaced clips of consecutive frames.

  Clip c starts at round(c (n - L) / (num_clips - 1)) (halves up), so the
  first clip starts at frame 0 and the last ends at frame n - 1 (one clip:
  the centre one). A video shorter than a clip (n < L) is stretched over it
  as in pretraining, index floor(i n / L + 1/2) clipped to n - 1, in every clip.

  Args:
    num_frames: n (>= 1).
    num_clips: clips per video (10 in SPEC section 6).
    clip_length: L, frames per clip (T = 16).

  Returns:
    int32 [num_clips, clip_length], indices in [0, n).
  """
  if num_frames < 1 or num_clips < 1 or clip_length < 1:
    raise ValueError(f"Need num_frames, num_clips, clip_length >= 1; got "
                     f"{num_frames}, {num_clips}, {clip_length}.")
  if num_frames < clip_length:
    clip = np.floor(np.arange(clip_length) * num_frames / clip_length + 0.5)
    clip = np.minimum(clip, num_frames - 1)
    return np.tile(clip, (num_clips, 1)).astype(np.int32)
  if num_clips == 1:  # The centre clip.
    starts = np.floor(np.array([(num_frames - clip_length) / 2]) + 0.5)
  else:
    spacing = (num_frames - clip_length) / (num_clips - 1)
    starts = np.floor(np.arange(num_clips) * spacing + 0.5)
  return (starts[:, None] + np.arange(clip_length)).astype(np.int32)
