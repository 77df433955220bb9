"""The input pipeline's benchmark (`cvc_jax.benchmarks.input_pipeline`): what it
times, and that it times nothing else."""

import os
import threading
import time

import numpy as np

from cvc_jax import datasets
from cvc_jax import input_pipeline
from cvc_jax import sampling
from cvc_jax.benchmarks import input_pipeline as bench


def test_pipeline_benchmark_times_an_evaluation_pass_from_its_creation():
  # An evaluation stream prepares batches from the moment it is created: that
  # work is inside the timing (timed after a first batch instead, two
  # prefetched evaluation batches once came out 1.7x the decoder's own rate).
  def make_iterator():
    time.sleep(0.2)  # what a stream does before its first batch is asked for
    return iter([{"mask": np.ones(4)}])
  wall, _ = bench._pass_rate(make_iterator)  # pylint: disable=protected-access
  assert wall <= 4 / 0.2


def test_pipeline_benchmark_waits_for_the_last_streams_threads():
  # A closed stream's threads finish their batches; the next measurement must
  # not share the cores with them.
  stop = time.perf_counter() + 1.0

  def spin():
    while time.perf_counter() < stop:
      pass

  worker = threading.Thread(target=spin)
  worker.start()
  bench._wait_until_idle()  # pylint: disable=protected-access
  assert not worker.is_alive() and time.perf_counter() >= stop
  start = time.perf_counter()
  bench._wait_until_idle()  # pylint: disable=protected-access
  assert time.perf_counter() - start < 1.0  # idle already: one look of 0.2 s


def test_pipeline_benchmark_times_decode_frames_on_every_sample(monkeypatch):
  calls = []

  def decode_frames(encoded, indices, raw_size, out):
    assert out.shape == (len(indices), *raw_size, 3)
    calls.append((encoded[0], tuple(indices), raw_size))
    time.sleep(0.05)

  monkeypatch.setattr(input_pipeline, "decode_frames", decode_frames)
  samples = [([bytes([i])], np.arange(i, i + 3)) for i in range(6)]
  wall, _ = bench._frames_rate(samples, (8, 12))  # pylint: disable=protected-access
  # After one call per thread to warm up, every sample once into an 8 x 12 canvas.
  timed = calls[-len(samples):]
  assert sorted(timed) == [(bytes([i]), (i, i + 1, i + 2), (8, 12)) for i in range(6)]
  assert wall <= min(len(samples), os.cpu_count() or 1) / 0.05


def test_pipeline_benchmark_times_the_frames_the_pipeline_decodes(data_dir, monkeypatch):
  # pylint: disable=protected-access
  config = bench._config("synthetic_motion/tiny", str(data_dir), 4)
  # The decoding it times alone: the distinct frames pretrain_batches reads.
  source = datasets.data_source(config, "train")
  samples = bench._pretrain_samples(config, source,
                                    bench._pretrain_videos(config, len(source), range(3, 4)))
  batch = next(input_pipeline.pretrain_batches(config, start_step=3))
  assert len(samples) == len(batch["frames"]) == 4
  for (encoded, indices), clip in zip(samples, batch["frames"]):
    frames = [encoded[i] for i in np.unique(indices)]
    decoded, _ = input_pipeline.decode_frames(frames, np.arange(len(frames)),
                                              config.input.raw_size)
    # Each distinct frame once, as decode_frames decodes it (the synthetic
    # frames carry pixel noise, so no two are alike).
    assert len(frames) == len(np.unique(clip, axis=0))
    np.testing.assert_array_equal(np.unique(decoded, axis=0), np.unique(clip, axis=0))
  waits = []
  monkeypatch.setattr(bench, "_wait_until_idle", lambda: waits.append(1))
  rates = bench.measure("synthetic_motion/tiny", str(data_dir), split="train",
                        eval_split="test", batch_size=4, batches=1, repeats=1)
  assert len(waits) == 6  # before each of the six measurements
  assert rates.keys() == {f"{kind}{part}{cpu}" for kind in ("pretrain", "eval")
                          for part in ("", "_decode", "_frames") for cpu in ("", "_cpu")}
  assert all(rate > 0 for rate in rates.values()), rates
  read, data_source = {}, datasets.data_source

  class Recording:  # a data source that notes which records are read
    def __init__(self, config, split):
      self.split, self.source = split, data_source(config, split)

    def __len__(self):
      return len(self.source)

    def __getitem__(self, i):
      read.setdefault(self.split, []).append(i)
      return self.source[i]

  monkeypatch.setattr(datasets, "data_source", Recording)
  costs = bench.per_video_costs("synthetic_motion/tiny", str(data_dir), split="train",
                                eval_split="test", videos=2, repeats=1)
  # Reading is timed on the videos that are decoded: step 0's, and the first two.
  step_0 = [int(v) for v in sampling.step_videos(config.seed, 0, split_size=len(
      data_source(config, "train")), batch_size=2)]
  assert step_0 != [0, 1]  # else the check below could not tell the orders apart
  assert read["train"] == step_0 * 2 and read["test"] == [0, 1] * 2
  assert {k: sorted(v) for k, v in costs.items()} == {
      k: ["decode_frames_ms", "decode_ms", "read_parse_ms"] for k in ("pretrain", "eval")}
  assert all(ms > 0 for v in costs.values() for ms in v.values()), costs
