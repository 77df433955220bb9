"""The full train step gives the same result on 1 device, 8 devices and 2 processes."""

import glob
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh

from tests import multidevice_worker
from tests import overrides

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


def _error_lines(log: str) -> str:
  """What a failed run said, without the module list of a fatal error's dump."""
  return "\n".join(line for line in log.splitlines()
                   if not line.startswith(("Extension modules", "I0000", "W0000")))[-6000:]


def _bound_port(port: int) -> int | None:
  """`port` (0: the kernel's choice) if a socket can bind it on every address,
  as the coordinator binds (`[::]`, dual-stack; IPv4 where there is no IPv6)."""
  try:
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    address = "::"
  except OSError:
    s, address = socket.socket(), "0.0.0.0"
  with s:
    try:
      s.bind((address, port))
    except OSError:
      return None
    return s.getsockname()[1]


def _free_port() -> int:
  """A port nothing is bound to, below the kernel's ephemeral range where one
  is known: the processes' own outgoing connections take their ports from that
  range, and one could take the coordinator's between this check and its bind."""
  try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
      ephemeral_low = int(f.read().split()[0])
  except (OSError, ValueError, IndexError):  # not Linux: the kernel's choice
    ephemeral_low = 0
  below = range(10000, ephemeral_low)
  for port in random.sample(below, min(100, len(below))) + [0]:
    if (bound := _bound_port(port)) is not None:
      return bound
  raise OSError("No free port for the coordinator.")


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


def test_main_in_two_processes_stops_on_one_sigterm_resumes_and_equals_one_process(
    tmp_path, request):
  """`cvc_jax.main --distributed` as 2 processes of 4 CPU devices: a SIGTERM to one
  of them makes both save the same step and stop; started again, they resume and
  end where one process of 4 devices ends (the same partitioning of the batch, so
  only the collectives' summation order differs)."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from cvc_jax import datasets  # pylint: disable=g-import-not-at-top
  from cvc_jax.models import exported  # pylint: disable=g-import-not-at-top
  steps = 6  # 16 tiny videos, batch 8: 3 epochs
  run = overrides.tiny_pretraining(str(tmp_path / "tfds"), steps)
  datasets.ensure_built(overrides.apply(demo.get_config(), run))
  data = overrides.flags({k: run[k] for k in ("input.data_dir", "input.dataset",
                                              "batch_size")})
  # As in run_steps: Adam's eps at 1 keeps float32 reduction-order noise in
  # near-zero gradients from becoming whole steps of lr.
  pretraining = overrides.flags({**run, "log_every_steps": 1, "optim.eps": 1.0,
                                 "optim.lr": 1e-4, "keep_checkpoints": steps})
  # No persistent compilation cache for the two processes: their programs' cache
  # keys differ, so only process 0 finds a cached program, and a cached program
  # beside a fresh compile of the same step disagreed on their gloo collectives
  # (an aborted all-reduce) here.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             JAX_ENABLE_COMPILATION_CACHE="false")
  alone = dict(os.environ, XLA_FLAGS=env["XLA_FLAGS"], JAX_ENABLE_COMPILATION_CACHE="false")
  two = tmp_path / "two"
  ckpts = two / "checkpoints"

  def launch(workdir=two, config_file="configs/demo.py", flags=pretraining):
    port = _free_port()
    logs = [open(tmp_path / f"log{i}.txt", "w+") for i in range(2)]  # pylint: disable=consider-using-with
    procs = [subprocess.Popen(
        [sys.executable, "-m", "cvc_jax.main", f"--config={config_file}",
         f"--workdir={workdir}", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", *flags],
        cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    for p, f in zip(procs, logs):  # none left running, whichever check fails
      request.addfinalizer(lambda p=p, f=f: (p.poll() is None and p.kill(), f.close()))
    return procs, logs

  def finish(procs, logs):
    for p in procs:
      p.wait(timeout=500)
    out = []
    for f in logs:
      f.seek(0)
      out.append(f.read())
      f.close()
    for p, log in zip(procs, out):
      assert p.returncode == 0, _error_lines(log)
    return out

  # 1) SIGTERM to process 1 alone, once training has saved a step.
  procs, logs = launch()
  deadline = time.time() + 400
  while not glob.glob(str(ckpts / "[0-9]*")):
    assert all(p.poll() is None for p in procs) and time.time() < deadline
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  out = finish(procs, logs)
  stopped = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert stopped < steps, "the run ended before the preemption took effect"
  for log in out:
    assert f"Stopped at step {stopped} after a preemption signal" in log, log[-3000:]

  # 2) The same command again: resumed, to the end.
  out = finish(*launch())
  assert f"Resumed from step {stopped}" in out[0], out[0][-3000:]
  one = subprocess.run(
      [sys.executable, "-m", "cvc_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path / 'one'}", *pretraining], cwd=ROOT, capture_output=True,
      text=True, timeout=400, env=alone)
  assert one.returncode == 0, _error_lines(one.stderr)
  # read_workdir (downstream's reader) reads the 2-process checkpoint in 1 process.
  def params(workdir, step=None):
    _, variables, at = exported.read_workdir(str(workdir), step=step)
    assert step is not None or at == steps
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}

  got, want = params(two), params(tmp_path / "one")
  before = params(tmp_path / "one", steps - 1)
  # gloo's summation order against one process's grows over the steps (Sinkhorn
  # and the top-k masks amplify it, in a few weights), to 0.19 of what the last
  # step moves in the L2 norm over all parameters (9.3e-4 against 5.0e-3 at
  # 860c787; the largest single weight's difference was 0.52 of its step's, too
  # close to tell apart); a lost or a repeated step, or a wrong batch, is a
  # whole step or more away.
  distance = lambda a, b: np.sqrt(sum(np.sum((a[k] - b[k])**2) for k in a))
  assert distance(got, want) < 0.5 * distance(want, before), (
      distance(got, want), distance(want, before))

  # 3) A linear probe from that checkpoint in 2 processes (training, the test
  #    clips gathered across them): the test results of 1 process of 4 devices.
  probe_config = "configs/eval/ucf101_linear.py:runlocal"
  probe = [*data, "--config.num_epochs=1", "--config.eval.num_clips=2",
           f"--config.init_from={two}"]
  finish(*launch(tmp_path / "probe_two", probe_config, probe))
  one = subprocess.run(
      [sys.executable, "-m", "cvc_jax.main", f"--config={probe_config}",
       f"--workdir={tmp_path / 'probe_one'}", *probe],
      cwd=ROOT, capture_output=True, text=True, timeout=400, env=alone)
  assert one.returncode == 0, _error_lines(one.stderr)
  results = [json.loads((tmp_path / d / "results.json").read_text())["linear"]
             for d in ("probe_two", "probe_one")]
  assert sum(map(sum, results[0]["confusion"])) == 8  # every test video once
  assert results[0]["confusion"] == results[1]["confusion"]
