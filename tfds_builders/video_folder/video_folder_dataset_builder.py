"""video_folder: your own videos, listed in an annotations.csv.

The manual dir is any folder holding `annotations.csv` with a header and the
columns path,label,split:

  path,label,split
  cooking/clip_001.mp4,cooking,train
  sports/clip_017.avi,sports,test

`path` is relative to the folder; `label` is a class name (classes are
numbered in sorted order of their names); `split` is train, validation or
test. Any format FFmpeg reads works (.mp4, .avi, .mkv, .webm, ...). The
video_id of a video is its path without the extension.
"""

import csv
import os
import pathlib
import sys

try:
  from tfds_builders import video_builder, video_io
except ImportError:  # `tfds build` imports this folder as top-level.
  sys.path.append(str(pathlib.Path(__file__).resolve().parents[2]))
  from tfds_builders import video_builder, video_io  # pylint: disable=g-import-not-at-top

ANNOTATIONS = "annotations.csv"
_SPLITS = ("train", "validation", "test")


class Builder(video_builder.VideoBuilder):
  """Videos in a folder, labelled by annotations.csv (short side 128 default)."""

  BUILDER_CONFIGS = video_builder.size_variants(
      video_builder.VideoConfig, [dict(name="default")])
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Pass the folder of your videos as the manual dir; it must hold
  annotations.csv with the columns path,label,split (see the module doc).
  """

  def _list_videos(self, manual_dir):
    path = os.path.join(manual_dir, ANNOTATIONS)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"No {ANNOTATIONS} in {manual_dir}: write one with the columns "
          "path,label,split (paths relative to that folder).")
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
    if rows and not {"path", "label", "split"} <= set(rows[0]):
      raise ValueError(f"{path}: the columns must include path,label,split; "
                       f"got {sorted(rows[0])}.")
    if bad := sorted({row["split"] for row in rows} - set(_SPLITS)):
      raise ValueError(f"{path}: unknown split(s) {bad}; use {_SPLITS}.")
    names = sorted({row["label"] for row in rows})
    label_of = {name: i for i, name in enumerate(names)}
    splits = {}
    for row in rows:
      splits.setdefault(row["split"], []).append(video_io.Job(
          name=row["path"], source=os.path.join(manual_dir, row["path"]),
          example={"label": label_of[row["label"]],
                   "video_id": os.path.splitext(row["path"])[0]}))
    return names, splits
