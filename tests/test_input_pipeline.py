"""The synthetic_motion builder and the input pipelines (SPEC sections 1 and 6).

Which frames are sampled is tested in tests/test_sampling.py, the pipeline's
benchmark in tests/test_input_benchmark.py.
"""

import os

import ml_collections
import numpy as np
import pytest

from configs import common
from cvc_jax import datasets
from cvc_jax import input_pipeline
from cvc_jax import pretrain
from cvc_jax import sampling
from tfds_builders.synthetic_motion import synthetic_motion_dataset_builder as sm

NUM_FRAMES = 4  # T: windows of 2T = 8 frames


def _config(data_dir, **input_overrides):
  """runlocal config on the tiny synthetic set; unlocked, so tests may add keys."""
  config = common.base()
  common.runlocal(config)  # batch 8, T = 4, raw size 40 x 48
  config.input.dataset = "synthetic_motion/tiny"
  config.input.data_dir = str(data_dir)
  for key, value in input_overrides.items():
    config.input[key] = value
  return config


@pytest.fixture(scope="module")
def examples(data_dir):
  """All tiny videos, split -> list of decoded examples (in record order)."""
  builder = datasets.ensure_built(_config(data_dir))
  out = {}
  for split in ("train", "test"):
    source = builder.as_data_source(split)
    out[split] = [dict(source[i]) for i in range(len(source))]
    for ex in out[split]:
      ex["video"] = np.stack(ex["video"])  # TFDS's NumPy path gives a list.
  return out


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# ----------------------------------------------------------------------------
# The builder.


def test_builder_splits_and_features(data_dir, examples):
  builder = datasets.ensure_built(_config(data_dir))
  assert builder.info.splits["train"].num_examples == 16
  assert builder.info.splits["test"].num_examples == 8
  assert str(builder.info.file_format.value) == "array_record"
  ids = [ex["video_id"] for exs in examples.values() for ex in exs]
  assert len(set(ids)) == 24
  for ex in examples["train"] + examples["test"]:
    n = ex["num_frames"]
    assert sm.MIN_FRAMES <= n <= sm.MAX_FRAMES
    assert ex["video"].shape == (n, sm.HEIGHT, sm.WIDTH, 3)
    assert ex["video"].dtype == np.uint8
    assert ex["object_box"].shape == (n, 4)
    assert ex["fps"] == 25.0
    assert ex["label"] == ex["label_static"]
    assert 0 <= ex["label_static"] < 4 and 0 <= ex["label_dynamic"] < 4
  for split in ("train", "test"):  # Both labels vary within each split.
    assert len({ex["label_static"] for ex in examples[split]}) > 1
    assert len({ex["label_dynamic"] for ex in examples[split]}) > 1
  assert len({ex["num_frames"] for ex in examples["train"]}) > 1


def test_labels_are_drawn_independently():
  # Labels are drawn before rendering from a per-video seed: check the joint
  # distribution of the default split's first 128 videos without the builder.
  pairs = np.array([[sm.make_video("train", i)[k]
                     for k in ("label_static", "label_dynamic")]
                    for i in range(128)])
  joint = np.zeros((4, 4))
  np.add.at(joint, (pairs[:, 0], pairs[:, 1]), 1)
  assert (joint > 0).all(), joint  # Every (static, dynamic) pair occurs.
  expected = np.outer(joint.sum(1), joint.sum(0)) / joint.sum()
  chi2 = ((joint - expected) ** 2 / expected).sum()
  assert chi2 < 21.7, chi2  # 99th percentile of chi2 with 9 dof.


def test_object_box_moves_with_dynamic_label(examples):
  names = sm.DYNAMIC_NAMES
  for ex in examples["train"] + examples["test"]:
    box = ex["object_box"]
    # Per-frame motion in pixels, unwrapping the torus (steps < half a frame).
    dy = ((np.diff(box[:, 0]) + 0.5) % 1 - 0.5) * sm.HEIGHT
    dx = ((np.diff(box[:, 1]) + 0.5) % 1 - 0.5) * sm.WIDTH
    label = names[ex["label_dynamic"]]
    along, across = (dx, dy) if label == "horizontal" else (dy, dx)
    np.testing.assert_array_equal(across, 0)
    if label == "still":
      np.testing.assert_array_equal(along, 0)
    else:
      direction = {"up": -1, "down": 1}.get(label, np.sign(along.sum()))
      # Rendering rounds positions, so single steps vary by a pixel.
      assert (along * direction >= sm.SPEED[0] - 1).all(), (label, along)
      assert (along * direction <= sm.SPEED[1] + 1).all(), (label, along)
      speed = along.sum() * direction / len(along)
      assert sm.SPEED[0] - 0.1 <= speed <= sm.SPEED[1] + 0.1


