"""Input pipeline: TFDS video data sets -> per-process batches of raw frames.

The host only samples and decodes; all augmentation happens on the accelerator
(cvc_jax/views.py). For every video of a batch the host picks one window of 2T
frame indices (SPEC section 1), decodes just those JPEG frames and pads them
top-left into a fixed [H, W] = `config.input.raw_size` canvas, reporting the
true size alongside, so batches have one static shape whatever the videos' sizes.

Reading: grain over `tfds.data_source` (ArrayRecord files), not tf.data. The
contract is that the batch of global step s is a pure function of (seed, s), so
that a resumed run continues with exactly the batches an uninterrupted run would
have seen, and each process reads only its own shard. With random access this
is direct: step s names its videos through an epoch permutation, and each
element is computed from (seed, step, video index) alone, so thread count and
prefetch depth cannot change the result, and resuming costs nothing. tf.data
over TFRecords reads sequentially: resuming would mean replaying (or
`skip`ping through) every earlier record, and its shuffle buffer and parallel
interleave make the order depend on buffer sizes unless made deterministic at a
price. Decoding only the sampled frames is also plain Python here (PIL releases
the GIL, so grain's threads decode in parallel).

Multi-host: each process reads a contiguous slice of every global batch
(`config.batch_size` is global); the trainer assembles the global array with
`jax.make_array_from_process_local_data`.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import functools
import importlib
import importlib.util
import io
import os
from typing import Any

from absl import logging
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds


def _hide_accelerators_from_tf() -> None:
  """Keeps TF (used by TFDS) off the GPUs/TPUs, whose memory belongs to JAX."""
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except RuntimeError:  # TF's runtime is already up; too late to change.
      logging.warning("TensorFlow was initialised before cvc_jax.input_pipeline "
                      "could hide the %s devices from it.", kind)


_hide_accelerators_from_tf()

# Data sets that need no download or manual files: built on first use.
_GENERATED = ("synthetic_motion",)
# Independent random streams derived from config.seed.
_ORDER_STREAM, _SAMPLE_STREAM = 0, 1


class _EncodedFrames(tfds.decode.Decoder):
  """Keeps a video's frames as JPEG bytes, to decode only the sampled ones.

  (`tfds.decode.SkipDecoding` has no NumPy path for data sources in TFDS 4.9.)
  """

  def decode_example(self, serialized_example):
    return serialized_example

  def decode_batch_example(self, serialized_example):
    return serialized_example

  def decode_example_np(self, serialized_example):
    return serialized_example

  def decode_batch_example_np(self, serialized_example):
    return serialized_example


# ----------------------------------------------------------------------------
# Data sets.


def _builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder of `config.input.dataset` ("name[/config][:version]").

  The repository's own builder (tfds_builders/<name>) if there is one, else the
  TFDS catalogue's.
  """
  name, kwargs = tfds.core.naming.parse_builder_name_kwargs(config.input.dataset)
  data_dir = config.input.data_dir or None
  if _has_own_builder(name.name):
    # Used by module, unregistered, so that they take precedence over TFDS
    # catalogue builders of the same name (ucf101).
    with tfds.core.registered.skip_registration():
      module = importlib.import_module(f"tfds_builders.{name.name}")
    return module.Builder(data_dir=data_dir, **kwargs)
  return tfds.builder(name.name, data_dir=data_dir, **kwargs)


def _has_own_builder(name: str) -> bool:
  return bool(importlib.util.find_spec("tfds_builders") and
              importlib.util.find_spec(f"tfds_builders.{name}"))


