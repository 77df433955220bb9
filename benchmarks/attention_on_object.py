"""How much of the top dynamic concept's attention lands on the moving object.

    python benchmarks/attention_on_object.py --init_from=/tmp/cvc_demo [--path=rgb] [--short_side=128]

Over the moving videos among the first `--videos` test videos of
`synthetic_motion` (rendered directly, no data set needed): the mean, over
frames and videos, of the share of the drawn attention map inside the object's
box, beside the share of the frame the box covers (what a map with no
preference gets).
"""

import os
import sys
import tempfile

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cvc_jax import visualize  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfds_builders.synthetic_motion import synthetic_motion_dataset_builder as motion  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string("init_from", None, "A pretraining workdir.", required=True)
flags.DEFINE_enum("path", "kinds", ["kinds", "rgb"], "As cvc_jax.visualize's --path.")
flags.DEFINE_integer("videos", 16, "Test videos to look at (the still ones are skipped).")
flags.DEFINE_integer("short_side", None, "As cvc_jax.visualize's --short_side: the "
                     "frames' short side in the model's input (default: the crop size or 128, "
                     "whichever is larger).")
FLAGS = flags.FLAGS


def box_masks(boxes, height, width):
  """bool [N, H, W]: each frame's object box, wrapping round the frame (a torus)."""
  yy, xx = np.mgrid[0:height, 0:width]
  return np.stack([((yy - round(y0 * height)) % height < motion.OBJECT_SIZE) &
                   ((xx - round(x0 * width)) % width < motion.OBJECT_SIZE)
                   for y0, x0, _, _ in boxes])


def main(argv):
  del argv
  shares, areas = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for index in range(FLAGS.videos):
      video = motion.make_video("test", index)
      if motion.DYNAMIC_NAMES[video["label_dynamic"]] == "still":
        continue
      np.save(os.path.join(tmp, "video.npy"), video["video"])
      drawn = visualize.visualize(FLAGS.init_from, os.path.join(tmp, "video.npy"),
                                  os.path.join(tmp, "out"), num_concepts=1,
                                  path=FLAGS.path, short_side=FLAGS.short_side)
      maps = drawn["dynamic"][2][..., 0]  # [N, H, W], the most active dynamic concept
      masks = box_masks(video["object_box"], *video["video"].shape[1:3])
      shares.append(np.mean((maps * masks).sum((1, 2)) / maps.sum((1, 2))))
      areas.append(masks.mean())
  print(f"{len(shares)} moving videos: attention on the object {np.mean(shares):.3f} "
        f"(min {np.min(shares):.3f}); the object covers {np.mean(areas):.3f} of the frame")


if __name__ == "__main__":
  app.run(main)
