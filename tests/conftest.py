"""Test set-up: 8 fake CPU devices, so sharded code runs as on a TPU slice."""

import os
import tempfile

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
