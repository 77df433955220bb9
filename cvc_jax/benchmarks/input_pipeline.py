r"""Input pipeline throughput against the host's JPEG-decode limit.

    python -m cvc_jax.benchmarks.input_pipeline --dataset=ucf101 --data_dir=DATA
    python -m cvc_jax.benchmarks.input_pipeline --fake_videos=96 --tf_data

Prints samples/s per host core for pretraining (two clips of 16 frames at a
random rate) and evaluation (ten clips of 16), each next to the rate at which
the same frames, the same JPEG bytes, decode in the same run with nothing
else to do: a pool of one thread per core calling the decoder the pipeline
uses. The pipeline can only approach that rate; the ratio says what reading,
parsing, sampling and batching cost on top. Below each, "decode_frames alone"
is the same pool calling `decode_frames` (decoding plus writing every sampled
frame into a canvas), the part of that cost that the threads do in parallel
and that grows with the frames written. Each rate is given per wall-clock
second (divided by the cores) and per CPU-second this process used: on a
machine shared with other jobs only the second is stable. (With
`input.num_workers` the work leaves this process; the benchmark times the
default, threads.) Pretraining is timed in the stream's steady state, past
its prefetching; evaluation over one whole pass of its split; each
measurement starts once the last one's threads are done. Then, per video
and in one thread, what the pipeline does beside decoding: reading and parsing
the record, and writing the sampled frames into the canvas (`decode_frames`
against bare decoding).

`--fake_videos=N` first writes N UCF-101-like videos (320 x 240 XviD .avi,
25 fps, about 7 s: the real data set's averages) in the `video_folder` layout
and builds them at short side 128, so the run needs no download. `--tf_data`
also times a tf.data pipeline doing the same sampling and decoding over a
TFRecord build of the same data (in fake mode it is built too; otherwise
pass `--tf_data_dir`), the measurement behind the pipeline's choice of grain.
"""

import concurrent.futures
import importlib
import os
import tempfile
import threading
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from configs import common
from cvc_jax import datasets
from cvc_jax import input_pipeline as ip
from cvc_jax import sampling

flags.DEFINE_string("dataset", "video_folder", "TFDS name, e.g. ucf101/split1.")
flags.DEFINE_string("data_dir", "", "TFDS data dir (default: TFDS's).")
flags.DEFINE_string("split", "train", "Pretraining split.")
flags.DEFINE_string("eval_split", "test", "Evaluation split: timed over one whole "
                    "pass, with every video's record held in memory for the bare "
                    "decoding (about 1.5 GB per 1000 UCF-101-like videos).")
flags.DEFINE_integer("batch_size", 16, "Videos per batch (this host).")
flags.DEFINE_integer("batches", 8, "Pretraining batches timed per measurement "
                     "(evaluation times one pass over its split).")
flags.DEFINE_integer("repeats", 3, "Times each measurement is repeated (the "
                     "best is kept).")
flags.DEFINE_integer("fake_videos", 0, "Write and build this many fake "
                     "UCF-101-like videos first, and measure on them.")
flags.DEFINE_bool("tf_data", False, "Also time the same sampling with tf.data.")
flags.DEFINE_string("tf_data_dir", "", "Data dir of a TFRecord build of the "
                    "data set, for --tf_data (fake mode builds one).")
FLAGS = flags.FLAGS

NUM_CLIPS = 10


def _config(dataset: str, data_dir: str, batch_size: int):
  config = common.base()  # T = 16, r_max = 3, canvas 128 x 228
  config.input.dataset, config.input.data_dir = dataset, data_dir
  config.batch_size = batch_size
  return config


def _timed(fn) -> tuple[int, float, float]:
  """(samples, wall seconds, CPU seconds of this process) of `fn()`."""
  wall, cpu = time.perf_counter(), time.process_time()
  samples = fn()
  return samples, time.perf_counter() - wall, time.process_time() - cpu


def _wait_until_idle(timeout: float = 30.0) -> None:
  """Returns once this process has used under 5 % of a core for 0.2 s, or warns
  after `timeout` seconds. A closed grain stream's threads finish the batches
  they had started, and bare decoding timed while they did ran at 0.6-0.7x its
  rate here, so each measurement waits for the last one's threads first."""
  deadline = time.perf_counter() + timeout
  while time.perf_counter() < deadline:
    cpu = time.process_time()
    time.sleep(0.2)
    if time.process_time() - cpu < 0.01:
      return
  logging.warning("This process stayed busy for %.0f s before a measurement; "
                  "it is timed sharing the cores.", timeout)


