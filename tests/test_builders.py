"""The video builders over fake copies of each official layout.

Every fake video is tiny (8-20 frames of 64 x 48 or 48 x 64) and painted with
its own label and frame count, so a test can tell from the stored frames
that each video landed in the right split under the right label. Every
layout also has one corrupt file and one listed-but-missing file, which the
build must skip and list in its manifest.
"""

import csv
import io
import json
import os
import subprocess
import tarfile
import zipfile

import av
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import common
from cvc_jax import input_pipeline
from tfds_builders import video_io

with tfds.core.registered.skip_registration():
  # Unregistered, as the input pipeline uses them: TFDS's catalogue has its own
  # `ucf101`.
  from tfds_builders import diving48, hmdb51, kinetics400, ucf101, video_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("ApplyEyeMakeup", "Archery", "HandstandPushups")


def write_video(path, *, label, num_frames, landscape=True, mp4=False):
  """A fake video: red = 40 + 60 label, green = 10 x frame (decoded +- few)."""
  height, width = (48, 64) if landscape else (64, 48)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, "w", format="mp4" if mp4 else "avi") as container:
    stream = container.add_stream("libx264" if mp4 else "mpeg4", rate=25)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if not mp4:
      stream.codec_context.codec_tag = "XVID"  # As UCF-101's .avi files.
    for i in range(num_frames):
      frame = np.zeros((height, width, 3), np.uint8)
      frame[..., 0], frame[..., 1] = 40 + 60 * label, 10 * i
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def write_corrupt(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(4000))


def build(module, config, manual_dir, data_dir, num_workers=0):
  """Builds (in-process decoding unless told) and returns the built builder."""
  builder = module.Builder(config=config, data_dir=str(data_dir))
  builder.num_workers = num_workers
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir)))
  return module.Builder(config=config, data_dir=str(data_dir))  # As read back.


def contents(builder, split):
  """video_id -> (label, num_frames, first frame's shape, red, green ramp)."""
  out = {}
  for ex in builder.as_data_source(split):
    video = np.stack(ex["video"])
    assert len(video) == ex["num_frames"]
    out[ex["video_id"].decode()] = (
        int(ex["label"]), int(ex["num_frames"]), video.shape[1:],
        round(float(video[..., 0].mean() - 40) / 60),
        round(float(video[-1, ..., 1].mean() - video[0, ..., 1].mean()) / 10))
  return out


def check(builder, expected, skipped):
  """expected: split -> {video_id: (label, num_frames, landscape)}."""
  assert set(builder.info.splits) == set(expected)
  for split, videos in expected.items():
    got = contents(builder, split)
    assert set(got) == set(videos), split
    for video_id, (label, n, landscape) in videos.items():
      shape = (128, 171, 3) if landscape else (171, 128, 3)  # short side 128
      # Label, length, aspect, and the content painted for that label/length.
      assert got[video_id] == (label, n, shape, label, n - 1), (split, video_id)
  manifest = video_io.read_manifest(builder.data_path)
  for split, videos in expected.items():
    assert manifest[split]["built"] == len(videos)
  listed = {(split, entry["video"]): entry["reason"].split(":")[0]
            for split in expected for entry in manifest[split]["skipped_videos"]}
  assert listed == skipped
  assert sum(manifest[s]["skipped"] for s in expected) == len(skipped)


# ----------------------------------------------------------------------------
# UCF-101: class folders, classInd and split lists (here zipped, as downloaded).


