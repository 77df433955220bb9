"""The TFDS video data sets: which builder, building the generated ones, split
sizes, and random access to a split's videos.

A config names its data set as `config.input.dataset` ("name[/config][:version]",
in `config.input.data_dir`); the repository's builders (tfds_builders/) take
precedence over TFDS's catalogue. `cvc_jax.input_pipeline` turns a split's
videos into batches. This is the module through which training and evaluation
import TensorFlow (with TFDS), so the model, losses and train step import
without it.
"""

import importlib
import importlib.util
import os
from typing import Any

from absl import logging
from array_record.python import array_record_data_source
import ml_collections
import tensorflow as tf
from tensorflow.core.example import example_pb2
import tensorflow_datasets as tfds

from cvc_jax import sampling


def _hide_accelerators_from_tf() -> None:
  """Keeps TF (used by TFDS) off the GPUs/TPUs, whose memory belongs to JAX."""
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except RuntimeError:  # TF's runtime is already up; too late to change.
      logging.warning("TensorFlow was initialised before cvc_jax.datasets "
                      "could hide the %s devices from it.", kind)


_hide_accelerators_from_tf()

# Data sets that need no download or manual files: built on first use.
_GENERATED = ("synthetic_motion",)


def _builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder of `config.input.dataset` ("name[/config][:version]").

  The repository's own builder (tfds_builders/<name>) if there is one, else the
  TFDS catalogue's.
  """
  name, kwargs = tfds.core.naming.parse_builder_name_kwargs(config.input.dataset)
  data_dir = config.input.data_dir or None
  if _has_own_builder(name.name):
    # Used by module, unregistered, so that they take precedence over TFDS
    # catalogue builders of the same name (ucf101).
    with tfds.core.registered.skip_registration():
      module = importlib.import_module(f"tfds_builders.{name.name}")
    return module.Builder(data_dir=data_dir, **kwargs)
  return tfds.builder(name.name, data_dir=data_dir, **kwargs)


def _has_own_builder(name: str) -> bool:
  return bool(importlib.util.find_spec("tfds_builders") and
              importlib.util.find_spec(f"tfds_builders.{name}"))


def ensure_built(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder of `config.input.dataset`, building it if generated.

  Generated data sets (synthetic_motion) are built into `config.input.data_dir`
  (TFDS's default if empty) on first use, by every process that does not find
  it there. Other data sets must have been built beforehand.

  Raises:
    FileNotFoundError: a data set that needs downloaded or manual files is not
      prepared in the data dir.
  """
  builder = _builder(config)
  if builder.is_prepared():
    return builder
  name = builder.name
  if name not in _GENERATED:
    _, kwargs = tfds.core.naming.parse_builder_name_kwargs(config.input.dataset)
    variant = f" --config={kwargs['config']}" if "config" in kwargs else ""
    missing = ("" if _has_own_builder(name) else
               f"\n(tfds_builders/{name} does not exist yet: add it, or build "
               f"TFDS's catalogue version with `tfds build {name}{variant}`.)")
    raise FileNotFoundError(
        f"Data set {config.input.dataset!r} is not prepared in "
        f"{builder.data_dir_root}. Build it first, from the repository root:\n"
        f"  tfds build tfds_builders/{name}{variant} --manual_dir=<folder with "
        f"the downloaded files> --data_dir={builder.data_dir_root} "
        f"--file_format=array_record{missing}")
  # Every process builds what it lacks: with local disks each needs a copy, and
  # a barrier could deadlock where only some hosts already have one. On shared
  # storage, concurrent builds write to private temporary folders and the
  # losers of the final rename find the winner's copy.
  logging.info("Building %s into %s.", config.input.dataset,
               builder.data_dir_root)
  try:
    builder.download_and_prepare()
  except Exception:  # pylint: disable=broad-except
    if not _builder(config).is_prepared():
      raise
  return _builder(config)  # Reads the built dataset_info (split sizes).


def num_videos(config: ml_collections.ConfigDict, split: str | None = None) -> int:
  """Number of videos in `split` (default `config.input.split`)."""
  builder = ensure_built(config)
  return builder.info.splits[_split(builder, split or config.input.split)
                             ].num_examples


def _split(builder: tfds.core.DatasetBuilder, split: str) -> str:
  if split == "val" and "val" not in builder.info.splits:
    return "validation"  # Kinetics' name for it, in TFDS's spelling.
  return split


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """Global steps per epoch: whole batches of `config.input.split` (rest dropped)."""
  return sampling.whole_batches(num_videos(config), config.batch_size)