def _steady_rate(iterator, batches: int, warmup: int):
  """(samples/s, samples per CPU second) of an endless stream's `batches`
  batches after `warmup`: with warmup > its prefetch depth the stream is in its
  steady state, where the batches it prepares ahead are as far along when the
  timing starts as when it ends (timed right after one batch, those it had
  prefetched meanwhile made short streams look faster than decoding itself)."""
  for _ in range(warmup):
    next(iterator)
  samples, wall, cpu = _timed(
      lambda: sum(len(next(iterator)["frames"]) for _ in range(batches)))
  if hasattr(iterator, "close"):  # grain's: no prefetching into what comes next
    iterator.close()
  return samples / wall, samples / cpu


def _pass_rate(make_iterator):
  """(videos/s, videos per CPU second) of one whole evaluation pass, from the
  stream's creation to its end: none of its work falls outside the timing."""
  samples, wall, cpu = _timed(lambda: sum(int(b["mask"].sum()) for b in make_iterator()))
  return samples / wall, samples / cpu


def _decode_distinct(sample: tuple[list[bytes], np.ndarray]) -> None:
  """Decodes a sample's distinct frames with the pipeline's decoder, bare."""
  encoded, indices = sample
  for i in np.unique(indices):
    ip._decode_jpeg(encoded[i])  # pylint: disable=protected-access


def _pool_rate(fn, samples: list[tuple[list[bytes], np.ndarray]]):
  """(samples/s, samples per CPU second) of `fn(sample)` over the samples, one
  thread per core."""
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(fn, samples[:os.cpu_count()]))  # Warm up the threads.
    n, wall, cpu = _timed(lambda: len(list(pool.map(fn, samples))))
  return n / wall, n / cpu


def _frames_rate(samples: list[tuple[list[bytes], np.ndarray]], raw_size):
  """`_pool_rate` of `decode_frames`: decoding plus writing every sampled frame
  into the canvas, what the pipeline's threads do per sample. Each thread
  writes into one canvas of its own, allocated and written on its first call
  (the warm-up's, in practice; the pipeline writes into its batch's array,
  allocated once per batch)."""
  local = threading.local()
  size = max(indices.size for _, indices in samples)

  def fill(sample):
    if not hasattr(local, "canvas"):
      local.canvas = np.zeros((size, *raw_size, 3), np.uint8)
    encoded, indices = sample
    ip.decode_frames(encoded, indices, raw_size, out=local.canvas[:indices.size])

  return _pool_rate(fill, samples)


def _pretrain_videos(config, split_size: int, steps: range) -> list[tuple[int, int]]:
  """(step, video index) of every video of the global batches of `steps`."""
  return [(step, int(video)) for step in steps
          for video in sampling.step_videos(config.seed, step, split_size=split_size,
                                            batch_size=config.batch_size)]


def _pretrain_samples(config, source, videos: list[tuple[int, int]],
                      ) -> list[tuple[list[bytes], np.ndarray]]:
  """(a video's JPEG frames, the indices pretrain_batches decodes) of each
  (step, video index) of `_pretrain_videos`."""
  out = []
  for step, video in videos:
    encoded = source[video]["video"]
    out.append((encoded, sampling.sample_indices(
        len(encoded), sampling.video_rng(config.seed, step, video),
        num_out=2 * config.input.num_frames, max_rate=config.input.max_rate)))
  return out


def _eval_samples(config, source, count: int) -> list[tuple[list[bytes], np.ndarray]]:
  """(JPEG frames, the ten clips' indices) of the first `count` videos."""
  out = []
  for video in range(min(count, len(source))):
    encoded = source[video]["video"]
    out.append((encoded, sampling.eval_clip_indices(
        len(encoded), num_clips=NUM_CLIPS, clip_length=config.input.num_frames)))
  return out