@pytest.fixture(scope="module")
def ucf_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("ucf_manual")
  lists = {"classInd.txt": "".join(f"{i + 1} {c}\r\n"
                                   for i, c in enumerate(CLASSES))}
  train, test = [], []
  for label, name in enumerate(CLASSES):
    # The real data set spells this one class differently in file names.
    stem = "HandStandPushups" if name == "HandstandPushups" else name
    for group in (1, 8, 9):
      relative = f"{name}/v_{stem}_g{group:02d}_c01.avi"
      write_video(root / "UCF-101" / relative, label=label,
                  num_frames=8 + group + label, landscape=group != 9)
      (test if group == 1 else train).append(relative)
  write_corrupt(root / "UCF-101" / "Archery" / "v_Archery_g10_c01.avi")
  train += ["Archery/v_Archery_g10_c01.avi", "Archery/v_Archery_g11_c01.avi"]
  for k in (1, 2, 3):
    lists[f"trainlist0{k}.txt"] = "".join(
        f"{r} {CLASSES.index(r.split('/')[0]) + 1}\r\n" for r in train)
    lists[f"testlist0{k}.txt"] = "".join(f"{r}\r\n" for r in test)
  with zipfile.ZipFile(root / "UCF101TrainTestSplits-RecognitionTask.zip",
                       "w") as z:
    for name, text in lists.items():
      z.writestr(f"ucfTrainTestlist/{name}", text)
  return root


def test_ucf101(ucf_dir, tmp_path):
  # Decoded on a process pool (2 workers), as a real build.
  builder = build(ucf101, "split1", ucf_dir, tmp_path, num_workers=2)
  assert builder.info.features["label"].names == list(CLASSES)
  assert str(builder.info.file_format.value) == "array_record"
  stem = lambda c: "HandStandPushups" if c == "HandstandPushups" else c
  expected = {
      "train": {f"v_{stem(c)}_g{g:02d}_c01": (i, 8 + g + i, g != 9)
                for i, c in enumerate(CLASSES) for g in (8, 9)},
      "test": {f"v_{stem(c)}_g01_c01": (i, 9 + i, True)
               for i, c in enumerate(CLASSES)}}
  check(builder, expected, {
      ("train", "UCF-101/Archery/v_Archery_g10_c01.avi"): "corrupt",
      ("train", "UCF-101/Archery/v_Archery_g11_c01.avi"): "missing"})


def test_ucf101_configs_and_rar_message(tmp_path):
  names = [c.name for c in ucf101.Builder.BUILDER_CONFIGS]
  assert names[0] == "split1" and ucf101.Builder.BUILDER_CONFIGS[0].short_side == 128
  assert {"split2", "split3_short256", "split1_native"} <= set(names)
  (tmp_path / "UCF101.rar").write_bytes(b"Rar!")
  with pytest.raises(FileNotFoundError, match=r"unrar x .*UCF101\.rar"):
    build(ucf101, "split1", tmp_path, tmp_path / "data")


# ----------------------------------------------------------------------------
# HMDB-51: class folders and per-class split files (1 train, 2 test, 0 unused).


def test_hmdb51(tmp_path):
  root = tmp_path / "manual"
  classes = ("brush_hair", "cartwheel", "wave")
  expected = {"train": {}, "test": {}}
  for label, name in enumerate(classes):
    lines = []
    for j, split_id in enumerate(("1", "2", "0", "1")):
      video = f"{name}_clip_{j}_f_cm_np1_le_med_{j}"
      if split_id != "0":  # An unused video need not be there at all.
        write_video(root / "hmdb51_org" / name / f"{video}.avi", label=label,
                    num_frames=10 + j, landscape=j != 3)
        expected[{"1": "train", "2": "test"}[split_id]][video] = (
            label, 10 + j, j != 3)
      lines.append(f"{video}.avi {split_id} \n")
    if name == "wave":
      write_corrupt(root / "hmdb51_org" / "wave" / "broken.avi")
      lines += ["broken.avi 2 \n", "gone.avi 1 \n"]
    (root / "testTrainMulti_7030_splits").mkdir(parents=True, exist_ok=True)
    for k in (1, 2, 3):
      (root / "testTrainMulti_7030_splits" / f"{name}_test_split{k}.txt"
       ).write_text("".join(lines))
  builder = build(hmdb51, "split2", root, tmp_path / "data")
  assert builder.info.features["label"].names == list(classes)
  check(builder, expected, {("test", "hmdb51_org/wave/broken.avi"): "corrupt",
                            ("train", "hmdb51_org/wave/gone.avi"): "missing"})


# ----------------------------------------------------------------------------
# Diving-48: rgb/*.mp4 in the downloaded .tar.gz, V2 and V1 label files.


