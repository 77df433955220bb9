"""Video files -> resized JPEG frames, on every core, skipping bad videos.

Shared by the video builders. Deliberately free of TensorFlow and TFDS: the
worker processes that decode import only this module (and PyAV, NumPy, PIL),
so they start in a fraction of a second and hold no TF runtime each.

Decoding is PyAV's (FFmpeg's libraries inside the wheel, no system FFmpeg):
it reads UCF-101's and HMDB-51's XviD/DivX .avi files and the H.264 .mp4
files of Kinetics and Diving-48 alike. Every decoded frame is kept (the native
frame rate), resized so that its short side is `short_side` (aspect kept) and
JPEG-encoded with PIL, which is what `tfds.features.Video(encoding_format=
"jpeg")` stores; handing TFDS the encoded bytes saves it a TF encode per frame.
"""

from collections.abc import Callable, Iterable, Iterator
import collections
import concurrent.futures
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import tarfile
import zipfile
import zlib
from typing import Any

import av
import numpy as np
import tqdm

JPEG_QUALITY = 90  # About 6 KB per 170 x 128 frame; artefacts below the noise.


class VideoError(Exception):
  """A video that cannot be used; the message says why (goes to the manifest)."""


@dataclasses.dataclass(frozen=True)
class Job:
  """One video to encode.

  Attributes:
    name: where it came from, relative to the manual dir (manifest, messages).
    source: a path, or the file's bytes when it was read out of an archive.
    example: the example's other features (label, video_id, ...), passed
      through to the result unchanged.
    skip_reason: set when the video is known to be unreadable before decoding
      (a corrupt archive member): it is skipped with this reason.
  """
  name: str
  source: str | bytes
  example: dict[str, Any]
  skip_reason: str | None = None


def output_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
  """(height, width) with the short side scaled to `short_side` (None: as is)."""
  if not short_side:
    return height, width
  scale = short_side / min(height, width)
  # Round, but the short side is exact: no 127 x 170 from float error.
  h, w = (short_side, max(1, round(width * scale))) if height <= width else (
      max(1, round(height * scale)), short_side)
  return h, w


def encode_video(source: str | bytes, short_side: int | None,
                 quality: int = JPEG_QUALITY, max_frames: int | None = None,
                 ) -> tuple[list[bytes], float]:
  """Decodes the frames of a video file (all, or the first `max_frames`), resized
  and JPEG-encoded.

  Args:
    source: a path or the file's bytes.
    short_side: the short side of the stored frames; None keeps the native size.
    quality: JPEG quality.
    max_frames: stop after this many frames (>= 1; None: all); the rest of the
      file is not read, so damage past them goes unnoticed.

  Returns:
    (frames, fps): the JPEG bytes of the frames, and the stream's frame rate.

  Raises:
    VideoError: missing, unreadable, without a video stream, or no frame.
  """
  if max_frames is not None and max_frames < 1:
    raise ValueError(f"max_frames must be at least 1 (or None: all), got {max_frames}.")
  if isinstance(source, str) and not os.path.isfile(source):
    raise VideoError("missing: no such file")
  file = io.BytesIO(source) if isinstance(source, bytes) else source
  frames = []
  try:
    with av.open(file) as container:
      if not container.streams.video:
        raise VideoError("no video stream")
      stream = container.streams.video[0]
      rate = stream.average_rate or stream.guessed_rate or stream.base_rate
      fps = float(rate) if rate else 0.0
      for frame in container.decode(stream):
        h, w = output_size(frame.height, frame.width, short_side)
        # swscale's area filter: antialiased when shrinking, in C.
        image = frame.to_image(width=w, height=h, interpolation="AREA")
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        frames.append(buffer.getvalue())
        if len(frames) == max_frames:
          break
  except av.error.FFmpegError as e:
    # A truncated file often yields its first frames and then an error: the
    # video is damaged, so it is skipped rather than stored cut short.
    raise VideoError(f"corrupt: {e}") from None
  if not frames:
    raise VideoError("no frames")
  return frames, fps


def encode_job(job: Job, short_side: int | None
               ) -> tuple[Job, dict[str, Any] | None, str | None]:
  """(job, example, None) for a good video; (job, None, reason) for a bad one."""
  if job.skip_reason:
    return job, None, job.skip_reason
  try:
    frames, fps = encode_video(job.source, short_side)
  except VideoError as e:
    return job, None, str(e)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever a damaged file makes a decoder raise, the build goes on.
    return job, None, f"unreadable: {type(e).__name__}: {e}"
  example = dict(job.example, video=frames, num_frames=np.int32(len(frames)),
                 fps=np.float32(fps))
  return job, example, None


