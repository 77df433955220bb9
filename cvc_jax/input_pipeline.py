"""Input pipeline: TFDS video data sets -> per-process batches of raw frames.

The host only samples and decodes; all augmentation happens on the accelerator
(cvc_jax/views.py). For every video of a batch the host picks the frame
indices (pretraining: one window of 2T frames, SPEC section 1; supervised
training: one clip of T; evaluation: ten uniformly spaced clips of T, SPEC
section 6), decodes just those JPEG frames and pads them top-left into a
fixed [H, W] = `config.input.raw_size` canvas, reporting the true size
alongside, so batches have one static shape whatever the videos' sizes.

Reading: grain over the builders' ArrayRecord files, not tf.data. The
contract is that the batch of global step s is a pure function of (seed, s), so
that a resumed run continues with exactly the batches an uninterrupted run would
have seen, and each process reads only its own shard: a checkpoint needs to
hold only the step. With random access this is direct: step s names its
videos through an epoch permutation, and each element is computed from
(seed, step, video index) alone, so thread count and prefetch depth cannot
change the result, and resuming costs nothing. tf.data over TFRecords reads
sequentially: resuming would mean replaying (or `skip`ping through) every
earlier record, and its shuffle buffer and parallel interleave make the order
depend on buffer sizes unless made deterministic at a price. It is not faster
either: cvc_jax/benchmarks/input_pipeline.py times both (README, Data).
Decoding only the sampled frames is plain Python here (PIL releases the GIL,
so grain's threads decode in parallel; `input.num_workers` moves the work to
processes instead).

Multi-host: each process reads a contiguous slice of every global batch
(`config.batch_size` is global); the trainer assembles the global array with
`jax.make_array_from_process_local_data`. Evaluation pads the last batch and
marks real videos with `mask`, so every video counts exactly once.
"""

from collections.abc import Iterator, Sequence
import concurrent.futures
import dataclasses
import io
import os
from typing import Any

from absl import flags
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from cvc_jax import datasets
from cvc_jax import sampling


# ----------------------------------------------------------------------------
# Decoding.


