"""hmdb51 data set (`tfds build tfds_builders/hmdb51 --manual_dir=DIR`)."""

# Relative, because `tfds build tfds_builders/hmdb51` imports this package as
# top-level `hmdb51`, not as `tfds_builders.hmdb51`.
from .hmdb51_dataset_builder import Builder