def test_diving48_from_the_archive_with_v2_and_v1_labels(tmp_path):
  root = tmp_path / "manual"
  vocab = [["Back", "15som", "05Twis", "FREE"], ["Forward", "25som", "NoTwis", "PIKE"],
           ["Inward", "35som", "NoTwis", "TUCK"]]
  entries = {"train": [], "test": []}
  expected = {"train": {}, "test": {}}
  for i in range(6):
    split, label = ("train", "test")[i % 2], i % 3
    vid = f"-abc{i}_{i:05d}"
    write_video(root / "rgb" / f"{vid}.mp4", label=label, num_frames=12 + i,
                landscape=i != 4, mp4=True)
    entries[split].append(dict(vid_name=vid, label=label, start_frame=0,
                               end_frame=11 + i))
    expected[split][vid] = (label, 12 + i, i != 4)
  write_corrupt(root / "rgb" / "bad_00000.mp4")
  entries["train"] += [dict(vid_name="bad_00000", label=0, start_frame=0, end_frame=9),
                       dict(vid_name="gone_00000", label=1, start_frame=0, end_frame=9)]
  with tarfile.open(root / "Diving48_rgb.tar.gz", "w:gz") as tar:
    tar.add(root / "rgb", arcname="rgb")
  for path in (root / "rgb").iterdir():
    path.unlink()
  (root / "rgb").rmdir()  # Only the archive is left.
  (root / "Diving48_vocab.json").write_text(json.dumps(vocab))
  for split in ("train", "test"):
    (root / f"Diving48_V2_{split}.json").write_text(json.dumps(entries[split]))
  builder = build(diving48, "v2", root, tmp_path / "data")
  assert builder.info.features["label"].names[1] == "Forward/25som/NoTwis/PIKE"
  check(builder, expected, {("train", "rgb/bad_00000.mp4"): "corrupt",
                            ("train", "rgb/gone_00000.mp4"): "missing"})
  first = next(iter(builder.as_data_source("train")))
  assert first["end_frame"] == first["num_frames"] - 1

  # V1: its own label files, which it asks for by name when they are absent.
  v1 = diving48.Builder(config="v1", data_dir=str(tmp_path / "data"))
  with pytest.raises(FileNotFoundError, match="Diving48_train.json"):
    v1._list_videos(str(root))  # pylint: disable=protected-access
  for split in ("train", "test"):
    flipped = [dict(e, label=2 - e["label"]) for e in entries[split]]
    (root / f"Diving48_{split}.json").write_text(json.dumps(flipped))
  _, splits = v1._list_videos(str(root))  # pylint: disable=protected-access
  assert [job.example["label"] for job in splits["test"]] == [
      2 - e["label"] for e in entries["test"]]


