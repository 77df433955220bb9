"""video_folder data set (`tfds build tfds_builders/video_folder --manual_dir=DIR`)."""

# Relative, because `tfds build tfds_builders/video_folder` imports this package as
# top-level `video_folder`, not as `tfds_builders.video_folder`.
from .video_folder_dataset_builder import Builder
