"""The full train step gives the same result on 1 device, 8 devices and 2 processes."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import Mesh

from tests import multidevice_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_same(params_a, totals_a, params_b, totals_b):
  np.testing.assert_allclose(totals_a, totals_b, rtol=1e-4)
  assert set(params_a) == set(params_b)
  for name in params_a:
    np.testing.assert_allclose(params_a[name], params_b[name], rtol=1e-5, atol=1e-5,
                               err_msg=name)


def test_three_steps_on_8_devices_equal_one_device():
  one = multidevice_worker.run_steps(Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  eight = multidevice_worker.run_steps(Mesh(np.asarray(jax.devices()), ("data",)))
  assert len(jax.devices()) == 8
  _assert_same(*eight, *one)
  start = multidevice_worker.run_steps(Mesh(np.asarray(jax.devices()[:1]), ("data",)),
                                       num_steps=0)[0]
  moved = max(np.abs(one[0][k] - start[k]).max() for k in start)
  assert moved > 1e-4  # the comparison at 1e-5 is not vacuous


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_of_4_devices_equal_one_process_of_8(tmp_path):
  """Multi-process CPU through gloo collectives, launched as two real processes."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  port = _free_port()
  outs = [tmp_path / "two.npz", tmp_path / "unused.npz"]
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "multidevice_worker.py"),
       f"--process_id={i}", "--num_processes=2", "--devices_per_process=4",
       f"--port={port}", f"--out={outs[i]}"], env=env, cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=400)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  two = np.load(outs[0])
  eight = multidevice_worker.run_steps(Mesh(np.asarray(jax.devices()), ("data",)))
  _assert_same({k: two[k] for k in two.files if k != "totals"}, two["totals"], *eight)
