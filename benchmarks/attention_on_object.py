"""How much of the top dynamic concept's attention lands on the moving object.

    python benchmarks/attention_on_object.py --init_from=/tmp/cvc_demo \
        [--path=rgb] [--short_side=128]

Over the moving videos among the first `--videos` test videos of
`synthetic_motion` (rendered directly, no data set needed), the mean over frames
and videos of the share of the drawn attention map of the most active dynamic
concept that lies

- in the object's box at that frame, and
- in the object's path over the frames of the clip the map belongs to (the
  union of its boxes over them): an 8-frame clip through R(2+1)D-18 has a single
  map in time, so at the data set's 3-5 pixels a frame this is the finest
  place the map can show,

each beside the share of the frame that region covers (what a map with no
preference gets). `tests/test_visualize.py` runs `measure` on a committed
checkpoint.
"""

import json
import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cvc_jax import concepts  # pylint: disable=g-import-not-at-top,wrong-import-position
from cvc_jax.models import cvc  # pylint: disable=g-import-not-at-top,wrong-import-position
from cvc_jax.models import exported  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfds_builders.synthetic_motion import synthetic_motion_dataset_builder as motion  # pylint: disable=g-import-not-at-top,wrong-import-position


def box_masks(boxes, height, width):
  """bool [N, H, W]: each frame's object box, wrapping round the frame (a torus)."""
  yy, xx = np.mgrid[0:height, 0:width]
  return np.stack([((yy - round(y0 * height)) % height < motion.OBJECT_SIZE) &
                   ((xx - round(x0 * width)) % width < motion.OBJECT_SIZE)
                   for y0, x0, _, _ in boxes])


def path_masks(masks, clip_length):
  """bool [N, H, W]: for each frame, the union of the boxes over its clip's frames."""
  starts, chosen = concepts.frame_clips(len(masks), clip_length)
  return np.stack([masks[starts[c]:starts[c] + clip_length].any(0) for c in chosen])


def measure(init_from, *, videos=16, path="kinds", short_side=None) -> dict:
  """Mean shares of the top dynamic concept's map in the object's box and path,
  and the mean areas of those regions, over the moving videos among the first
  `videos` test videos; also the per-video shares ('box_shares', 'path_shares')."""
  config, models, variables = concepts.load(init_from)
  rows = []
  for index in range(videos):
    video = motion.make_video("test", index)
    if motion.DYNAMIC_NAMES[video["label_dynamic"]] == "still":
      continue
    # What `visualize.draw` draws first for the dynamic kind.
    found = concepts.concepts_of(config, models, variables, video["video"], path=path,
                                 names=("dynamic",), short_side=short_side)["dynamic"]
    maps = found[2][..., concepts.top(found, 1)[0]]  # [N, H, W]
    share = lambda m: np.mean((maps * m).sum((1, 2)) / maps.sum((1, 2)))
    box = box_masks(video["object_box"], *video["video"].shape[1:3])
    on_path = path_masks(box, config.input.num_frames)
    rows.append((share(box), box.mean(), share(on_path), on_path.mean()))
  box_share, box_area, path_share, path_area = np.asarray(rows).T
  return dict(videos=len(rows), box_share=box_share.mean(), box_area=box_area.mean(),
              path_share=path_share.mean(), path_area=path_area.mean(),
              box_shares=box_share, path_shares=path_share)


# What `concepts.ViewConcepts` reads of a checkpoint besides its encoders: the
# prototypes (templates) and the aggregation; the decoders and projectors of
# pretraining are left out of a fixture.
FIXTURE_PARAMS = ("lit", "prototype", "prototype_s", "prototype_d")


def write_fixture(init_from: str, prefix: str) -> None:
  """PREFIX.json (the run's config) and PREFIX.npz (float32 variables the
  visualiser reads, keys 'collection/module/.../name'): a checkpoint small enough
  to commit, which `tests/test_visualize.py` turns back into a workdir."""
  config, variables, _ = exported.read_workdir(init_from)
  encoders = [e for e in cvc.ENCODERS if e in variables["params"]]
  kept = {"params": {k: variables["params"][k] for k in encoders + list(FIXTURE_PARAMS)},
          "batch_stats": {e: variables["batch_stats"][e] for e in encoders}}
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf, np.float32)
          for path, leaf in jax.tree_util.tree_leaves_with_path(kept)}
  np.savez_compressed(prefix + ".npz", **flat)
  with open(prefix + ".json", "w") as f:
    json.dump(config, f, indent=1, sort_keys=True)


def main(argv):
  del argv
  f = flags.FLAGS
  if f.write_fixture:
    write_fixture(f.init_from, f.write_fixture)
    print(f"Wrote {f.write_fixture}.npz and .json")
    return
  r = measure(f.init_from, videos=f.videos, path=f.path, short_side=f.short_side)
  print(f"{r['videos']} moving videos, the most active dynamic concept's attention:\n"
        f"  in the object's box   {r['box_share']:.3f} (min {r['box_shares'].min():.3f}); "
        f"the box covers {r['box_area']:.3f} of the frame\n"
        f"  in the object's path  {r['path_share']:.3f} (min {r['path_shares'].min():.3f}); "
        f"the path over the clip covers {r['path_area']:.3f}")


if __name__ == "__main__":
  flags.DEFINE_string("init_from", None, "A pretraining workdir.", required=True)
  flags.DEFINE_enum("path", "kinds", concepts.PATHS, "As cvc_jax.visualize's --path.")
  flags.DEFINE_integer("videos", 16, "Test videos to look at (the still ones are "
                       "skipped).")
  flags.DEFINE_integer("short_side", None, "As cvc_jax.visualize's --short_side: the "
                       "frames' short side in the model's input (default: the crop "
                       "size or 128, whichever is larger).")
  flags.DEFINE_string("write_fixture", None, "Instead of measuring, write the "
                      "checkpoint's concept paths to this PREFIX.npz and PREFIX.json "
                      "(see write_fixture).")
  app.run(main)
