"""TFDS builders for the video data sets of cvc_jax, one folder per data set.

Each folder follows the `tfds new` layout, so `tfds build tfds_builders/<name>`
works from the repository root; `cvc_jax.input_pipeline` imports the same
builders by module. Every builder describes its examples with
`video_features.features()`, which is what the input pipeline reads.
"""