def test_object_box_is_where_the_object_is(examples):
  # The centre of every box is object-coloured (+ noise), wherever it wraps.
  colours = np.array([[220, 40, 40], [40, 200, 60], [50, 80, 230], [235, 215, 40]])
  for ex in examples["train"]:
    box = ex["object_box"]
    cy = np.floor(((box[:, 0] + box[:, 2]) / 2 % 1) * sm.HEIGHT).astype(int)
    cx = np.floor(((box[:, 1] + box[:, 3]) / 2 % 1) * sm.WIDTH).astype(int)
    centre = ex["video"][np.arange(len(box)), cy, cx].astype(float)
    err = np.abs(centre - colours[ex["label_static"]]).max(-1)
    assert (err < 80).all(), (ex["video_id"], err.max())


# ----------------------------------------------------------------------------
# Pretraining batches (frame sampling itself: tests/test_sampling.py).


def test_batches_shapes_dtypes_and_canvas(data_dir, examples):
  config = _config(data_dir, raw_size=(48, 56))  # Larger than the 40 x 48 frames.
  assert datasets.num_videos(config) == 16
  assert datasets.steps_per_epoch(config) == 2
  batch = next(input_pipeline.pretrain_batches(config))
  assert batch["frames"].shape == (8, 2 * NUM_FRAMES, 48, 56, 3)
  assert batch["frames"].dtype == np.uint8
  assert batch["sizes"].dtype == np.int32 and batch["video_index"].dtype == np.int32
  np.testing.assert_array_equal(batch["sizes"], [[40, 48]] * 8)
  frames = batch["frames"]
  assert (frames[:, :, 40:] == 0).all() and (frames[:, :, :, 48:] == 0).all()
  assert (frames[:, :, :40, :48].reshape(8, 2 * NUM_FRAMES, -1).max(-1) > 0).all()

  # Centre crop when the canvas is smaller: the same frames, cut.
  small = _config(data_dir, raw_size=(32, 40))
  cropped = next(input_pipeline.pretrain_batches(small))
  np.testing.assert_array_equal(cropped["sizes"], [[32, 40]] * 8)
  np.testing.assert_array_equal(cropped["frames"], frames[:, :, 4:36, 4:44])

  # Every sampled frame is a frame of its video, in SPEC order.
  for frames_v, index in zip(frames, batch["video_index"]):
    video = examples["train"][index]["video"]
    matches = [np.flatnonzero(np.abs(video.astype(int) - f[:40, :48]).max((1, 2, 3)) == 0)
               for f in frames_v]
    assert all(len(m) for m in matches)
    assert (np.diff([m[0] for m in matches]) >= 1).all()


@pytest.mark.parametrize("step", [0, 3])
def test_process_shards_are_disjoint_and_make_the_global_batch(data_dir, step):
  config = _config(data_dir)
  whole = next(input_pipeline.pretrain_batches(config, start_step=step))
  assert len(set(whole["video_index"].tolist())) == 8
  for count in (1, 2, 4):
    shards = [next(input_pipeline.pretrain_batches(
        config, start_step=step, process_index=p, process_count=count))
              for p in range(count)]
    for key in ("video_index", "frames", "sizes"):
      joined = np.concatenate([s[key] for s in shards])
      np.testing.assert_array_equal(joined, whole[key], err_msg=f"{count} {key}")
  with pytest.raises(ValueError, match="divide"):
    input_pipeline.pretrain_batches(config, process_index=0, process_count=3)


def test_epochs_visit_every_video_once_in_new_orders(data_dir):
  config = _config(data_dir)
  batches = _take(input_pipeline.pretrain_batches(config), 4)  # Two epochs.
  order = [np.concatenate([a["video_index"], b["video_index"]])
           for a, b in (batches[0:2], batches[2:4])]
  for epoch in order:
    assert sorted(epoch.tolist()) == list(range(16))
  assert not np.array_equal(order[0], order[1])
  config.seed = 1
  other = next(input_pipeline.pretrain_batches(config))
  assert not np.array_equal(other["video_index"], batches[0]["video_index"])


