"""diving48 data set (`tfds build tfds_builders/diving48 --manual_dir=DIR`)."""

# Relative, because `tfds build tfds_builders/diving48` imports this package as
# top-level `diving48`, not as `tfds_builders.diving48`.
from .diving48_dataset_builder import Builder