class Videos:
  """A split's videos by index: {"video": JPEG frames, "label": int}.

  Reads the split's ArrayRecord files itself rather than through
  `tfds.data_source`: TFDS's data source reads each record with a thread
  pool and turns every frame into a new bytes object, which together cost a
  third of decoding the 32 frames a pretraining sample needs
  (cvc_jax/benchmarks/input_pipeline.py measures it). Parsed lazily, the
  frames' bytes are copied only for the frames sampled.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str,
               label_key: str = "label"):
    if builder.info.file_format != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
      raise ValueError(f"{builder.info.full_name} is stored as "
                       f"{builder.info.file_format.value}; the input pipeline "
                       "reads ArrayRecord (build with --file_format=array_record).")
    self.label_key = label_key
    self.source = array_record_data_source.ArrayRecordDataSource(
        builder.info.splits[split].file_instructions,
        reader_options={"max_parallelism": "0"})  # One record, one thread.

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    feature = example_pb2.Example.FromString(
        self.source[index]).features.feature
    return {"video": feature["video"].bytes_list.value,
            "label": feature[self.label_key].int64_list.value[0]}


_WARNED: set[str] = set()  # warnings this process has logged


def data_source(config: ml_collections.ConfigDict, split: str, *,
                label_key: str = "label") -> Videos:
  """Random access to `split`'s videos: {"video": JPEG bytes, "label": int}.

  `label_key` names the feature returned as "label" (synthetic_motion also has
  label_static and label_dynamic).
  """
  builder = ensure_built(config)
  for warning in (upsampling_warning(builder.builder_config, config.input.crop_size),
                  cropping_warning(builder.builder_config, sampling.raw_size(config))):
    if warning and warning not in _WARNED:  # once, not for every split and label
      _WARNED.add(warning)
      logging.warning(warning)
  return Videos(builder, _split(builder, split), label_key)


def upsampling_warning(builder_config: Any, crop_size: int) -> str | None:
  """What to say when a data set's frames are smaller than the crop, else None.

  The repository's builders store frames at a short side of 128 unless their
  config says `short256` or `native`; a 224 px crop (`backbone=r2plus1d18_224`)
  from those is an upsampled 128 px one, silently: the crop itself runs.
  """
  short_side = getattr(builder_config, "short_side", None)
  if not short_side or crop_size <= short_side:
    return None
  return (f"The frames of data set config {builder_config.name!r} have a short "
          f"side of {short_side} px, under the {crop_size} px crop: every clip is "
          "upsampled. Build and use one with larger frames: the same name plus "
          "_short256 or _native (short256 or native for 'default'), e.g. "
          "--config.input.dataset=ucf101/split1_short256.")


def cropping_warning(builder_config: Any, raw_size: tuple[int, int]) -> str | None:
  """What to say when a data set's frames are larger than the canvas, else None.

  The input pipeline centre-crops a frame larger than `input.raw_size` into it,
  silently: 256 px frames in the default 128 x 228 canvas lose half their
  height before any augmentation sees them.
  """
  short_side = getattr(builder_config, "short_side", None)
  if not short_side or short_side <= min(raw_size):
    return None
  return (f"The frames of data set config {builder_config.name!r} have a short "
          f"side of {short_side} px, over the {raw_size[0]} x {raw_size[1]} canvas "
          "(input.raw_size): every frame is centre-cropped into it. Make the canvas "
          f"hold them (e.g. --config.input.raw_size='({short_side}, "
          f"{-(-short_side * 16 // 9)})'), or use the data set built at 128 px.")


def video_counts(config: ml_collections.ConfigDict, splits) -> dict[str, dict[str, int]]:
  """{split: {'built', 'skipped'}} for `splits` from the data set's manifest of
  the videos its builder left out (corrupt, unreadable); {} for a data set
  without one (synthetic_motion). Logs a warning naming the manifest when any
  video was skipped: results are then over fewer videos than the official split.
  """
  from tfds_builders import video_io  # pylint: disable=g-import-not-at-top
  data_path = os.fspath(ensure_built(config).data_path)
  path = os.path.join(data_path, video_io.MANIFEST)
  if not os.path.exists(path):
    return {}
  manifest = video_io.read_manifest(data_path)
  counts = {split: {k: int(manifest[split][k]) for k in ("built", "skipped")}
            for split in splits if split in manifest}
  for split, count in counts.items():
    if count["skipped"]:
      logging.warning("%d videos of the %s split were skipped when %s was built (%s lists "
                      "them): results cover the %d built.", count["skipped"], split,
                      config.input.dataset, path, count["built"])
  return counts