def ensure_built(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder of `config.input.dataset`, building it if generated.

  Generated data sets (synthetic_motion) are built into `config.input.data_dir`
  (TFDS's default if empty) on first use, by every process that does not find
  it there. Other data sets must have been built beforehand.

  Raises:
    FileNotFoundError: a data set that needs downloaded or manual files is not
      prepared in the data dir.
  """
  builder = _builder(config)
  if builder.is_prepared():
    return builder
  name = builder.name
  if name not in _GENERATED:
    _, kwargs = tfds.core.naming.parse_builder_name_kwargs(config.input.dataset)
    variant = f" --config={kwargs['config']}" if "config" in kwargs else ""
    missing = ("" if _has_own_builder(name) else
               f"\n(tfds_builders/{name} does not exist yet: add it, or build "
               f"TFDS's catalogue version with `tfds build {name}{variant}`.)")
    raise FileNotFoundError(
        f"Data set {config.input.dataset!r} is not prepared in "
        f"{builder.data_dir_root}. Build it first, from the repository root:\n"
        f"  tfds build tfds_builders/{name}{variant} --manual_dir=<folder with "
        f"the downloaded files> --data_dir={builder.data_dir_root} "
        f"--file_format=array_record{missing}")
  # Every process builds what it lacks: with local disks each needs a copy, and
  # a barrier could deadlock where only some hosts already have one. On shared
  # storage, concurrent builds write to private temporary folders and the
  # losers of the final rename find the winner's copy.
  logging.info("Building %s into %s.", config.input.dataset,
               builder.data_dir_root)
  try:
    builder.download_and_prepare()
  except Exception:  # pylint: disable=broad-except
    if not _builder(config).is_prepared():
      raise
  return _builder(config)  # Reads the built dataset_info (split sizes).


def num_videos(config: ml_collections.ConfigDict, split: str | None = None) -> int:
  """Number of videos in `split` (default `config.input.split`)."""
  split = split or config.input.split
  return ensure_built(config).info.splits[split].num_examples


def _steps_per_epoch(n: int, batch_size: int) -> int:
  if n < batch_size:
    raise ValueError(f"The split has {n} videos, fewer than the global batch of "
                     f"{batch_size}: lower config.batch_size or use more data.")
  return n // batch_size


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """Global steps per epoch: whole batches of `config.input.split` (rest dropped)."""
  return _steps_per_epoch(num_videos(config), config.batch_size)


# ----------------------------------------------------------------------------
# Sampling: pure functions of (seed, step, video index).


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
  """The epoch's permutation of the split's video indices."""
  return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n)


def step_videos(seed: int, step: int, *, split_size: int,
                batch_size: int) -> np.ndarray:
  """Video indices of global step `step`: int64 [batch_size], all distinct.

  Epoch e = step // steps_per_epoch takes a permutation seeded by (seed, e) and
  its steps take consecutive slices; the videos left over by the last whole
  batch of an epoch are skipped in that epoch only.
  """
  epoch, position = divmod(step, _steps_per_epoch(split_size, batch_size))
  order = _epoch_order(_seed(seed), epoch, split_size)
  return order[position * batch_size:(position + 1) * batch_size]


def _seed(seed: int) -> int:
  return int(seed) % 2**64  # SeedSequence takes non-negative entropy only.


# ----------------------------------------------------------------------------
# Decoding.


def _decode_jpeg(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def decode_frames(encoded: Sequence[bytes], indices: np.ndarray,
                  raw_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Decodes `encoded[indices]` into a zero canvas, each frame at the top left.

  Frames larger than the canvas are centre-cropped to it first.

  Returns:
    frames: uint8 [len(indices), H, W, 3].
    size: int32 [2], the (height, width) of the valid top-left region.
  """
  height, width = raw_size
  unique, inverse = np.unique(indices, return_inverse=True)
  canvas = np.zeros((len(unique), height, width, 3), np.uint8)
  size = np.array([height, width], np.int32)
  for k, index in enumerate(unique):  # Repeated indices are decoded once.
    frame = _decode_jpeg(encoded[index])
    h, w = frame.shape[:2]
    top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
    frame = frame[top:top + height, left:left + width]
    canvas[k, :frame.shape[0], :frame.shape[1]] = frame
    size = np.minimum(size, frame.shape[:2]).astype(np.int32)
  return canvas[inverse.reshape(-1)], size


# ----------------------------------------------------------------------------
# Pretraining batches.


@dataclasses.dataclass(frozen=True)
class _PretrainElement:
  """Element k of a process's stream -> one sampled, decoded video.

  A picklable class rather than a closure, so the stream can move to grain's
  multiprocessing (`mp_prefetch`) if decoding ever outgrows threads.
  """
  source: Any  # tfds data source: random access by video index.
  seed: int
  batch_size: int  # global
  local_batch: int
  process_index: int
  num_out: int  # 2T
  max_rate: float
  raw_size: tuple[int, int]

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    step, slot = divmod(k, self.local_batch)
    videos = step_videos(self.seed, step, split_size=len(self.source),
                         batch_size=self.batch_size)
    video_index = int(videos[self.process_index * self.local_batch + slot])
    example = self.source[video_index]
    encoded = example["video"]
    rng = np.random.default_rng(
        [_seed(self.seed), _SAMPLE_STREAM, step, video_index])
    indices = sample_indices(len(encoded), rng, num_out=self.num_out,
                             max_rate=self.max_rate)
    frames, size = decode_frames(encoded, indices, self.raw_size)
    return {"frames": frames, "sizes": size,
            "video_index": np.int32(video_index)}


def _process(process_index: int | None, process_count: int | None,
             batch_size: int) -> tuple[int, int, int]:
  """(process_index, process_count, local batch), checked."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} not in [0, {count}).")
  if batch_size % count:
    raise ValueError(f"Global batch {batch_size} does not divide over "
                     f"{count} processes.")
  return index, count, batch_size // count


def pretrain_batches(config: ml_collections.ConfigDict, *, start_step: int = 0,
                     process_index: int | None = None,
                     process_count: int | None = None,
                     ) -> Iterator[dict[str, np.ndarray]]:
  """This process's part of the pretraining batches of steps start_step, +1, ...

  Global step s takes the videos `step_videos(config.seed, s, ...)`; process p
  of P takes the p-th contiguous slice of local_batch = batch_size / P of them,
  so shards are disjoint and together make the global batch. Each video's frames
  are sampled by `sample_indices` with a generator seeded by (seed, s, video
  index). Hence a batch depends on (seed, s) only: resuming at start_step
  yields what an uninterrupted run yields from there.

  Args:
    config: the run's config; reads seed, batch_size (global) and input.*.
    start_step: the first global step to yield, e.g. the restored step.
    process_index: this process (default `jax.process_index()`).
    process_count: processes (default `jax.process_count()`).

  Yields:
    Forever, dicts with
      frames: uint8 [local_batch, 2T, H, W, 3], clips 1 and 2 one after the
        other, each frame top-left in the raw_size canvas, zeros elsewhere;
      sizes: int32 [local_batch, 2], (height, width) of the valid region;
      video_index: int32 [local_batch], the videos' indices in the split.
  """
  index, _, local_batch = _process(process_index, process_count,
                                   config.batch_size)
  source = ensure_built(config).as_data_source(
      config.input.split, decoders={"video": _EncodedFrames()})
  _steps_per_epoch(len(source), config.batch_size)  # Fails early if too small.
  element = _PretrainElement(
      source=source, seed=config.seed, batch_size=config.batch_size,
      local_batch=local_batch, process_index=index,
      num_out=2 * config.input.num_frames,
      max_rate=float(config.input.max_rate),
      raw_size=tuple(int(s) for s in config.input.raw_size))
  # Element k is video k % local_batch of step k // local_batch: index-based, so
  # grain's threads may finish in any order and the output order is fixed.
  first = start_step * local_batch
  dataset = grain.MapDataset.range(first, 2**62).map(element)
  threads = config.input.get("num_threads", 0) or min(16, os.cpu_count() or 1)
  prefetch = config.input.prefetch * local_batch
  dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=threads if prefetch else 0, prefetch_buffer_size=prefetch))
  return iter(dataset.batch(local_batch))
