"""HMDB-51: 6,766 movie and web clips of 51 actions, three official splits.

Built from the files users download themselves (manual dir), extracted:

  hmdb51_org/<class>/<video>.avi          (hmdb51_org.rar, and the 51 class
                                           .rar files inside it)
  testTrainMulti_7030_splits/<class>_test_splitN.txt   (test_train_splits.rar)

A split file lists every video of its class as `<video>.avi <id>`: 1 train,
2 test, 0 unused in that split (70/30 per class). Classes are the split
files' class names in sorted order, so labels are 0..50 alphabetically.
Splits: train and test of the config's official split.
"""

import collections
import glob
import os
import pathlib
import re
import sys

try:
  from tfds_builders import video_builder, video_io
except ImportError:  # `tfds build` imports this folder as top-level `hmdb51`.
  sys.path.append(str(pathlib.Path(__file__).resolve().parents[2]))
  from tfds_builders import video_builder, video_io  # pylint: disable=g-import-not-at-top

_VIDEOS = "hmdb51_org"
_LISTS = "testTrainMulti_7030_splits"
_SPLIT_IDS = {"1": "train", "2": "test"}  # "0": not used in this split.


class Builder(video_builder.VideoBuilder):
  """HMDB-51 from its official archives (short side 128, split 1 by default)."""

  BUILDER_CONFIGS = video_builder.official_split_configs()
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download hmdb51_org.rar and test_train_splits.rar from
  https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/
  and extract them in the manual dir DIR (Python cannot read RAR):
    unrar x test_train_splits.rar DIR/          # DIR/testTrainMulti_7030_splits/
    unrar x hmdb51_org.rar DIR/hmdb51_org/      # 51 class archives
    for f in DIR/hmdb51_org/*.rar; do unrar x "$f" DIR/hmdb51_org/; done
  giving DIR/hmdb51_org/<class>/<video>.avi.
  """

  def _list_videos(self, manual_dir):
    lists_dir = os.path.join(manual_dir, _LISTS)
    if not os.path.isdir(lists_dir):
      raise video_io.missing_error(
          manual_dir, _LISTS + "/", "test_train_splits.rar",
          f"extract it there (Python cannot read RAR): `unrar x "
          f"test_train_splits.rar {manual_dir}/`")
    videos_dir = os.path.join(manual_dir, _VIDEOS)
    if not glob.glob(os.path.join(videos_dir, "*", "*.avi")):
      raise video_io.missing_error(
          manual_dir, f"{_VIDEOS}/<class>/*.avi", "hmdb51_org.rar",
          "extract it and the class archives inside it there (Python cannot "
          f"read RAR): `unrar x hmdb51_org.rar {videos_dir}/` then `unrar x` "
          "each class .rar in that folder")
    k = self.builder_config.split_number
    pattern = re.compile(rf"(.+)_test_split{k}\.txt$")
    lists = {m.group(1): name for name in os.listdir(lists_dir)
             if (m := pattern.match(name))}
    if not lists:
      raise FileNotFoundError(f"No *_test_split{k}.txt in {lists_dir}.")
    names = sorted(lists)
    splits = collections.defaultdict(list)
    for label, class_name in enumerate(names):
      with open(os.path.join(lists_dir, lists[class_name])) as f:
        for line in f:
          if not line.strip():
            continue
          video, split_id = line.rsplit(maxsplit=1)
          if split_id not in _SPLIT_IDS:
            continue
          relative = f"{class_name}/{video}"
          splits[_SPLIT_IDS[split_id]].append(video_io.Job(
              name=f"{_VIDEOS}/{relative}",
              source=os.path.join(videos_dir, relative),
              example={"label": label,
                       "video_id": os.path.splitext(video)[0]}))
    return names, {split: splits[split] for split in ("train", "test")}