def test_resume_yields_the_uninterrupted_batches(data_dir):
  config = _config(data_dir)
  uninterrupted = _take(input_pipeline.pretrain_batches(config), 6)
  resumed = _take(input_pipeline.pretrain_batches(config, start_step=5), 1)
  for key in ("video_index", "frames", "sizes"):
    np.testing.assert_array_equal(resumed[0][key], uninterrupted[5][key])
  # Same batches without threads or prefetching: parallelism does not matter.
  serial = _config(data_dir, prefetch=0, num_threads=1)
  for got, want in zip(_take(input_pipeline.pretrain_batches(serial), 6),
                       uninterrupted):
    np.testing.assert_array_equal(got["frames"], want["frames"])


def test_short_videos_are_sampled_with_repetition(data_dir, examples):
  config = _config(data_dir, num_frames=16, max_rate=3.0)  # 2T = 32 frames
  lengths = np.array([ex["num_frames"] for ex in examples["train"]])
  assert (lengths < 32).any() and (lengths >= 32).any()
  seen = set()
  for batch in _take(input_pipeline.pretrain_batches(config), 2):  # One epoch.
    for frames, index in zip(batch["frames"], batch["video_index"]):
      seen.add(int(index))
      repeats = (frames[1:] == frames[:-1]).all((1, 2, 3))
      assert (frames.reshape(32, -1).max(-1) > 0).all()  # no blank padding frames
      if lengths[index] < 32:
        assert repeats.any(), index
        # Stretched over the whole video: first and last frames are sampled.
        video = examples["train"][index]["video"]
        np.testing.assert_array_equal(frames[0][:40, :48], video[0])
        np.testing.assert_array_equal(frames[-1][:40, :48], video[-1])
      else:
        assert not repeats.any(), index  # The object moves or the noise changes.
  assert seen == set(range(16))  # Short videos are not dropped.


def test_errors_are_clear(tmp_path, data_dir):
  config = _config(data_dir)
  config.batch_size = 32
  with pytest.raises(ValueError, match="fewer than the global batch"):
    datasets.steps_per_epoch(config)
  config = _config(tmp_path)
  config.input.dataset = "ucf101"  # Needs downloaded files: not built for us.
  with pytest.raises(FileNotFoundError, match="tfds build tfds_builders/ucf101"):
    datasets.ensure_built(config)


def test_a_canvas_that_is_not_height_and_width_is_named(data_dir):
  config = _config(data_dir, raw_size=(40,))
  with pytest.raises(ValueError, match=r"raw_size is the frame canvas \(height, width\)"):
    next(input_pipeline.pretrain_batches(config))
  # Several processes build the batch's shapes first: the same message there.
  with pytest.raises(ValueError, match=r"raw_size is the frame canvas \(height, width\)"):
    pretrain.batch_shapes(config)


def test_decoding_threads_without_sched_getaffinity(monkeypatch):
  config = ml_collections.ConfigDict({"input": {"num_threads": 0, "num_workers": 0}})
  monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows: none
  monkeypatch.setattr(os, "cpu_count", lambda: 3)
  assert input_pipeline._threads(config) == 3  # pylint: disable=protected-access
  config.input.num_threads = 5
  assert input_pipeline._threads(config) == 5  # pylint: disable=protected-access


def test_frames_smaller_than_the_crop_are_named():
  from tfds_builders import video_builder  # pylint: disable=g-import-not-at-top
  configs = {c.name: c for c in video_builder.official_split_configs()}
  warning = datasets.upsampling_warning(configs["split1"], 224)
  assert "'split1' have a short side of 128 px, under the 224 px crop" in warning
  assert "ucf101/split1_short256" in warning
  assert datasets.upsampling_warning(configs["split1"], 112) is None
  assert datasets.upsampling_warning(configs["split1_short256"], 224) is None
  assert datasets.upsampling_warning(configs["split1_native"], 224) is None
  # Builders without a stored size (synthetic_motion) are left alone.
  assert datasets.upsampling_warning(sm.Builder.BUILDER_CONFIGS[0], 224) is None


def test_frames_larger_than_the_canvas_are_named():
  from tfds_builders import video_builder  # pylint: disable=g-import-not-at-top
  configs = {c.name: c for c in video_builder.official_split_configs()}
  warning = datasets.cropping_warning(configs["split1_short256"], (128, 228))
  assert ("'split1_short256' have a short side of 256 px, over the 128 x 228 canvas"
          in warning and "--config.input.raw_size='(256, 456)'" in warning), warning
  assert datasets.cropping_warning(configs["split1_short256"], (256, 456)) is None
  assert datasets.cropping_warning(configs["split1"], (128, 228)) is None
  assert datasets.cropping_warning(configs["split1_native"], (128, 228)) is None
  assert datasets.cropping_warning(sm.Builder.BUILDER_CONFIGS[0], (40, 48)) is None


