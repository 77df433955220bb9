"""ucf101 data set (`tfds build tfds_builders/ucf101 --manual_dir=DIR`)."""

# Relative, because `tfds build tfds_builders/ucf101` imports this package as
# top-level `ucf101`, not as `tfds_builders.ucf101`.
from .ucf101_dataset_builder import Builder
