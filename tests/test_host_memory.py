"""`import cvc_jax` keeps freed host memory for reuse when asked to."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A worker thread allocates, fills and frees 200 MB three times per round, as
# XLA's CPU workers do with a step's temporaries; the minor page faults of each
# round are counted.
_PROBE = r"""
import json, resource, threading
import cvc_jax
import numpy as np

def work():
  for _ in range(3):
    block = np.ones(200_000_000, np.uint8)
    del block

faults = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  thread = threading.Thread(target=work)
  thread.start()
  thread.join()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": cvc_jax.HOST_MEMORY_KEPT, "faults": faults}))
"""


def _probe(setting):
  env = dict(os.environ)
  env.pop("CVC_JAX_KEEP_HOST_MEMORY", None)
  if setting is not None:
    env["CVC_JAX_KEEP_HOST_MEMORY"] = setting
  run = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
  return json.loads(run.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
  kept, default = _probe("1"), _probe("0")
  assert kept["kept"] and not default["kept"]
  # glibc's default: a worker thread's large blocks are unmapped on free and
  # faulted in again every round (with transparent huge pages, one fault per
  # 2 MB; without, per 4 kB).
  assert min(default["faults"]) >= 3 * 200_000_000 // (2 << 20), default
  # Kept: the first round maps the memory, later rounds reuse it.
  assert max(kept["faults"][1:]) < min(default["faults"]) / 10, (kept, default)


def test_off_unless_asked_for():
  assert not _probe(None)["kept"]