def measure(dataset: str, data_dir: str, *, split: str, eval_split: str,
            batch_size: int, batches: int, repeats: int) -> dict[str, float]:
  """Samples/s of the pipeline, of `decode_frames` alone and of raw decoding,
  for pretraining and evaluation.

  Pretraining: `batches` batches in the stream's steady state; evaluation: one
  whole pass over `eval_split`. Each is timed `repeats` times, alternating, and
  the best time kept: on a shared machine the fastest run is the one least
  disturbed by others. Each starts once the process is idle
  (`_wait_until_idle`).
  """
  config = _config(dataset, data_dir, batch_size)
  config.input.split = split
  datasets.steps_per_epoch(config)  # Fails early if the split is too small.
  source = datasets.data_source(config, split)
  eval_source = datasets.data_source(config, eval_split)
  warmup = config.input.prefetch + 1
  raw = sampling.raw_size(config)
  pretrain = _pretrain_samples(
      config, source, _pretrain_videos(config, len(source), range(warmup, warmup + batches)))
  evaluation = _eval_samples(config, eval_source, len(eval_source))
  results = {}
  for _ in range(repeats):
    for key, rate in (
        ("pretrain", lambda: _steady_rate(ip.pretrain_batches(config), batches, warmup)),
        ("pretrain_decode", lambda: _pool_rate(_decode_distinct, pretrain)),
        ("pretrain_frames", lambda: _frames_rate(pretrain, raw)),
        ("eval", lambda: _pass_rate(
            lambda: ip.eval_batches(config, split=eval_split, num_clips=NUM_CLIPS))),
        ("eval_decode", lambda: _pool_rate(_decode_distinct, evaluation)),
        ("eval_frames", lambda: _frames_rate(evaluation, raw))):
      _wait_until_idle()
      wall, cpu = rate()
      results[key] = max(results.get(key, 0.0), wall)
      results[key + "_cpu"] = max(results.get(key + "_cpu", 0.0), cpu)
  sizes = [len(b) for b in source[0]["video"]]
  logging.info("Pretraining decodes %.1f distinct frames per sample; frames "
               "of the first video average %.1f KB.",
               np.mean([len(np.unique(i)) for _, i in pretrain]), np.mean(sizes) / 1e3)
  return results


def per_video_costs(dataset: str, data_dir: str, *, split: str, eval_split: str,
                    videos: int = 32, repeats: int = 3) -> dict[str, dict[str, float]]:
  """Milliseconds per video in one thread, for pretraining (`split`, step 0's
  sampling) and evaluation (`eval_split`, its first videos), over `videos`
  videos: reading and parsing their records, decoding their distinct sampled
  frames bare, and `decode_frames` of the same (decoding plus writing every
  sampled frame into the canvas, a new one for each video, as `decode_frames`
  makes without `out`). Each the best of `repeats` (reading varied 4x between
  passes here)."""
  config = _config(dataset, data_dir, videos)
  raw = sampling.raw_size(config)
  out = {}
  for kind, name in (("pretrain", split), ("eval", eval_split)):
    source = datasets.data_source(config, name)
    config.batch_size = min(videos, len(source))  # step 0's videos, for pretraining
    if kind == "pretrain":
      step_0 = _pretrain_videos(config, len(source), range(1))
      samples, read = _pretrain_samples(config, source, step_0), [v for _, v in step_0]
    else:
      samples = _eval_samples(config, source, videos)
      read = list(range(len(samples)))
    n = len(samples)

    def best(fn):
      _wait_until_idle()
      return 1e3 * min(_timed(fn)[1] for _ in range(repeats)) / n

    def bare():
      for sample in samples:
        _decode_distinct(sample)

    def canvas():
      for encoded, indices in samples:
        ip.decode_frames(encoded, indices, raw)

    out[kind] = {"read_parse_ms": best(lambda: [source[i] for i in read]),
                 "decode_ms": best(bare), "decode_frames_ms": best(canvas)}
  return out


