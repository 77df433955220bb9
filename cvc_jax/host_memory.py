"""Keeps freed host memory for reuse when XLA runs on the CPU (glibc malloc).

XLA's CPU runtime allocates each execution's temporaries from its worker threads
(10.7 GB per train step of `configs/reference.py` at batch 2) and frees them at
the end. glibc serves a worker thread from its own arena, and an arena other
than the main one takes any block over 64 MB straight from mmap and unmaps it on
free, so every step faults in, and the kernel zeroes, every page again, whatever
`mmap_max` says: with `mmap_max=0` and no trimming, 28 M minor page faults and
125 s of system time in a 9-step benchmark run (29 M with glibc's defaults).
With one arena as well (the main heap, for every thread), freed blocks stay
mapped and are reused: 3.3 M faults, 40 s, and the step went from 22.3 s to
19.8 s (benchmarks/RESULTS.md).

It is opt-in, `CVC_JAX_KEEP_HOST_MEMORY=1` in the environment, because it is not
a win everywhere: with it on, the test suite (many small jitted programs, 8 fake
devices, TensorFlow input pipelines, all threads in one arena) took 11 min 32 s
instead of 6 min 43 s on the same machine, and since the encoder's CPU form
stopped writing most of those temporaries the reference step is slower with it
(20.3 s against 15.8-18.4 s without, benchmarks/RESULTS.md, session 6). glibc
fixes the arena limit when a second thread first allocates, so it is applied on
`import cvc_jax`, before jax, TensorFlow or PyTorch start threads.
"""

import ctypes
import os
import sys

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
ENV = "CVC_JAX_KEEP_HOST_MEMORY"


def keep_freed_memory() -> bool:
  """With CVC_JAX_KEEP_HOST_MEMORY=1: one glibc arena, no mmap, no trimming.

  Returns whether it was applied: False without the variable, off Linux/glibc,
  or where mallopt refuses.
  """
  if os.environ.get(ENV, "").strip() != "1" or not sys.platform.startswith("linux"):
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