def test_a_cut_archive_keeps_what_was_read_and_skips_the_rest(tmp_path, caplog):
  # Incompressible members, so the cut lands inside the third of four.
  rng = np.random.default_rng(0)
  videos = [rng.integers(0, 256, 50_000, np.uint8).tobytes() for _ in range(4)]
  path = tmp_path / "videos.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    for i, data in enumerate(videos):
      info = tarfile.TarInfo(f"rgb/v{i}.mp4")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  whole = path.read_bytes()
  path.write_bytes(whole[:len(whole) * 5 // 8])
  jobs = [video_io.Job(f"rgb/v{i}.mp4", "", {}) for i in range(4)]
  got = list(video_io.ArchiveJobs(str(path), jobs))
  assert [job.source for job in got[:2]] == videos[:2]
  assert [job.source for job in got[2:]] == [  # paths that do not exist: missing
      os.path.join(str(path), f"v{i}.mp4") for i in (2, 3)]
  assert [os.path.basename(job.name) for job in got] == ["v0.mp4", "v1.mp4", "v2.mp4",
                                                        "v3.mp4"]
  assert "is truncated or corrupt after 2 wanted files" in caplog.text
  assert "download it again" in caplog.text
  assert "Skipped: 0 corrupt videos, 2 not read (missing)" in caplog.text
  # A zip with one corrupt member: only that one is lost.
  caplog.clear()
  zip_path = tmp_path / "videos.zip"
  with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as archive:
    for i, data in enumerate(videos):
      archive.writestr(f"rgb/v{i}.mp4", data)
  whole = bytearray(zip_path.read_bytes())
  at = whole.index(videos[1]) + 1000
  whole[at] ^= 0xFF
  zip_path.write_bytes(bytes(whole))
  got = list(video_io.ArchiveJobs(str(zip_path), jobs))
  assert [os.path.basename(job.name) for job in got] == ["v0.mp4", "v2.mp4", "v3.mp4",
                                                        "v1.mp4"]
  assert [job.source for job in got[:3]] == [videos[0], videos[2], videos[3]]
  assert "1 of the wanted members are corrupt (rgb/v1.mp4 (BadZipFile" in caplog.text
  assert "Skipped: 1 corrupt videos, 0 not read (missing)" in caplog.text
  # Skipped with its own reason, which the manifest lists.
  _, example, reason = video_io.encode_job(got[3], None)
  assert example is None and reason.startswith("corrupt in the archive: BadZipFile")
  # Not an archive at all: named, with what to do.
  (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
  with pytest.raises(video_io.ArchiveError, match="junk.tar.gz is truncated or corrupt"):
    list(video_io.archive_members(str(tmp_path / "junk.tar.gz"), lambda m: True))


# ----------------------------------------------------------------------------
# Kinetics-400 (Beam) through the real `tfds build` command; video_folder.


def test_kinetics400_with_tfds_build(tmp_path):
  root = tmp_path / "manual"
  classes = ("abseiling", "passing American football (in game)", "zumba")
  expected = {"train": {}, "validation": {}}
  for split, folder in (("train", "train"), ("validation", "val")):
    rows = []
    for label, name in enumerate(classes):
      for j in range(2):
        youtube_id, start = f"{folder}{label}{j}-Xy_z", 10 * j
        video_id = f"{youtube_id}_{start:06d}_{start + 10:06d}"
        # Class folders for train, flat for val: both layouts exist.
        path = (root / folder / name if split == "train" else root / folder
                ) / f"{video_id}.mp4"
        write_video(path, label=label, num_frames=8 + 2 * j + label,
                    landscape=j == 0, mp4=True)
        expected[split][video_id] = (label, 8 + 2 * j + label, j == 0)
        rows.append(dict(label=name, youtube_id=youtube_id, time_start=start,
                         time_end=start + 10, split=folder))
    rows.append(dict(label="zumba", youtube_id="vanished", time_start=0,
                     time_end=10, split=folder))
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"{folder}.csv", "w", newline="") as f:
      writer = csv.DictWriter(f, list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  write_corrupt(root / "val" / "vanished_000000_000010.mp4")
  # Beam's default here: one worker process per core (multi_processing).
  result = subprocess.run(
      ["tfds", "build", "tfds_builders/kinetics400", "--config=default",
       f"--manual_dir={root}", f"--data_dir={tmp_path / 'data'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  builder = kinetics400.Builder(config="default", data_dir=str(tmp_path / "data"))
  assert builder.info.features["label"].names == sorted(classes)
  check(builder, expected, {
      ("train", "train/vanished_000000_000010.mp4"): "missing",
      ("validation", "val/vanished_000000_000010.mp4"): "corrupt"})


def test_video_folder(tmp_path):
  root = tmp_path / "mine"
  rows, expected = [], {"train": {}, "test": {}}
  for i, (label, name) in enumerate([(1, "dogs"), (0, "cats"), (1, "dogs"),
                                     (0, "cats"), (2, "eels")]):
    split = "test" if i == 3 else "train"
    path = f"{name}/clip {i}.{'mp4' if i % 2 else 'avi'}"
    write_video(root / path, label=label, num_frames=8 + i, landscape=i != 2,
                mp4=bool(i % 2))
    rows.append(f'"{path}",{name},{split}\n')
    expected[split][os.path.splitext(path)[0]] = (label, 8 + i, i != 2)
  write_corrupt(root / "broken.avi")
  rows += ["broken.avi,cats,test\n", "nowhere/gone.mp4,eels,train\n"]
  (root / "annotations.csv").write_text("path,label,split\n" + "".join(rows))
  builder = build(video_folder, "default", root, tmp_path / "data")
  assert builder.info.features["label"].names == ["cats", "dogs", "eels"]
  check(builder, expected, {("test", "broken.avi"): "corrupt",
                            ("train", "nowhere/gone.mp4"): "missing"})

  # The input pipeline reads what the builders write.
  config = common.base()
  common.runlocal(config)
  config.input.update(dataset="video_folder", data_dir=str(tmp_path / "data"),
                      raw_size=(128, 160))
  config.batch_size = 2
  batch, = input_pipeline.eval_batches(config, split="test", num_clips=2)
  np.testing.assert_array_equal(batch["mask"], [1, 0])
  assert batch["frames"].shape == (2, 2, 4, 128, 160, 3)
  assert batch["label"][0] == 0 and abs(batch["frames"][0, ..., 0].mean() - 40) < 4
  batch = next(input_pipeline.train_clip_batches(config))
  # Landscape 128 x 171 frames cropped to the canvas, portrait ones to 128 wide.
  assert {tuple(size) for size in batch["sizes"]} <= {(128, 160), (128, 128)}
  np.testing.assert_array_equal(  # painted with its label
      np.round((batch["frames"][..., 0].mean((1, 2, 3)) - 40) / 60),
      batch["label"])


def test_a_split_of_unreadable_videos_is_named(tmp_path):
  root = tmp_path / "bad"
  write_corrupt(root / "a.avi")
  write_corrupt(root / "b.avi")
  (root / "annotations.csv").write_text("path,label,split\na.avi,x,train\nb.avi,y,train\n")
  with pytest.raises(ValueError, match=r"No readable video in split 'train': all 2 were "
                                       r"skipped \(a.avi: .*; b.avi: .*\)"):
    build(video_folder, "default", root, tmp_path / "data")
  # A split whose list names no video at all says so, not "all 0 were skipped".
  builder = video_folder.Builder(config="default", data_dir=str(tmp_path / "data"))
  with pytest.raises(ValueError, match="No video is listed for split 'test': its list"):
    list(builder._generate_examples("test", []))  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# The shared pieces.


def test_output_size_keeps_aspect():
  assert video_io.output_size(240, 320, 128) == (128, 171)
  assert video_io.output_size(320, 240, 256) == (341, 256)
  assert video_io.output_size(101, 99, 128) == (131, 128)
  assert video_io.output_size(48, 64, None) == (48, 64)


def test_encode_video_native_size_and_fps(tmp_path):
  write_video(tmp_path / "v.avi", label=1, num_frames=9)
  frames, fps = video_io.encode_video(str(tmp_path / "v.avi"), None)
  assert len(frames) == 9 and fps == 25.0
  image = np.asarray(Image.open(io.BytesIO(frames[4])))
  assert image.shape == (48, 64, 3)
  assert abs(image[..., 0].mean() - 100) < 4 and abs(image[..., 1].mean() - 40) < 4
  with open(tmp_path / "v.avi", "rb") as f:  # Bytes (from an archive) too.
    assert len(video_io.encode_video(f.read(), 128)[0]) == 9
  (tmp_path / "cut.avi").write_bytes((tmp_path / "v.avi").read_bytes()[:200])
  with pytest.raises(video_io.VideoError, match="corrupt|no frames"):
    video_io.encode_video(str(tmp_path / "cut.avi"), 128)


def test_configs_of_every_builder():
  for module, default in ((ucf101, "split1"), (hmdb51, "split1"),
                          (diving48, "v2"), (kinetics400, "default"),
                          (video_folder, "default")):
    configs = {c.name: c.short_side for c in module.Builder.BUILDER_CONFIGS}
    assert module.Builder.BUILDER_CONFIGS[0].name == default
    assert configs[default] == 128
    assert sorted(configs.values(), key=str).count(None) == len(configs) // 3
    assert 256 in configs.values()
