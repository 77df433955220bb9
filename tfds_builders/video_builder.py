"""What the builders of real video data sets share: configs, features, the build.

A data set's builder only says where its videos are and what their labels
are (`VideoBuilder._list_videos`); this module decodes them on every core
(`video_io.encode_all`), skips and lists the bad ones, and stores the rest
with the project's shared features (`video_features`).

Every data set has one config per frame size, the short side of the stored
frames: 128 (the default; the pretraining canvas is 128 x 228), 256 (for
224-pixel crops) and native. A config named `<base>` stores 128,
`<base>_short256` 256 and `<base>_native` the decoded size.
"""

import abc
from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import os
import pathlib
import sys
from typing import Any

from absl import logging
from array_record.python import array_record_module
import tensorflow_datasets as tfds

try:
  from tfds_builders import video_features, video_io
except ImportError:
  # `tfds build tfds_builders/<name>` puts tfds_builders/ on sys.path, not the
  # repository root; add the root so these modules keep one name everywhere
  # (worker processes import them by it).
  sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))
  from tfds_builders import video_features, video_io  # pylint: disable=g-import-not-at-top

# Config name suffix -> short side of the stored frames (None: native).
SIZES = {"": 128, "_short256": 256, "_native": None}


@dataclasses.dataclass
class VideoConfig(tfds.core.BuilderConfig):
  """A frame size; builders subclass it for their own choices (split, labels)."""
  short_side: int | None = 128


def size_variants(config_cls: type[VideoConfig], bases: Sequence[dict[str, Any]]
                  ) -> list[VideoConfig]:
  """Every base config (dicts of `config_cls` fields) in each frame size.

  A base named "default" keeps its name only at short side 128; its other sizes
  are called "short256" and "native".
  """
  configs = []
  for base in bases:
    for suffix, short_side in SIZES.items():
      name = base["name"] + suffix
      if base["name"] == "default" and suffix:
        name = suffix[1:]
      size = f"short side {short_side}" if short_side else "native size"
      configs.append(config_cls(**dict(
          base, name=name, short_side=short_side,
          description=f"{base.get('description', '')} Frames at {size}.".strip())))
  return configs


@dataclasses.dataclass
class OfficialSplitConfig(VideoConfig):
  """A data set with numbered official train/test splits (UCF-101, HMDB-51)."""
  split_number: int = 1  # The official train/test split, 1, 2 or 3.


def official_split_configs() -> list[VideoConfig]:
  """split1, split2, split3, each in every frame size."""
  return size_variants(OfficialSplitConfig, [
      dict(name=f"split{k}", split_number=k,
           description=f"Official train/test split {k}.") for k in (1, 2, 3)])


def features(extra: dict[str, tfds.features.FeatureConnector] | None = None
             ) -> tfds.features.FeaturesDict:
  """The shared video features with the class names left open.

  A data set's classes are read from its own files when it is built (and so a
  test's fake copy may have three), so `label` starts without names;
  `_split_generators` sets them and the build saves them with the data.
  """
  shared = dict(video_features.features(["unused"], extra).items())
  shared["label"] = tfds.features.ClassLabel()
  return tfds.features.FeaturesDict(shared)


class UncompressedArrayRecordWriter(tfds.core.writer.ExampleWriter):
  """Writes ArrayRecord files without compression (other formats as TFDS does).

  JPEG frames do not compress further (TFDS's default saves 8 %), but
  decompressing a 1-2 MB video record costs the input pipeline about a
  third of what decoding its sampled frames does.
  """

  def write(self, path, examples):
    if self.file_format != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
      return super().write(path, examples)
    writer = array_record_module.ArrayRecordWriter(
        os.fspath(path), "group_size:1,uncompressed")
    for _, serialized in examples:
      writer.write(serialized)
    writer.close()
    return None


class VideoBuilder(tfds.core.GeneratorBasedBuilder):
  """A data set of video files in a manual dir, split and labelled by lists.

  Subclasses define `_list_videos`. Builds write `manifest.json` beside the
  data: per split, the videos built and every video skipped, with the reason.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [VideoConfig(name="default")]
  EXTRA_FEATURES: dict[str, tfds.features.FeatureConnector] = {}
  # Workers for decoding; None = every core. Tests set 0 (in-process) or 2.
  num_workers: int | None = None

  def __init__(self, *, file_format=None, **kwargs):
    # ArrayRecord by default: the input pipeline reads videos by index.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _example_writer(self) -> tfds.core.writer.ExampleWriter:
    return UncompressedArrayRecordWriter(file_format=self.info.file_format)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(self.EXTRA_FEATURES),
        description=sys.modules[type(self).__module__].__doc__,
    )

  @abc.abstractmethod  # Also keeps this base out of TFDS's registry.
  def _list_videos(self, manual_dir: str
                   ) -> tuple[list[str], dict[str, Iterable[video_io.Job]]]:
    """Class names (label order) and, per split, the videos to build.

    A split's jobs may be a lazy iterable (videos streamed out of an archive);
    give it `len` where known, for the progress bar.
    """
    raise NotImplementedError

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    names, splits = self._list_videos(manual_dir)
    self.info.features["label"].names = list(names)
    return {split: self._generate_examples(split, jobs) for split, jobs in splits.items()}

  def _generate_examples(self, split: str, jobs: Iterable[video_io.Job]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    total = len(jobs) if hasattr(jobs, "__len__") else None
    skipped, built = [], 0
    for job, example, reason in video_io.encode_all(
        jobs, short_side=self.builder_config.short_side, total=total,
        desc=f"{self.name}/{self.builder_config.name} {split}",
        num_workers=self.num_workers):
      if example is None:
        skipped.append((job.name, reason))
        logging.warning("Skipping %s: %s", job.name, reason)
        continue
      built += 1
      yield example["video_id"], example
    if not built and not skipped:
      raise ValueError(
          f"No video is listed for split {split!r}: its list in the manual dir "
          "names none. Check that the split and label files there are the "
          "data set's own (and not empty), then build again.")
    if not built:  # TFDS would only say that no examples were yielded
      listed = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
      raise ValueError(
          f"No readable video in split {split!r}: all {len(skipped)} were skipped "
          f"({listed}{'; ...' if len(skipped) > 3 else ''}). Check those files in "
          "the manual dir (the warnings above name each one), then build again.")
    # data_path is the build's temporary folder here; it becomes the data
    # set's folder when the build succeeds, manifest included.
    video_io.write_manifest(self.data_path, split, built, skipped)
    logging.info("%s %s: built %d videos, skipped %d (listed in %s).",
                 self.name, split, built, len(skipped), video_io.MANIFEST)