def tf_data_rate(dataset: str, tf_data_dir: str, *, split: str,
                 batch_size: int, batches: int) -> tuple[float, float]:
  """(samples/s, samples per CPU second) of pretraining's sampling and decoding
  written in tf.data, in its steady state (`_steady_rate`)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  config = _config(dataset, tf_data_dir, batch_size)
  name, kwargs = tfds.core.naming.parse_builder_name_kwargs(dataset)
  with tfds.core.registered.skip_registration():
    module = importlib.import_module(f"tfds_builders.{name.name}")
  builder = module.Builder(data_dir=tf_data_dir, file_format="tfrecord", **kwargs)
  num_out, height, width = 2 * config.input.num_frames, *sampling.raw_size(config)

  def sample(example):
    encoded = example["video"]
    n = tf.shape(encoded)[0]
    high = tf.minimum(config.input.max_rate, tf.cast(n, tf.float32) / num_out)
    rate = tf.where(high > 1, tf.random.uniform([], 1.0, tf.maximum(high, 1.0)),
                    high)
    last = tf.maximum(0.0, tf.floor(tf.cast(n, tf.float32) - rate * num_out))
    start = tf.floor(tf.random.uniform([]) * (last + 1))
    index = tf.floor(start + rate * tf.range(num_out, dtype=tf.float32) + 0.5)
    index = tf.minimum(tf.cast(index, tf.int32), n - 1)
    unique, inverse = tf.unique(index)
    frames = tf.map_fn(
        lambda data: tf.image.resize_with_crop_or_pad(
            tf.io.decode_jpeg(data, channels=3), height, width),
        tf.gather(encoded, unique), fn_output_signature=tf.uint8)
    return {"frames": tf.gather(frames, inverse)}

  ds = builder.as_dataset(split, decoders={"video": tfds.decode.SkipDecoding()},
                          shuffle_files=True)
  prefetch = config.input.prefetch  # as deep as the grain stream's
  ds = (ds.repeat().shuffle(64).map(sample, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size).prefetch(prefetch))
  return _steady_rate(iter(ds.as_numpy_iterator()), batches, warmup=prefetch + 1)


def _fake_data(num_videos: int, root: str) -> str:
  """Writes and builds fake UCF-101-like videos; returns the data dir."""
  from tfds_builders.video_folder import video_folder_dataset_builder as vf  # pylint: disable=g-import-not-at-top
  from cvc_jax.benchmarks import fake_videos  # pylint: disable=g-import-not-at-top

  manual = os.path.join(root, "videos")
  fake_videos.write_folder(manual, num_videos)
  data_dir = os.path.join(root, "data")
  for file_format, directory in (("array_record", data_dir),
                                 ("tfrecord", data_dir + "_tfrecord")):
    if FLAGS.tf_data or file_format == "array_record":
      builder = vf.Builder(data_dir=directory, file_format=file_format)
      if not builder.is_prepared():
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual))
  return data_dir


def main(argv):
  del argv
  dataset, data_dir, tf_data_dir = FLAGS.dataset, FLAGS.data_dir, FLAGS.tf_data_dir
  if FLAGS.fake_videos:
    root = data_dir or tempfile.mkdtemp(prefix="cvc_bench_")
    dataset, data_dir = "video_folder", _fake_data(FLAGS.fake_videos, root)
    tf_data_dir = data_dir + "_tfrecord"
  cores = os.cpu_count() or 1
  r = measure(dataset, data_dir, split=FLAGS.split, eval_split=FLAGS.eval_split,
              batch_size=FLAGS.batch_size, batches=FLAGS.batches,
              repeats=FLAGS.repeats)
  print(f"{dataset}: {cores} host cores, grain with {cores} decoding threads, "
        f"batch {FLAGS.batch_size}, T = 16, canvas 128 x 228.")
  print(f"{'samples/s per core:':28}{'pipeline':>10}{'raw decode':>12}"
        f"{'ratio':>7}  | per CPU-second:{'pipeline':>10}{'raw decode':>12}"
        f"{'ratio':>7}")
  # (row, its rate's key in r, the raw decoding it is set against)
  rows = [("pretraining (2 x 16 frames)", "pretrain", "pretrain_decode"),
          ("  decode_frames alone", "pretrain_frames", "pretrain_decode"),
          ("evaluation (10 x 16 frames)", "eval", "eval_decode"),
          ("  decode_frames alone", "eval_frames", "eval_decode")]
  if FLAGS.tf_data:
    if not tf_data_dir:
      raise app.UsageError("--tf_data needs --tf_data_dir (or --fake_videos).")

    def tf_rate():
      _wait_until_idle()
      return tf_data_rate(dataset, tf_data_dir, split=FLAGS.split,
                          batch_size=FLAGS.batch_size, batches=FLAGS.batches)

    wall, cpu = zip(*(tf_rate() for _ in range(FLAGS.repeats)))
    r.update(tf=max(wall), tf_cpu=max(cpu))
    rows.append(("pretraining, tf.data", "tf", "pretrain_decode"))
  for name, key, decode in rows:
    wall, raw = r[key] / cores, r[decode] / cores
    cpu, raw_cpu = r[key + "_cpu"], r[decode + "_cpu"]
    print(f"{name:28}{wall:10.1f}{raw:12.1f}{wall / raw:7.0%}  | "
          f"{'':15}{cpu:10.1f}{raw_cpu:12.1f}{cpu / raw_cpu:7.0%}")
  costs = per_video_costs(dataset, data_dir, split=FLAGS.split,
                          eval_split=FLAGS.eval_split)
  print(f"\n{'ms per video, one thread:':28}{'read+parse':>12}{'decode':>10}"
        f"{'decode_frames':>15}{'ratio':>7}")
  for name, kind in (("pretraining", "pretrain"), ("evaluation", "eval")):
    c = costs[kind]
    print(f"{name:28}{c['read_parse_ms']:12.2f}{c['decode_ms']:10.2f}"
          f"{c['decode_frames_ms']:15.2f}{c['decode_frames_ms'] / c['decode_ms']:7.2f}")


if __name__ == "__main__":
  app.run(main)