def _decode_jpeg(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    # Our builders store RGB; convert() would copy every frame once more.
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def decode_frames(encoded: Sequence[bytes], indices: np.ndarray,
                  raw_size: Sequence[int], out: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Decodes `encoded[indices]` into a zero canvas, each frame at the top left.

  Frames larger than the canvas are centre-cropped to it first.

  Args:
    encoded: a video's JPEG frames.
    indices: which to decode, any shape; repeated ones are decoded once.
    raw_size: the canvas, (H, W).
    out: where to write (uint8 [indices.size, H, W, 3]); a new array if None.

  Returns:
    frames: uint8 [indices.size, H, W, 3] (`out` if given).
    size: int32 [2], the (height, width) of the valid top-left region.
  """
  height, width = raw_size
  unique, inverse = np.unique(indices, return_inverse=True)
  # Each output frame is written once, only its margins zeroed: after the
  # decoding itself, memory traffic is the host's main cost per sample.
  canvas = (np.empty((inverse.size, height, width, 3), np.uint8)
            if out is None else out)
  size = np.array([height, width], np.int32)
  frames = []
  for index in unique:
    frame = _decode_jpeg(encoded[index])
    h, w = frame.shape[:2]
    top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
    frames.append(frame[top:top + height, left:left + width])
  for position, k in enumerate(inverse.reshape(-1)):
    frame = frames[k]
    h, w = frame.shape[:2]
    canvas[position, :h, :w] = frame
    canvas[position, h:] = 0
    canvas[position, :h, w:] = 0
    size = np.minimum(size, (h, w)).astype(np.int32)
  return canvas, size


_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _each(fn, n: int, threads: int) -> None:
  """fn(0), ..., fn(n - 1), on a shared pool of `threads` threads."""
  if threads <= 1:
    for i in range(n):
      fn(i)
    return
  if threads not in _POOLS:  # Per process: never pickled with the dataset.
    _POOLS[threads] = concurrent.futures.ThreadPoolExecutor(
        threads, thread_name_prefix="cvc_decode")
  list(_POOLS[threads].map(fn, range(n)))


# ----------------------------------------------------------------------------
# Pretraining batches.


@dataclasses.dataclass(frozen=True)
class _ClipsBatch:
  """Global step s -> this process's batch of sampled, decoded videos.

  Whole batches, decoded in place by a pool of threads, rather than one
  element per video: stacking per-video arrays into a batch would copy every
  frame once more. A picklable class rather than a closure, so the stream can
  move to grain's worker processes (`input.num_workers`).
  """
  source: Any  # datasets.Videos: random access by video index.
  seed: int
  batch_size: int  # global
  local_batch: int
  process_index: int
  num_out: int  # 2T for pretraining, T for a supervised clip
  max_rate: float
  raw_size: tuple[int, int]
  with_label: bool
  threads: int

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    first = self.process_index * self.local_batch
    videos = sampling.step_videos(self.seed, step, split_size=len(self.source),
                                  batch_size=self.batch_size
                                  )[first:first + self.local_batch].astype(np.int32)
    out = {"frames": np.empty((self.local_batch, self.num_out, *self.raw_size, 3),
                              np.uint8),
           "sizes": np.empty((self.local_batch, 2), np.int32),
           "video_index": videos}
    if self.with_label:
      out["label"] = np.empty(self.local_batch, np.int32)

    def fill(slot):
      video_index = int(videos[slot])
      example = self.source[video_index]
      encoded = example["video"]
      indices = sampling.sample_indices(
          len(encoded), sampling.video_rng(self.seed, step, video_index),
          num_out=self.num_out, max_rate=self.max_rate)
      _, out["sizes"][slot] = decode_frames(encoded, indices, self.raw_size,
                                            out=out["frames"][slot])
      if self.with_label:
        out["label"][slot] = example["label"]

    _each(fill, self.local_batch, self.threads)
    return out


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

  Global step s takes the videos `sampling.step_videos(config.seed, s, ...)`;
  process p of P takes the p-th contiguous slice of local_batch = batch_size / P
  of them, so shards are disjoint and together make the global batch. Each
  video's frames are sampled by `sampling.sample_indices` with a generator
  seeded by (seed, s, video index). Hence a batch depends on (seed, s) only:
  resuming at start_step yields what an uninterrupted run yields from there.

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
  return _clip_batches(config, config.input.split, start_step, process_index,
                       process_count, num_out=2 * config.input.num_frames,
                       max_rate=float(config.input.max_rate), with_label=False,
                       label_key="label")


def train_clip_batches(config: ml_collections.ConfigDict, *,
                       split: str | None = None, start_step: int = 0,
                       label_key: str = "label",
                       process_index: int | None = None,
                       process_count: int | None = None,
                       ) -> Iterator[dict[str, np.ndarray]]:
  """Batches for supervised training (finetuning, linear probe), by step.

  As `pretrain_batches` (same epochs, shards and determinism by (seed, step)),
  but one clip of T = config.input.num_frames consecutive frames per video
  (rate 1, random start; shorter videos stretched with repeated frames),
  and the label.

  Args:
    config: reads seed, batch_size (global) and input.*.
    split: the split to read (default `config.input.split`).
    start_step: the first global step to yield, e.g. the restored step.
    label_key: the feature returned as "label".
    process_index: this process (default `jax.process_index()`).
    process_count: processes (default `jax.process_count()`).

  Yields:
    Forever, dicts with frames uint8 [local_batch, T, H, W, 3], sizes int32
    [local_batch, 2], label int32 [local_batch], video_index int32.
  """
  return _clip_batches(config, split or config.input.split, start_step,
                       process_index, process_count,
                       num_out=config.input.num_frames, max_rate=1.0,
                       with_label=True, label_key=label_key)


def _clip_batches(config, split, start_step, process_index, process_count, *,
                  num_out, max_rate, with_label, label_key):
  """pretrain_batches and train_clip_batches: one stream of sampled clips."""
  index, _, local_batch = _process(process_index, process_count,
                                   config.batch_size)
  source = datasets.data_source(config, split, label_key=label_key)
  sampling.whole_batches(len(source), config.batch_size)  # Fails early if too small.
  batch = _ClipsBatch(
      source=source, seed=config.seed, batch_size=config.batch_size,
      local_batch=local_batch, process_index=index, num_out=num_out,
      max_rate=max_rate, raw_size=sampling.raw_size(config), with_label=with_label,
      threads=_threads(config))
  return _stream(config, grain.MapDataset.range(start_step, 2**62).map(batch))


def _threads(config) -> int:
  """Decoding threads per process (1 in each of input.num_workers processes)."""
  if config.input.get("num_workers", 0):
    return 1
  if config.input.get("num_threads", 0):
    return config.input.num_threads
  # The cores this process may run on (a SLURM task's, not the node's), where
  # the platform says (Linux); else the machine's.
  if hasattr(os, "sched_getaffinity"):
    return min(16, len(os.sched_getaffinity(0)))
  return min(16, os.cpu_count() or 1)


def _stream(config, batches: grain.MapDataset):
  """Iterates `batches`, `config.input.prefetch` of them prepared ahead.

  Threads (input.num_workers = 0) start at once but share the GIL, which
  PIL releases only while decoding; worker processes (input.num_workers =
  N) take seconds to start and then share nothing. Batch s is the same
  either way: each is computed from its index alone.
  """
  prefetch = config.input.prefetch
  workers = config.input.get("num_workers", 0)
  if workers:
    if not flags.FLAGS.is_parsed():  # grain reads its flags; tests parse none.
      flags.FLAGS.mark_as_parsed()
    # Worker w computes batches w, w + N, ...; grain interleaves them back.
    return iter(batches.to_iter_dataset().mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers,
                                     per_worker_buffer_size=max(1, prefetch))))
  return iter(batches.to_iter_dataset(grain.ReadOptions(
      num_threads=prefetch, prefetch_buffer_size=prefetch)))


# ----------------------------------------------------------------------------
# Evaluation batches (SPEC section 6): every video once, ten clips each.


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
  """Batch g -> this process's slice of videos g B .. g B + B - 1, clips decoded."""
  source: Any
  batch_size: int  # global
  local_batch: int
  process_index: int
  num_clips: int
  clip_length: int
  raw_size: tuple[int, int]
  threads: int

  def __call__(self, batch: int) -> dict[str, np.ndarray]:
    first = batch * self.batch_size + self.process_index * self.local_batch
    positions = np.arange(first, first + self.local_batch)
    real = positions < len(self.source)
    b, shape = self.local_batch, (self.num_clips, self.clip_length)
    # Padding stays zeros (mask 0, video_index -1): nothing to decode.
    out = {"frames": np.zeros((b, *shape, *self.raw_size, 3), np.uint8),
           "sizes": np.tile(np.array(self.raw_size, np.int32), (b, 1)),
           "label": np.zeros(b, np.int32), "mask": real.astype(np.float32),
           "video_index": np.where(real, positions, -1).astype(np.int32)}

    def fill(slot):
      example = self.source[int(positions[slot])]
      encoded = example["video"]
      indices = sampling.eval_clip_indices(len(encoded), num_clips=self.num_clips,
                                           clip_length=self.clip_length)
      frames = out["frames"][slot].reshape(-1, *self.raw_size, 3)
      _, out["sizes"][slot] = decode_frames(encoded, indices, self.raw_size,
                                            out=frames)
      out["label"][slot] = example["label"]

    _each(fill, int(real.sum()), self.threads)  # Real videos come first.
    return out


def num_eval_batches(config: ml_collections.ConfigDict, split: str) -> int:
  """Batches `eval_batches` yields on every process: ceil(videos / batch)."""
  return -(-datasets.num_videos(config, split) // config.batch_size)


def eval_batches(config: ml_collections.ConfigDict, *, split: str,
                 num_clips: int = 10, label_key: str = "label",
                 process_index: int | None = None,
                 process_count: int | None = None,
                 ) -> Iterator[dict[str, np.ndarray]]:
  """This process's part of one pass over `split`: each video exactly once.

  Global batch g holds the videos g B .. g B + B - 1 of the split (B =
  config.batch_size), process p of P the p-th contiguous slice of B / P of
  them; the last batch is padded with `mask` 0. Every process yields the same
  number of batches (`num_eval_batches`), so collective steps stay in step.
  No randomness: the clips are `sampling.eval_clip_indices`.

  Args:
    config: reads batch_size (global) and input.{num_frames, raw_size, ...}.
    split: the split to evaluate ("test", "validation", ...).
    num_clips: uniformly spaced clips per video (SPEC section 6: ten).
    label_key: the feature returned as "label".
    process_index: this process (default `jax.process_index()`).
    process_count: processes (default `jax.process_count()`).

  Yields:
    dicts with
      frames: uint8 [local_batch, num_clips, T, H, W, 3] in the raw_size canvas;
      sizes: int32 [local_batch, 2], (height, width) of the valid region;
      label: int32 [local_batch];
      mask: float32 [local_batch], 1 for a video, 0 for padding;
      video_index: int32 [local_batch], index in the split (-1: padding).
  """
  index, _, local_batch = _process(process_index, process_count,
                                   config.batch_size)
  source = datasets.data_source(config, split, label_key=label_key)
  batch = _EvalBatch(
      source=source, batch_size=config.batch_size, local_batch=local_batch,
      process_index=index, num_clips=num_clips,
      clip_length=config.input.num_frames, raw_size=sampling.raw_size(config),
      threads=_threads(config))
  num_batches = -(-len(source) // config.batch_size)
  return _stream(config, grain.MapDataset.range(num_batches).map(batch))
