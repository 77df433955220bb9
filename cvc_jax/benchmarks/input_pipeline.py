r"""Input pipeline throughput against the host's JPEG-decode limit.

    python -m cvc_jax.benchmarks.input_pipeline --dataset=ucf101 --data_dir=DATA
    python -m cvc_jax.benchmarks.input_pipeline --fake_videos=96 --tf_data

Prints samples/s per host core for pretraining (two clips of 16 frames at a
random rate) and evaluation (ten clips of 16), each next to the rate at which
the same frames, the same JPEG bytes, decode in the same run with nothing
else to do: a pool of one thread per core calling the decoder the pipeline
uses. The pipeline can only approach that rate; the ratio says what reading,
parsing, sampling and batching cost on top. Each rate is given per wall-clock
second (divided by the cores) and per CPU-second this process used: on a
machine shared with other jobs only the second is stable. (With
`input.num_workers` the work leaves this process; the benchmark times the
default, threads.)

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
flags.DEFINE_string("eval_split", "test", "Evaluation split.")
flags.DEFINE_integer("batch_size", 16, "Videos per batch (this host).")
flags.DEFINE_integer("batches", 8, "Batches timed per measurement (evaluation: "
                     "at most a pass over its split).")
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


def _rate(make_iterator, batches: int, count=lambda b: len(b["frames"])):
  """(samples/s, samples per CPU second) of a new stream's first `batches`
  batches, timed from its creation: the batches it prepares ahead (prefetch)
  are done inside the timing, not before it starts."""
  def run():
    iterator = make_iterator()
    return sum(count(next(iterator)) for _ in range(batches))
  samples, wall, cpu = _timed(run)
  return samples / wall, samples / cpu


def _decode_rate(samples: list[list[bytes]]):
  """(samples/s, samples per CPU second) decoding the samples' frames, one
  thread per core, with the pipeline's decoder."""
  def decode(frames):
    for data in frames:
      ip._decode_jpeg(data)  # pylint: disable=protected-access
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(decode, samples[:os.cpu_count()]))  # Warm up the threads.
    n, wall, cpu = _timed(lambda: len(list(pool.map(decode, samples))))
  return n / wall, n / cpu


def _pretrain_frames(config, source, steps: int) -> list[list[bytes]]:
  """The JPEG bytes pretrain_batches decodes in its first `steps` steps
  (distinct ones)."""
  out = []
  for step in range(steps):
    for video in sampling.step_videos(config.seed, step, split_size=len(source),
                                      batch_size=config.batch_size):
      encoded = source[int(video)]["video"]
      indices = sampling.sample_indices(
          len(encoded), sampling.video_rng(config.seed, step, int(video)),
          num_out=2 * config.input.num_frames, max_rate=config.input.max_rate)
      out.append([encoded[i] for i in np.unique(indices)])
  return out


def _eval_frames(config, source, count: int) -> list[list[bytes]]:
  out = []
  for video in range(min(count, len(source))):
    encoded = source[video]["video"]
    indices = sampling.eval_clip_indices(len(encoded), num_clips=NUM_CLIPS,
                                         clip_length=config.input.num_frames)
    out.append([encoded[i] for i in np.unique(indices)])
  return out


def measure(dataset: str, data_dir: str, *, split: str, eval_split: str,
            batch_size: int, batches: int, repeats: int) -> dict[str, float]:
  """Samples/s of the pipeline and of raw decoding, pretraining and evaluation.

  Each is timed `repeats` times, alternating, and the best time kept: on a
  shared machine the fastest run is the one least disturbed by others.
  """
  config = _config(dataset, data_dir, batch_size)
  config.input.split = split
  datasets.steps_per_epoch(config)  # Fails early if the split is too small.
  source = datasets.data_source(config, split)
  eval_source = datasets.data_source(config, eval_split)
  num_eval = min(batches, ip.num_eval_batches(config, eval_split))
  pretrain_frames = _pretrain_frames(config, source, batches)
  eval_frames = _eval_frames(config, eval_source, num_eval * batch_size)
  results = {}
  for _ in range(repeats):
    for key, rate in (
        ("pretrain", lambda: _rate(lambda: ip.pretrain_batches(config), batches)),
        ("pretrain_decode", lambda: _decode_rate(pretrain_frames)),
        ("eval", lambda: _rate(
            lambda: ip.eval_batches(config, split=eval_split, num_clips=NUM_CLIPS),
            num_eval, count=lambda b: int(b["mask"].sum()))),
        ("eval_decode", lambda: _decode_rate(eval_frames))):
      wall, cpu = rate()
      results[key] = max(results.get(key, 0.0), wall)
      results[key + "_cpu"] = max(results.get(key + "_cpu", 0.0), cpu)
  sizes = [len(b) for b in source[0]["video"]]
  logging.info("Pretraining decodes %.1f distinct frames per sample; frames "
               "of the first video average %.1f KB.",
               np.mean([len(f) for f in pretrain_frames]), np.mean(sizes) / 1e3)
  return results


