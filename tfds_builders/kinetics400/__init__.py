"""kinetics400 data set (`tfds build tfds_builders/kinetics400 --manual_dir=DIR`)."""

# Relative, because `tfds build tfds_builders/kinetics400` imports this package as
# top-level `kinetics400`, not as `tfds_builders.kinetics400`.
from .kinetics400_dataset_builder import Builder
