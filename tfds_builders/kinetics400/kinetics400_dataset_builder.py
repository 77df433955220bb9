"""Kinetics-400: about 300,000 ten-second YouTube clips of 400 actions.

Built with Apache Beam from the files users download themselves (the CVDF
mirror's archives, extracted) in the manual dir:

  train/, val/ (or validation/), test/   <youtube_id>_<start:06d>_<end:06d>.mp4,
                                         flat or in class folders
  annotations/train.csv, val.csv, test.csv
      columns label,youtube_id,time_start,time_end,split (is_cc ignored)

Splits: train, validation (from val) and test, each for the annotation files
present. Classes are the train annotations' labels in sorted order. Many
clips have vanished from YouTube or arrive corrupt: those are skipped and
listed in manifest.json, and the build finishes.

Beam, because one machine takes days at this size: without options the
build runs Beam's DirectRunner with one worker process per core
(`--beam_pipeline_options=direct_num_workers=N,direct_running_mode=
multi_processing` to choose); any other runner (Dataflow, Flink, Spark)
spreads it over machines, e.g. `--beam_pipeline_options=runner=DataflowRunner,
project=...,temp_location=gs://...,requirements_file=...`.
"""

import csv
import dataclasses
import json
import os
import pathlib
import sys

import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import fn_runner
import tensorflow_datasets as tfds

try:
  from tfds_builders import video_builder, video_io
except ImportError:  # `tfds build` imports this folder as top-level.
  sys.path.append(str(pathlib.Path(__file__).resolve().parents[2]))
  from tfds_builders import video_builder, video_io  # pylint: disable=g-import-not-at-top

_REPO_ROOT = str(pathlib.Path(video_io.__file__).resolve().parents[1])
# TFDS split -> (folders, annotation files), first found wins.
_SPLITS = {
    "train": (("train",), ("train.csv",)),
    "validation": (("val", "validation"), ("val.csv", "validate.csv",
                                           "validation.csv")),
    "test": (("test",), ("test.csv",)),
}


class Builder(video_builder.VideoBuilder):
  """Kinetics-400 from the CVDF archives, with Beam (short side 128 default)."""

  BUILDER_CONFIGS = video_builder.size_variants(
      video_builder.VideoConfig, [dict(name="default")])
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download Kinetics-400 (e.g. the CVDF mirror,
  https://github.com/cvdfoundation/kinetics-dataset: k400_targz and the
  annotations) and extract it into the manual dir DIR so that DIR/train/,
  DIR/val/, DIR/test/ hold the .mp4 clips (flat or in class folders) and
  DIR/annotations/ holds train.csv, val.csv and test.csv.
  """

  def download_and_prepare(self, *, download_config=None, **kwargs):
    """As TFDS's, but with Beam on every core unless told otherwise."""
    download_config = download_config or tfds.download.DownloadConfig()
    options = download_config.beam_options
    if options is None and download_config.beam_runner is None:
      options = beam.options.pipeline_options.PipelineOptions(
          direct_num_workers=os.cpu_count() or 1,
          direct_running_mode="multi_processing")
    if (download_config.beam_runner is None and options is not None and
        options.view_as(beam.options.pipeline_options.StandardOptions).runner
        is None):
      # Beam's DirectRunner would first fetch the Prism runner's binary from
      # the network; its FnApiRunner runs here as it is, on every worker.
      download_config = dataclasses.replace(
          download_config, beam_options=options,
          beam_runner=fn_runner.FnApiRunner())
    # Beam's worker processes unpickle video_io's functions by module name:
    # make the repository importable in them however this one was started.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if _REPO_ROOT not in paths:
      os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO_ROOT] + paths))
    super().download_and_prepare(download_config=download_config, **kwargs)

  def _list_videos(self, manual_dir):
    annotations = {}
    for split, (_, files) in _SPLITS.items():
      path = video_io.find_any(os.path.join(manual_dir, "annotations"), *files)
      if path:
        with open(path, newline="") as f:
          annotations[split] = list(csv.DictReader(f))
    if "train" not in annotations:
      raise video_io.missing_error(
          manual_dir, "annotations/train.csv", "the Kinetics-400 annotations",
          "extract them there")
    names = sorted({row["label"] for row in annotations["train"]})
    label_of = {name: i for i, name in enumerate(names)}
    splits = {}
    for split, rows in annotations.items():
      folder = video_io.find_any(manual_dir, *_SPLITS[split][0])
      if folder is None:
        raise video_io.missing_error(
            manual_dir, f"{_SPLITS[split][0][0]}/", f"the {split} archives",
            "extract them there")
      # One walk per split: clips may be flat or in class folders.
      files = {name: os.path.join(parent, name)
               for parent, _, names_ in os.walk(folder) for name in names_}
      jobs = []
      for row in rows:
        if row.get("label", "") not in label_of:
          raise ValueError(f"{split} annotations: label {row.get('label')!r} "
                           f"of {row['youtube_id']} is not a train class.")
        video_id = (f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_"
                    f"{int(float(row['time_end'])):06d}")
        name = f"{video_id}.mp4"
        jobs.append(video_io.Job(
            name=os.path.relpath(files.get(name, os.path.join(folder, name)),
                                 manual_dir),
            source=files.get(name, os.path.join(folder, name)),
            example={"label": label_of[row["label"]], "video_id": video_id}))
      splits[split] = jobs
    return names, splits

  def _split_generators(self, dl_manager, pipeline):
    names, splits = self._list_videos(os.fspath(dl_manager.manual_dir))
    self.info.features["label"].names = names
    short_side = self.builder_config.short_side
    out = {}
    for split, jobs in splits.items():
      results = (
          pipeline
          | f"{split}_list" >> beam.Create(jobs)
          | f"{split}_spread" >> beam.Reshuffle()  # Over all workers.
          | f"{split}_encode" >> beam.Map(video_io.encode_job_logged,
                                          short_side=short_side))
      examples, skipped = results | f"{split}_partition" >> beam.Partition(
          video_io.partition_skipped, 2)
      # The manifest's entries, gathered by `_process_pipeline_result`.
      _ = (skipped
           | f"{split}_skip_records" >> beam.Map(video_io.skip_record)
           | f"{split}_write_skipped" >> beam.io.WriteToText(
               self._part(split, "skipped"), shard_name_template=""))
      _ = (examples
           | f"{split}_count" >> beam.combiners.Count.Globally()
           | f"{split}_write_count" >> beam.io.WriteToText(
               self._part(split, "built"), shard_name_template=""))
      out[split] = examples | f"{split}_key" >> beam.Map(video_io.keyed_example)
    self._built_splits = list(out)
    return out

  def _part(self, split: str, what: str) -> str:
    return os.fspath(self.data_path / f"manifest-{split}-{what}.txt")

  def _process_pipeline_result(self, pipeline_result):
    del pipeline_result  # The pipeline has run; its files are written.
    for split in self._built_splits:
      with open(self._part(split, "built")) as f:
        built = int(f.read().strip() or 0)
      with open(self._part(split, "skipped")) as f:
        skipped = [tuple(json.loads(line)) for line in f if line.strip()]
      video_io.write_manifest(self.data_path, split, built, skipped)
      os.remove(self._part(split, "built"))
      os.remove(self._part(split, "skipped"))
