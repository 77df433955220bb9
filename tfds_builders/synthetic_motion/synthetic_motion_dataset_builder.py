"""synthetic_motion: one moving object on a textured background, two labels.

A procedurally generated stand-in for a video data set, small enough for CPU
tests and quick pretraining runs: every video has a STATIC label (what is seen:
the object's shape and colour and the background texture) and a DYNAMIC label
(how it moves), drawn independently, so a representation can be probed for
each kind of concept separately. Everything derives from a fixed seed and the
(split, index) of a video: builds are identical on every machine, and the
first videos of the 'tiny' config are the first videos of 'default'.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

try:
  from tfds_builders import video_features
except ImportError:
  # `tfds build tfds_builders/synthetic_motion` puts tfds_builders/ itself, not
  # the repository root, on sys.path.
  import video_features  # pytype: disable=import-error

HEIGHT, WIDTH = 40, 48
OBJECT_SIZE = 20  # pixels per side: about a quarter of the frame's area
FPS = 25.0
MIN_FRAMES, MAX_FRAMES = 24, 40  # inclusive
SPEED = (3.0, 5.0)  # pixels per frame, so motion survives 4-frame clips
_SEED = 20220724

# Each static class fixes shape, colour and texture together, so that every cue
# agrees; grayscale augmentation still leaves shape and texture.
STATIC_NAMES = ("red_square_hstripes", "green_disc_vstripes",
                "blue_triangle_checker", "yellow_cross_diagonal")
_COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 80, 230],
                     [235, 215, 40]], np.float32)
# Directions as (dy, dx). Left and right form ONE class: pretraining flips each
# clip horizontally with p = 0.5 and learns to ignore the flip, so a left/right
# distinction could not be probed afterwards; up and down survive the flip.
DYNAMIC_NAMES = ("up", "down", "horizontal", "still")
_DIRECTIONS = {0: [(-1, 0)], 1: [(1, 0)], 2: [(0, -1), (0, 1)], 3: [(0, 0)]}


@dataclasses.dataclass
class SyntheticMotionConfig(tfds.core.BuilderConfig):
  """Split sizes; pass an instance as `config=` for other sizes."""
  num_train: int = 512
  num_test: int = 128


def _shape_mask(static: int) -> np.ndarray:
  """[S, S] bool mask of the object's shape for a static class."""
  s = OBJECT_SIZE
  u, v = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
  c = s / 2
  if static == 0:  # square
    return np.ones((s, s), bool)
  if static == 1:  # disc
    return (u - c) ** 2 + (v - c) ** 2 <= c ** 2
  if static == 2:  # triangle pointing up
    return np.abs(v - c) <= u / 2
  return (np.abs(u - c) < s / 6) | (np.abs(v - c) < s / 6)  # cross


def _texture(static: int, rng: np.random.Generator) -> np.ndarray:
  """[H, W] 0/1 background pattern of a static class, at a random phase."""
  y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
  py, px = rng.integers(0, 8, size=2)
  if static == 0:
    return ((y + py) // 4) % 2
  if static == 1:
    return ((x + px) // 4) % 2
  if static == 2:
    return ((y + py) // 5 + (x + px) // 5) % 2
  return ((x + y + px) // 4) % 2


def make_video(split: str, index: int) -> dict[str, np.ndarray | int | str | float]:
  """Renders video `index` of `split` as a feature dict with raw uint8 frames."""
  rng = np.random.default_rng([_SEED, {"train": 0, "test": 1}[split], index])
  static, dynamic = (int(k) for k in rng.integers(0, 4, size=2))
  n = int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1))

  # Nuisance: background brightness, contrast and tint, texture phase, object
  # colour, start position, speed, pixel noise.
  base = rng.uniform(70, 130) + rng.uniform(-15, 15, size=3)
  background = base + rng.uniform(35, 60) * _texture(static, rng)[..., None]
  colour = np.clip(_COLOURS[static] + rng.normal(0, 15, size=3), 0, 255)
  mask = _shape_mask(static)
  dirs = _DIRECTIONS[dynamic]
  dy, dx = dirs[rng.integers(len(dirs))]
  speed = rng.uniform(*SPEED)
  y0, x0 = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)

  t = np.arange(n)
  # The frame is a torus: the object leaves one edge and re-enters at the
  # opposite one, so it moves in its direction at full speed for the whole
  # video (bouncing would reverse the direction, i.e. change the label).
  tops = np.round(y0 + dy * speed * t).astype(int) % HEIGHT
  lefts = np.round(x0 + dx * speed * t).astype(int) % WIDTH
  yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
  frames = np.empty((n, HEIGHT, WIDTH, 3), np.uint8)
  for i in range(n):
    ly, lx = (yy - tops[i]) % HEIGHT, (xx - lefts[i]) % WIDTH
    inside = (ly < OBJECT_SIZE) & (lx < OBJECT_SIZE)
    on = inside & mask[np.minimum(ly, OBJECT_SIZE - 1),
                       np.minimum(lx, OBJECT_SIZE - 1)]
    frame = np.where(on[..., None], colour, background)
    frame = frame + rng.normal(0, 5, size=frame.shape)
    frames[i] = np.clip(np.round(frame), 0, 255).astype(np.uint8)

  # y0, x0 in [0, 1); y1, x1 may exceed 1 where the object wraps past the
  # bottom or right edge (it then continues at the top or left).
  boxes = np.stack([tops / HEIGHT, lefts / WIDTH, (tops + OBJECT_SIZE) / HEIGHT,
                    (lefts + OBJECT_SIZE) / WIDTH], axis=-1).astype(np.float32)
  return {
      "video": frames,
      "label": static,
      "label_static": static,
      "label_dynamic": dynamic,
      "video_id": f"{split}_{index:05d}",
      "num_frames": n,
      "fps": FPS,
      "object_box": boxes,
  }


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for synthetic_motion (no download, nothing manual)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticMotionConfig(name="default", description="512 train, 128 test."),
      SyntheticMotionConfig(name="tiny", num_train=16, num_test=8,
                            description="16 train, 8 test, for tests."),
  ]

  def __init__(self, *, file_format=None, **kwargs):
    # ArrayRecord by default: the input pipeline reads videos by index.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=video_features.features(STATIC_NAMES, extra={
            "label_static": tfds.features.ClassLabel(names=STATIC_NAMES),
            "label_dynamic": tfds.features.ClassLabel(names=DYNAMIC_NAMES),
            "object_box": tfds.features.Tensor(shape=(None, 4),
                                               dtype=np.float32),
        }),
        description=__doc__,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {
        "train": self._generate_examples("train", cfg.num_train),
        "test": self._generate_examples("test", cfg.num_test),
    }

  def _generate_examples(self, split: str, num: int):
    for index in range(num):
      yield index, make_video(split, index)
