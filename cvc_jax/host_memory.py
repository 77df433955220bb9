"""Keeps freed host memory for reuse when XLA runs on the CPU (glibc malloc).

XLA's CPU runtime allocates each execution's temporaries from its worker threads
(10.7 GB per train step of `configs/reference.py` at batch 2) and frees them at
the end. glibc serves a worker thread from its own arena, and an arena other
than the main one takes any block over 64 MB straight from mmap and unmaps it on
free, so every step faults in, and the kernel zeroes, every page again: 28 M
minor page faults and 125 s of system time in a 9-step benchmark run, whatever
`mmap_max` says. With one arena (the main heap, for every thread), no mmap and no
trimming, freed blocks stay mapped and are reused: 3.3 M faults, 40 s, and the
step went from 22.3 s to 19.8 s (benchmarks/RESULTS.md).

glibc fixes the arena limit when a second thread first allocates, so this runs
on `import cvc_jax`, before jax, TensorFlow or PyTorch start threads. It only
applies where the CPU is the only JAX backend installed (no CUDA, ROCm or TPU
plugin): on accelerator hosts the input pipeline's many threads would contend
for one arena, and the device, not host memory, holds the step's buffers.
`CVC_JAX_KEEP_HOST_MEMORY=0` turns it off, `=1` forces it.
"""

import ctypes
import importlib.util
import os
import sys

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu", "jax_plugins.xla_cuda12",
                        "jax_plugins.xla_cuda13")
ENV = "CVC_JAX_KEEP_HOST_MEMORY"


def cpu_only() -> bool:
  """True when no accelerator plugin for JAX is installed (found without importing)."""
  for name in _ACCELERATOR_MODULES:
    try:
      if importlib.util.find_spec(name) is not None:
        return False
    except (ImportError, ValueError):  # a missing parent package
      continue
  return True


def keep_freed_memory() -> bool:
  """Sets glibc malloc to one arena, no mmap and no trimming; True if it did.

  Does nothing (False) off Linux/glibc, where an accelerator plugin is installed,
  or with CVC_JAX_KEEP_HOST_MEMORY=0; CVC_JAX_KEEP_HOST_MEMORY=1 applies it anyway.
  """
  setting = os.environ.get(ENV, "").strip()
  if setting == "0" or (setting != "1" and not cpu_only()):
    return False
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  # glibc, not musl
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt returns 1 on success; a trim threshold of -1 disables trimming.
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
