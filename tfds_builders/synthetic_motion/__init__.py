"""synthetic_motion data set (`tfds build tfds_builders/synthetic_motion`)."""

# Relative, because `tfds build` imports this package as top-level
# `synthetic_motion`, not as `tfds_builders.synthetic_motion`.
from .synthetic_motion_dataset_builder import Builder
