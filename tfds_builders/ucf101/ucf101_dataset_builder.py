"""UCF-101: 13,320 YouTube clips of 101 human actions, three official splits.

Built from the files users download themselves (manual dir):

  UCF-101/<Class>/v_<Class>_gXX_cYY.avi   (UCF101.rar, extracted)
  ucfTrainTestlist/classInd.txt, trainlist0N.txt, testlist0N.txt
      (UCF101TrainTestSplits-RecognitionTask.zip, extracted or as it is)

Unlike TFDS's catalogue `ucf101`, frames keep their aspect ratio (short side
128 by default; 256 and native configs), the build decodes on every core,
and videos that cannot be read are skipped and listed in manifest.json
instead of failing the build. Labels follow classInd.txt (1-based there,
0-based here); test-list lines carry no label, so every video's class is its
folder's. Splits: train and test of the config's official split.
"""

import os
import pathlib
import sys

try:
  from tfds_builders import video_builder, video_io
except ImportError:  # `tfds build` imports this folder as top-level `ucf101`.
  sys.path.append(str(pathlib.Path(__file__).resolve().parents[2]))
  from tfds_builders import video_builder, video_io  # pylint: disable=g-import-not-at-top

_VIDEOS = "UCF-101"
_LISTS = "ucfTrainTestlist"
_LISTS_ZIP = "UCF101TrainTestSplits-RecognitionTask.zip"


class Builder(video_builder.VideoBuilder):
  """UCF-101 from its official archives (short side 128, split 1 by default)."""

  BUILDER_CONFIGS = video_builder.official_split_configs()
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download UCF101.rar and UCF101TrainTestSplits-RecognitionTask.zip from
  https://www.crcv.ucf.edu/data/UCF101.php. Extract UCF101.rar in the manual
  dir (`unrar x UCF101.rar DIR/`, giving DIR/UCF-101/<Class>/*.avi); the zip
  may stay as it is or be extracted (DIR/ucfTrainTestlist/classInd.txt).
  """

  def _list_videos(self, manual_dir):
    if not os.path.isdir(os.path.join(manual_dir, _VIDEOS)):
      rar = video_io.find_any(manual_dir, "UCF101.rar")
      raise video_io.missing_error(
          manual_dir, _VIDEOS + "/", "UCF101.rar",
          ("extract it there (Python cannot read RAR): "
           f"`unrar x {rar} {manual_dir}/`") if rar else
          f"extract it into {manual_dir}")
    read = lambda name: self._read_list(manual_dir, name)
    names = [line.split()[1] for line in read("classInd.txt")]
    label_of = {name.lower(): i for i, name in enumerate(names)}
    k = self.builder_config.split_number
    splits = {}
    for split, list_name in (("train", f"trainlist0{k}.txt"),
                             ("test", f"testlist0{k}.txt")):
      jobs = []
      for line in read(list_name):
        relative = line.split()[0]
        class_name = relative.split("/")[0]
        # The lists and folders spell some classes differently
        # (HandstandPushups vs v_HandStandPushups_...): match case-blind.
        if class_name.lower() not in label_of:
          raise ValueError(f"{list_name}: class {class_name!r} is not in "
                           "classInd.txt.")
        video_id = os.path.splitext(os.path.basename(relative))[0]
        jobs.append(video_io.Job(
            name=f"{_VIDEOS}/{relative}",
            source=os.path.join(manual_dir, _VIDEOS, relative),
            example={"label": label_of[class_name.lower()],
                     "video_id": video_id}))
      splits[split] = jobs
    return names, splits

  @staticmethod
  def _read_list(manual_dir: str, name: str) -> list[str]:
    try:
      text = video_io.read_text(manual_dir, f"{_LISTS}/{name}",
                                archives=[_LISTS_ZIP])
    except FileNotFoundError:
      raise video_io.missing_error(
          manual_dir, f"{_LISTS}/{name}", _LISTS_ZIP,
          "put it there (or extract it there)") from None
    return [line for line in text.splitlines() if line.strip()]