def per_video_costs(dataset: str, data_dir: str, *, split: str, eval_split: str,
                    videos: int = 32, repeats: int = 3) -> dict[str, dict[str, float]]:
  """Milliseconds per video in one thread, for pretraining (`split`, step 0's
  sampling) and evaluation (`eval_split`), over its first `videos` videos:
  reading and parsing the record, decoding its distinct sampled frames bare,
  and `decode_frames` of the same (decoding plus writing every sampled frame
  into the canvas). Each the best of `repeats` (reading varied 4x between
  passes here)."""
  best = lambda fn: min(_timed(fn)[1] for _ in range(repeats))
  config = _config(dataset, data_dir, 1)
  raw = sampling.raw_size(config)
  t, out = config.input.num_frames, {}
  for kind, name in (("pretrain", split), ("eval", eval_split)):
    source = datasets.data_source(config, name)
    n = min(videos, len(source))
    read = best(lambda: [source[i] for i in range(n)])
    examples = [source[i] for i in range(n)]
    if kind == "pretrain":
      indices = [sampling.sample_indices(len(e["video"]), sampling.video_rng(config.seed, 0, i),
                                         num_out=2 * t, max_rate=config.input.max_rate)
                 for i, e in enumerate(examples)]
    else:
      indices = [sampling.eval_clip_indices(len(e["video"]), num_clips=NUM_CLIPS,
                                            clip_length=t) for e in examples]
    def bare():
      for e, i in zip(examples, indices):
        for k in np.unique(i):
          ip._decode_jpeg(e["video"][k])  # pylint: disable=protected-access
    def canvas():
      for e, i in zip(examples, indices):
        ip.decode_frames(e["video"], i, raw)
    out[kind] = {"read_parse_ms": 1e3 * read / n, "decode_ms": 1e3 * best(bare) / n,
                 "decode_frames_ms": 1e3 * best(canvas) / n}
  return out


def tf_data_rate(dataset: str, tf_data_dir: str, *, split: str,
                 batch_size: int, batches: int) -> float:
  """Pretraining samples/s of the same sampling and decoding in tf.data."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  config = _config(dataset, tf_data_dir, batch_size)
  name, kwargs = tfds.core.naming.parse_builder_name_kwargs(dataset)
  with tfds.core.registered.skip_registration():
    module = importlib.import_module(f"tfds_builders.{name.name}")
  builder = module.Builder(data_dir=tf_data_dir, file_format="tfrecord", **kwargs)
  num_out, height, width = 2 * config.input.num_frames, *config.input.raw_size

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
  ds = (ds.repeat().shuffle(64).map(sample, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size).prefetch(2))
  return _rate(lambda: iter(ds.as_numpy_iterator()), batches)


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
  rows = [("pretraining (2 x 16 frames)", r, "pretrain"),
          ("evaluation (10 x 16 frames)", r, "eval")]
  if FLAGS.tf_data:
    if not tf_data_dir:
      raise app.UsageError("--tf_data needs --tf_data_dir (or --fake_videos).")
    wall, cpu = zip(*(tf_data_rate(dataset, tf_data_dir, split=FLAGS.split,
                                   batch_size=FLAGS.batch_size,
                                   batches=FLAGS.batches)
                      for _ in range(FLAGS.repeats)))
    rows.append(("pretraining, tf.data", dict(
        r, tf=max(wall), tf_cpu=max(cpu), tf_decode=r["pretrain_decode"],
        tf_decode_cpu=r["pretrain_decode_cpu"]), "tf"))
  for name, values, key in rows:
    wall, raw = values[key] / cores, values[key + "_decode"] / cores
    cpu, raw_cpu = values[key + "_cpu"], values[key + "_decode_cpu"]
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
