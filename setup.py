"""cvc_jax: static and dynamic concepts for self-supervised video learning, in JAX."""

import setuptools

# Ranges are those the test suite ran with (CPU, Python 3.11); the upper bounds
# guard against the next major API change, not against a known break.
INSTALL_REQUIRES = [
    "absl-py>=2.1",
    "chex>=0.1.90",
    "dm-pix>=0.4.4,<0.5",
    "flax>=0.12,<0.13",
    "jax>=0.10,<0.12",
    "ml-collections>=1.1,<2",
    "numpy>=2.0,<3",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "safetensors>=0.6,<1",
]
EXTRAS = {
    # Reading and building data sets; not needed by the model, losses or train step.
    "data": ["tensorflow-cpu>=2.19,<2.22", "tensorflow-datasets>=4.9.8,<4.10",
             "grain>=0.2.12,<0.3", "array-record>=0.8", "pillow>=10",
             "importlib-resources>=6", "clu>=0.0.12", "tensorboard>=2.19",
             # The video builders: PyAV decodes (FFmpeg inside the wheel), Beam
             # runs kinetics400, mlcroissant is imported by the `tfds` CLI.
             "av>=14", "apache-beam>=2.60", "mlcroissant>=1.0", "tqdm>=4.60"],
    # Weight conversion from .pth files and the parity tests. Install the CPU build
    # explicitly (pip install torch==2.13.0); a bare "torch" may pull a CUDA build.
    "torch": ["torch>=2.9,<2.15"],
    # Running notebooks/cvc_jax_colab.ipynb locally (Colab has these).
    "notebooks": ["jupyter", "nbclient>=0.10,<0.12", "nbformat>=5.9,<6"],
    # tests/test_notebook.py executes the notebook headless.
    "test": ["pytest>=8", "pytest-xdist>=3.6.1", "nbclient>=0.10,<0.12", "nbformat>=5.9,<6",
             "ipykernel>=6.29,<8"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setuptools.setup(
    name="cvc_jax",
    version="0.1.0",
    description=("Static and Dynamic Concepts for Self-supervised Video Representation "
                 "Learning (ECCV 2022) in JAX/Flax"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # jax 0.10's
    packages=setuptools.find_packages(include=["cvc_jax", "cvc_jax.*", "configs",
                                               "configs.*", "tfds_builders",
                                               "tfds_builders.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
