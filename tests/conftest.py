"""Test set-up: 8 fake CPU devices, so sharded code runs as on a TPU slice."""

import os
import tempfile

import pytest

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Several tests (and the subprocesses they start) compile the same programs;
# a shared on-disk cache compiles each once. Entries are keyed by program and
# JAX version, so a stale entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "cvc_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding synthetic_motion/tiny (16 train and 8 test videos),
  built once for the whole session; tests only read it."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from cvc_jax import datasets  # pylint: disable=g-import-not-at-top
  from tests import overrides  # pylint: disable=g-import-not-at-top
  config = common.base()
  config.input.dataset = overrides.TINY_DATA
  config.input.data_dir = str(tmp_path_factory.mktemp("tfds"))
  datasets.ensure_built(config)
  return config.input.data_dir
