"""The features every video builder of the project stores.

The input pipeline depends on exactly these keys, so a new data set only needs
a builder that yields them:

  video:      the frames, each JPEG-encoded, so that a reader can decode just
              the frames it samples (`tfds.decode.SkipDecoding()` keeps bytes).
  label:      the class the downstream protocols evaluate.
  video_id:   a name unique within the split (file stem for real videos).
  num_frames: len(video), readable without touching the frames.
  fps:        frames per second of the stored frames.

Builders add their own keys through `extra` (the synthetic data set adds its
static and dynamic labels and the object's boxes).
"""

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds


def features(
    label_names: Sequence[str],
    extra: Mapping[str, tfds.features.FeatureConnector] | None = None,
) -> tfds.features.FeaturesDict:
  """Returns the shared FeaturesDict, plus `extra` builder-specific keys.

  Args:
    label_names: names of the classes of `label`, in label order.
    extra: further features; may not redefine the shared keys.
  """
  shared = {
      # Frame size varies across (and for real data within) data sets; the
      # pipeline pads each decoded frame into a fixed canvas.
      "video": tfds.features.Video(shape=(None, None, None, 3),
                                   encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(names=list(label_names)),
      "video_id": tfds.features.Text(),
      "num_frames": tfds.features.Scalar(dtype=np.int32),
      "fps": tfds.features.Scalar(dtype=np.float32),
  }
  extra = dict(extra or {})
  if clash := sorted(set(shared) & set(extra)):
    raise ValueError(f"extra features redefine shared keys: {clash}")
  return tfds.features.FeaturesDict({**shared, **extra})
