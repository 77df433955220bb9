"""Diving-48: 18,000 competitive dives in 48 classes, V2 (cleaned) labels.

Built from the files users download themselves (manual dir):

  rgb/<vid_name>.mp4            (Diving48_rgb.tar.gz, extracted or as it is)
  Diving48_V2_train.json, Diving48_V2_test.json   (the V2 labels: default)
  Diving48_train.json, Diving48_test.json         (V1, for the `v1` configs)
  Diving48_vocab.json

The label lists are JSON lists of {vid_name, label, start_frame, end_frame};
the clips in rgb/ are already cut to those frames, so the bounds are stored
as they are, not applied. Class k is named after vocab entry k, the dive's
take-off, somersaults, twists and flight position joined by "/". V2 fixed
label errors of V1 (and dropped some videos); the paper reports V2.
"""

import dataclasses
import json
import os
import pathlib
import sys

import numpy as np
import tensorflow_datasets as tfds

try:
  from tfds_builders import video_builder, video_io
except ImportError:  # `tfds build` imports this folder as top-level `diving48`.
  sys.path.append(str(pathlib.Path(__file__).resolve().parents[2]))
  from tfds_builders import video_builder, video_io  # pylint: disable=g-import-not-at-top

_ARCHIVE = "Diving48_rgb.tar.gz"
_LABEL_FILES = {"v2": "Diving48_V2_{split}.json", "v1": "Diving48_{split}.json"}


@dataclasses.dataclass
class Diving48Config(video_builder.VideoConfig):
  labels: str = "v2"  # Which label files: "v2" or "v1".


class Builder(video_builder.VideoBuilder):
  """Diving-48 from its official files (short side 128, V2 labels by default)."""

  BUILDER_CONFIGS = video_builder.size_variants(Diving48Config, [
      dict(name="v2", labels="v2", description="V2 labels (cleaned)."),
      dict(name="v1", labels="v1", description="V1 labels (original).")])
  EXTRA_FEATURES = {
      "start_frame": tfds.features.Scalar(dtype=np.int32),
      "end_frame": tfds.features.Scalar(dtype=np.int32),
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download Diving48_rgb.tar.gz, Diving48_V2_train.json, Diving48_V2_test.json
  and Diving48_vocab.json (and, for the v1 configs, Diving48_train.json and
  Diving48_test.json) from http://www.svcl.ucsd.edu/projects/resound/dataset.html
  into the manual dir. The archive may stay packed (it is read once per
  split) or be extracted there (DIR/rgb/*.mp4), which builds faster.
  """

  def _list_videos(self, manual_dir):
    vocab = json.loads(self._read(manual_dir, "Diving48_vocab.json"))
    names = ["/".join(str(part) for part in entry) for entry in vocab]
    rgb = os.path.join(manual_dir, "rgb")
    archive = os.path.join(manual_dir, _ARCHIVE)
    if not os.path.isdir(rgb) and not os.path.exists(archive):
      raise video_io.missing_error(manual_dir, "rgb/", _ARCHIVE,
                                   "put it there (or extract it there)")
    splits = {}
    for split in ("train", "test"):
      file = _LABEL_FILES[self.builder_config.labels].format(split=split)
      jobs = [video_io.Job(
          name=f"rgb/{entry['vid_name']}.mp4",
          source=os.path.join(rgb, f"{entry['vid_name']}.mp4"),
          example={"label": int(entry["label"]),
                   "video_id": entry["vid_name"],
                   "start_frame": np.int32(entry.get("start_frame", -1)),
                   "end_frame": np.int32(entry.get("end_frame", -1))})
              for entry in json.loads(self._read(manual_dir, file))]
      # Read the packed archive only when the videos are not extracted.
      splits[split] = (jobs if os.path.isdir(rgb)
                       else video_io.ArchiveJobs(archive, jobs))
    return names, splits

  def _read(self, manual_dir: str, name: str) -> str:
    path = os.path.join(manual_dir, name)
    if not os.path.exists(path):
      version = ("V1 label files (the v1 configs)" if
                 self.builder_config.labels == "v1" else name)
      raise FileNotFoundError(
          f"Did not find {name} in the manual dir {manual_dir}: download "
          f"{version} from the Diving-48 page into it.")
    with open(path) as f:
      return f.read()