def _pool_encode(args: tuple[Job, int | None]):
  job, short_side = args
  job, example, reason = encode_job(job, short_side)
  # The bytes of an archived video need not travel back.
  return dataclasses.replace(job, source=""), example, reason


def encode_all(jobs: Iterable[Job], *, short_side: int | None,
               total: int | None = None, desc: str = "videos",
               num_workers: int | None = None,
               ) -> Iterator[tuple[Job, dict[str, Any] | None, str | None]]:
  """`encode_job` over `jobs` on every core, in order, with a progress bar.

  At most a few jobs per worker are in flight, so a stream of videos read out
  of an archive never sits in memory whole.

  Args:
    jobs: the videos, any iterable (consumed lazily).
    short_side: see `encode_video`.
    total: len(jobs) for the progress bar, if known.
    desc: progress bar label.
    num_workers: processes (default: all cores; 0 = in this process).

  Yields:
    (job, example or None, skip reason or None), in the order of `jobs`.
  """
  if num_workers is None:
    num_workers = os.cpu_count() or 1
  bar = tqdm.tqdm(total=total, desc=desc, unit=" videos", mininterval=2.0)
  if num_workers == 0:
    for job in jobs:
      yield _pool_encode((job, short_side))
      bar.update()
    bar.close()
    return
  # spawn, not fork: the parent has TensorFlow's threads running, and a forked
  # copy of them can deadlock. Children import only this module.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(num_workers,
                                              mp_context=context) as pool:
    pending = collections.deque()
    for job in jobs:
      pending.append(pool.submit(_pool_encode, (job, short_side)))
      if len(pending) >= 4 * num_workers:
        yield pending.popleft().result()
        bar.update()
    while pending:
      yield pending.popleft().result()
      bar.update()
  bar.close()


# ----------------------------------------------------------------------------
# Beam's side (kinetics400): plain functions, pickled by reference, so that
# this module need not import Beam.

_encoded_here = 0  # Videos this worker process has encoded, for progress.


def encode_job_logged(job: Job, short_side: int | None):
  """`encode_job`, logging each worker's progress every 100 videos."""
  global _encoded_here
  _encoded_here += 1
  if _encoded_here % 100 == 0:
    logging.info("Worker %d: %d videos encoded.", os.getpid(), _encoded_here)
  return encode_job(job, short_side)


def partition_skipped(result, num_partitions: int) -> int:
  """beam.Partition: 0 for built videos, 1 for skipped ones."""
  del num_partitions
  return 0 if result[1] is not None else 1


def skip_record(result) -> str:
  """A skipped video's manifest entry, as a JSON line: [name, reason]."""
  return json.dumps([result[0].name, result[2]])


def keyed_example(result) -> tuple[str, dict[str, Any]]:
  """(key, example) of a built video, as TFDS's Beam writer takes them."""
  return result[1]["video_id"], result[1]


# ----------------------------------------------------------------------------
# The manifest of skipped videos.

MANIFEST = "manifest.json"


def write_manifest(data_dir: os.PathLike | str, split: str, built: int,
                   skipped: list[tuple[str, str]]) -> dict[str, Any]:
  """Adds `split`'s counts and skipped videos to `data_dir`/manifest.json.

  Args:
    data_dir: the data set's version folder (beside the ArrayRecord files).
    split: the split built.
    built: videos written.
    skipped: (name, reason) of every video left out.

  Returns:
    The whole manifest, all splits written so far.
  """
  path = os.path.join(os.fspath(data_dir), MANIFEST)
  manifest = {}
  if os.path.exists(path):
    with open(path) as f:
      manifest = json.load(f)
  manifest[split] = {
      "built": built, "skipped": len(skipped),
      "skipped_videos": [{"video": n, "reason": r} for n, r in sorted(skipped)]}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def read_manifest(data_dir: os.PathLike | str) -> dict[str, Any]:
  """The manifest of a built data set: split -> built, skipped, skipped_videos."""
  with open(os.path.join(os.fspath(data_dir), MANIFEST)) as f:
    return json.load(f)


# ----------------------------------------------------------------------------
# Finding the files: extracted folders, or archives Python can read.


def find_any(root: str, *names: str) -> str | None:
  """The first of `names` (relative paths) that exists under `root`."""
  for name in names:
    if os.path.exists(os.path.join(root, name)):
      return os.path.join(root, name)
  return None


