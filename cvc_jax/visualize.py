r"""Concept attention pictures: where the most active concepts look in a video.

    python -m cvc_jax.visualize --init_from=/tmp/cvc_demo --video=clip.mp4 --out=/tmp/vis
    python -m cvc_jax.visualize --init_from=/tmp/cvc_demo --video=frames.npy --out=/tmp/vis \
        --dataset=synthetic_motion/tiny

For a video and a pretraining checkpoint this draws, for every frame, where
the model's concepts look (`cvc_jax.concepts`: the attention of the local
concept aggregation over the encoder's last feature map, SPEC 3, resampled to
the frame). With --path=kinds (default) static concepts are read on still
frames (each frame repeated, the s view: static rows of C_s) and dynamic
concepts on frame differences (the d view: dynamic rows of C_d), the views each
kind is learnt from; --path=rgb reads both on the RGB clips (all rows of C_v).
The --num_concepts static and dynamic concepts of highest mean code over the
video are drawn: each map is laid over the frame, scaled to its own maximum.

Written to --out: `concepts.png` (rows: frames; columns: the frame, then each
chosen concept's attention over it), `concepts.gif` (the same, animated over
every frame), `attention.npz` (the maps at frame resolution, the concepts and
the codes) and, with --dataset, `histogram.png`/`histogram.json`: for every
concept, the share of the data set's videos in which it is the most active of
its kind, and its mean code. TensorFlow is imported only for --dataset.
"""

import io
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image

from cvc_jax import concepts
from cvc_jax import pictures


def read_video(path: str, max_frames: int | None = None) -> np.ndarray:
  """uint8 [N, H, W, 3] frames of a video file or of a .npy array: all, or the
  first `max_frames` (>= 1).

  Files are decoded as the data set builders decode them (`tfds_builders.
  video_io`: PyAV, each frame at its native size, stored as JPEG), so the model
  sees what it saw in training.
  """
  if max_frames is not None and max_frames < 1:
    raise ValueError(f"max_frames must be at least 1 (or None: all), got {max_frames}.")
  if path.endswith(".npy"):
    frames = np.load(path)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f"{path}: want uint8 [N, H, W, 3] frames, got {frames.dtype} "
                       f"{frames.shape}.")
    return frames[:max_frames]
  from tfds_builders import video_io  # pylint: disable=g-import-not-at-top
  try:
    encoded, _ = video_io.encode_video(path, short_side=None, max_frames=max_frames)
  except video_io.VideoError as e:  # its message names no file (the builders' manifest does)
    raise video_io.VideoError(f"{path}: {e}") from None
  return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in encoded])


def visualize(init_from: str, video: str, out: str, *, step: int | None = None,
              **kwargs) -> dict[str, Any]:
  """`draw(*concepts.load(init_from, step), video, out, **kwargs)`: the pictures
  from a pretraining workdir's checkpoint (default its newest)."""
  return draw(*concepts.load(init_from, step), video, out, **kwargs)


def draw(config, models, variables, video: str, out: str, *, num_concepts: int = 3,
         path: str = "kinds", max_frames: int | None = 64, short_side: int | None = None,
         stride: int = 1) -> dict[str, Any]:
  """Concept pictures of a video: the most active static and dynamic concepts.

  Writes concepts.png, concepts.gif and attention.npz (the frames, and the drawn
  concepts' ids, per-frame codes and maps at frame resolution) to `out`.

  Args:
    config, models, variables: a checkpoint's, as `concepts.load` returns them:
      load once to draw several videos or count concept usage too.
    video: a video file (any format PyAV reads) or a .npy of uint8 [N, H, W, 3].
    out: the folder to write to.
    num_concepts: concepts of each kind to draw.
    path: 'kinds' (static concepts on stills, dynamic on frame differences) or
      'rgb' (both on the RGB clips).
    max_frames: frames of the video to use.
    short_side: the model input's short side (`concepts.default_short_side`).
    stride: frames between the starts of the clips.

  Returns:
    {'paths': [...], 'static'/'dynamic': (ids, codes, maps) of the drawn
    concepts, most active first}.
  """
  concepts.check_path(path)  # before the video is decoded
  frames = read_video(video, max_frames)
  found = concepts.concepts_of(config, models, variables, frames, path=path,
                               short_side=short_side, stride=stride)
  k = config.model.num_concepts
  drawn, columns = {}, []
  for name, kind in found.items():
    ids, codes, maps = kind
    best = concepts.top(kind, num_concepts)
    drawn[name] = (ids[best], codes[:, best], maps[..., best])
    columns += [(f"{name[0].upper()}{ids[j] % k} {codes[:, j].mean():.2f}", maps[..., j])
                for j in best]
  paths = pictures.write_pictures(out, frames, columns)
  paths.append(os.path.join(out, "attention.npz"))
  np.savez_compressed(
      paths[-1], frames=frames,
      **{f"{name}_{key}": value for name, got in drawn.items()
         for key, value in zip(("ids", "codes", "maps"), got)})
  return dict(paths=paths, **drawn)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # orbax logs every array it reads
  if not f.video and not f.dataset:
    raise app.UsageError("Give --video, --dataset or both.")
  loaded = concepts.load(f.init_from, f.step)
  if f.video:
    drawn = draw(*loaded, f.video, f.out, num_concepts=f.num_concepts, path=f.path,
                 max_frames=f.max_frames, short_side=f.short_side, stride=f.stride)
    for name in ("static", "dynamic"):
      print(f"Most active {name} concepts: {drawn[name][0].tolist()}")
    for path in drawn["paths"]:
      print(f"Wrote {path}")
  if f.dataset:
    usage = concepts.concept_usage(*loaded, dataset=f.dataset, split=f.split,
                                   data_dir=f.data_dir, path=f.path,
                                   num_clips=f.num_clips)
    for path in pictures.write_histogram(f.out, usage,
                                         f"{f.dataset} {f.split}: {f.init_from}"):
      print(f"Wrote {path}")


if __name__ == "__main__":
  flags.DEFINE_string("init_from", None, "A pretraining workdir.")
  flags.DEFINE_integer("step", None, "Its checkpoint's step; default the newest.")
  flags.DEFINE_string("video", None, "A video file (any format PyAV reads) or a .npy "
                      "of uint8 [N, H, W, 3] frames.")
  flags.DEFINE_string("out", None, "Folder for the pictures.")
  flags.DEFINE_integer("num_concepts", 3, "Concepts of each kind to draw.")
  flags.DEFINE_enum("path", "kinds", concepts.PATHS,
                    "kinds: static concepts on still frames (C_s), dynamic concepts "
                    "on frame differences (C_d); rgb: both on the RGB clips (C_v).")
  flags.DEFINE_integer("max_frames", 64, "Frames of the video to use.")
  flags.DEFINE_integer("short_side", None, "The model input's short side; default the "
                       "training crop or 128, whichever is larger.")
  flags.DEFINE_integer("stride", 1, "Frames between the starts of the clips.")
  flags.DEFINE_string("dataset", None, "Also the concept usage histogram over this "
                      "data set, e.g. synthetic_motion/tiny.")
  flags.DEFINE_string("split", "test", "Its split.")
  flags.DEFINE_string("data_dir", "", "Its TFDS data_dir.")
  flags.DEFINE_integer("num_clips", None, "Clips per video; default eval.num_clips.")
  flags.mark_flags_as_required(["init_from", "out"])
  app.run(main)