# ----------------------------------------------------------------------------
# Evaluation batches (SPEC section 6).


@pytest.mark.parametrize("batch_size", [4, 12])  # no padding; 4 padded slots
def test_eval_batches_count_every_video_once(data_dir, examples, batch_size):
  config = _config(data_dir)
  config.batch_size = batch_size
  test = examples["test"]  # 8 videos
  assert input_pipeline.num_eval_batches(config, "test") == -(-8 // batch_size)
  whole = list(input_pipeline.eval_batches(config, split="test", num_clips=3))
  assert len(whole) == -(-8 // batch_size)
  batch = {k: np.concatenate([b[k] for b in whole]) for k in whole[0]}
  assert batch["frames"].shape == (len(whole) * batch_size, 3, NUM_FRAMES, 40, 48, 3)
  real = batch["mask"] == 1
  np.testing.assert_array_equal(batch["video_index"][real], np.arange(8))
  assert (batch["video_index"][~real] == -1).all()
  assert (batch["frames"][~real] == 0).all() and real.sum() == 8
  for i, ex in enumerate(test):
    assert batch["label"][i] == ex["label"]
    clips = sampling.eval_clip_indices(ex["num_frames"], num_clips=3,
                                       clip_length=NUM_FRAMES)
    np.testing.assert_array_equal(batch["frames"][i], ex["video"][clips])
  np.testing.assert_array_equal(batch["sizes"][real], [[40, 48]] * 8)
  dynamic, = list(input_pipeline.eval_batches(  # Another label, same videos.
      config, split="test", num_clips=3, label_key="label_dynamic"))[:1]
  np.testing.assert_array_equal(
      dynamic["label"][:min(8, batch_size)],
      [ex["label_dynamic"] for ex in test[:batch_size]])
  # Over 1, 2 and 4 processes: the same batches, split into disjoint slices,
  # and every process yields the same number of them.
  for count in (2, 4):
    shards = [list(input_pipeline.eval_batches(
        config, split="test", num_clips=3, process_index=p, process_count=count))
              for p in range(count)]
    assert {len(s) for s in shards} == {len(whole)}
    for step, want in enumerate(whole):
      for key in want:
        got = np.concatenate([s[step][key] for s in shards])
        np.testing.assert_array_equal(got, want[key], err_msg=f"{count} {key}")


# ----------------------------------------------------------------------------
# Supervised training clips.


def test_train_clip_batches(data_dir, examples):
  config = _config(data_dir, max_rate=3.0)  # Ignored: supervised clips are rate 1.
  batches = _take(input_pipeline.train_clip_batches(config), 4)  # Two epochs.
  for batch in batches:
    assert batch["frames"].shape == (8, NUM_FRAMES, 40, 48, 3)
    assert batch["label"].dtype == np.int32
    for frames, label, index in zip(batch["frames"], batch["label"],
                                    batch["video_index"]):
      ex = examples["train"][index]
      assert label == ex["label"]
      # T consecutive frames of the video.
      start = np.flatnonzero((ex["video"] == frames[0]).all((1, 2, 3)))[0]
      np.testing.assert_array_equal(frames, ex["video"][start:start + NUM_FRAMES])
  for epoch in (batches[0:2], batches[2:4]):
    assert sorted(np.concatenate([b["video_index"] for b in epoch])) == list(range(16))
  resumed = next(input_pipeline.train_clip_batches(config, start_step=3))
  for key in batches[3]:
    np.testing.assert_array_equal(resumed[key], batches[3][key])
  for count in (2, 4):
    shards = [next(input_pipeline.train_clip_batches(
        config, start_step=3, process_index=p, process_count=count))
              for p in range(count)]
    for key in batches[3]:
      np.testing.assert_array_equal(
          np.concatenate([s[key] for s in shards]), batches[3][key])
  # A video shorter than T is stretched with repeated frames, not dropped.
  long_clip = _config(data_dir, num_frames=48)
  batch = next(input_pipeline.train_clip_batches(long_clip))
  assert batch["frames"].shape[1] == 48 and len(set(batch["video_index"])) == 8


def test_worker_processes_yield_the_same_batches(data_dir):
  config = _config(data_dir)
  want = _take(input_pipeline.pretrain_batches(config, start_step=1), 3)
  config.input.num_workers = 2  # grain worker processes instead of threads
  got = input_pipeline.pretrain_batches(config, start_step=1)
  for have, expected in zip(_take(got, 3), want):
    for key in expected:
      np.testing.assert_array_equal(have[key], expected[key])
  got.close()  # Stops the workers now rather than at garbage collection.