def missing_error(root: str, what: str, archive: str, how: str) -> FileNotFoundError:
  """An error that says exactly what to extract where."""
  return FileNotFoundError(
      f"Did not find {what} in the manual dir {root}.\n"
      f"Download {archive} and {how}, so that {os.path.join(root, what)} "
      f"exists, then build again.")


class ArchiveError(ValueError):
  """An archive that cannot be read (to its end); the message says what to do.

  Attributes:
    corrupt: {member name: why} of members that could not be read, where the
      rest of the archive could (a zip's).
  """

  def __init__(self, message: str, corrupt: dict[str, str] | None = None):
    super().__init__(message)
    self.corrupt = corrupt or {}


def archive_members(path: str, want: Callable[[str], bool]
                    ) -> Iterator[tuple[str, bytes]]:
  """(member name, bytes) of the files of a .zip or .tar(.gz) that `want`.

  Members come in archive order: a compressed tar is read once, front to back.

  Raises:
    ArchiveError: the archive is not one, or ends early (a cut download), after
      the members before the damage were yielded; or, for a zip, some members
      are corrupt, after every readable one was yielded (a zip's members are
      read independently, so one bad member costs only itself).
  """
  if zipfile.is_zipfile(path):
    corrupt = {}
    with zipfile.ZipFile(path) as archive:
      for info in archive.infolist():
        if not info.is_dir() and want(info.filename):
          try:
            data = archive.read(info)
          except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            corrupt[info.filename] = f"{type(e).__name__}: {e}"
            continue
          yield info.filename, data
    if corrupt:
      listed = "; ".join(f"{name} ({why})" for name, why in corrupt.items())
      raise ArchiveError(f"{path}: {len(corrupt)} of the wanted members are corrupt "
                         f"({listed}); download it again.", corrupt)
    return
  count = 0
  try:
    with tarfile.open(path, "r|*") as archive:  # Streaming: no seeks.
      for member in archive:
        if member.isfile() and want(member.name):
          data = archive.extractfile(member).read()
          count += 1
          yield member.name, data
  except (tarfile.TarError, EOFError, OSError) as e:  # zlib's errors are OSErrors
    raise ArchiveError(f"{path} is truncated or corrupt after {count} wanted files "
                       f"({type(e).__name__}: {e}): download it again.") from e


class ArchiveJobs:
  """Jobs whose videos are read out of an archive, in the archive's order.

  Iterating reads the archive once, front to back; the videos it lacks come
  last, as jobs for a path that does not exist (skipped as missing).
  """

  def __init__(self, archive: str, jobs: Iterable[Job]):
    """Args: archive, a .zip or .tar(.gz); jobs, named by member base name."""
    self.archive = archive
    self.jobs = {os.path.basename(job.name): job for job in jobs}

  def __len__(self) -> int:
    return len(self.jobs)

  def __iter__(self) -> Iterator[Job]:
    seen, corrupt = set(), {}
    try:
      for member, data in archive_members(
          self.archive, lambda m: os.path.basename(m) in self.jobs):
        base = os.path.basename(member)
        if base not in seen:
          seen.add(base)
          yield dataclasses.replace(self.jobs[base], source=data)
    except ArchiveError as e:
      # What was read is kept; the rest is skipped, counted in the manifest as
      # a bad video would be: corrupt members as corrupt, the others as missing.
      corrupt = {os.path.basename(name): why for name, why in e.corrupt.items()}
      logging.warning("%s Skipped: %d corrupt videos, %d not read (missing).", e,
                      len(corrupt), len(self.jobs) - len(seen) - len(corrupt))
    for base, job in self.jobs.items():
      if base not in seen:
        yield dataclasses.replace(
            job, source=os.path.join(self.archive, base),
            skip_reason=f"corrupt in the archive: {corrupt[base]}" if base in corrupt else None)


def read_text(root: str, name: str, archives: Iterable[str] = ()) -> str:
  """`root`/`name`, or the member ending in `name` of one of `archives`."""
  path = os.path.join(root, name)
  if os.path.exists(path):
    with open(path) as f:
      return f.read()
  for archive in archives:
    archive_path = os.path.join(root, archive)
    if os.path.exists(archive_path):
      for _, data in archive_members(
          archive_path, lambda member: member.endswith("/" + name) or member == name):
        return data.decode()
  raise FileNotFoundError(name)
