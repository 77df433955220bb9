"""Runs a few full pretraining steps (views, forward, backward, update) on a mesh:
`pretrain.jitted_train_step`, the program pretraining runs.

Imported by tests for in-process runs over 1 or 8 devices, and run as a script for
multi-process runs:

    python tests/multidevice_worker.py --process_id=0 --num_processes=2 \
        --devices_per_process=4 --port=PORT --out=FILE.npz

Every process feeds its slice of the same global batch; process 0 writes the
final parameters and the per-step losses.
"""

import argparse
import os
import sys


def run_steps(mesh, num_steps=3, batch=8):
  """The parameters and totals after `num_steps` steps over `mesh`."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import ucf101  # pylint: disable=g-import-not-at-top
  from cvc_jax import models, parallel, pretrain  # pylint: disable=g-import-not-at-top

  config = ucf101.get_config("runlocal")
  with config.unlocked():
    # Adam's first steps move a weight by lr * g / (|g| + eps), about lr * sign(g):
    # the gradients of 1 and 8 devices agree to ~1e-5 of their largest entry (sums
    # run in another order, BatchNorm variances cancel), so with eps = 1e-8 a
    # near-zero entry can flip sign and move by 2 lr. With eps = 1 and lr = 1e-4 a
    # gradient difference dg moves a weight by at most lr * dg, while the weights
    # still move by ~1e-4 per step: enough to see a wrong update at 1e-5.
    config.optim.eps = 1.0
    config.optim.lr = 1e-4
  steps_per_epoch = 2  # so the third step runs with the prototypes unfrozen
  t, (h, w) = config.input.num_frames, config.input.raw_size
  frames = np.random.default_rng(0).integers(0, 256, (num_steps, batch, 2 * t, h, w, 3),
                                             dtype=np.uint8)
  sizes = np.tile(np.int32([h, w]), (batch, 1))
  replicated, sharded = parallel.shardings(mesh)
  state = pretrain.init_train_state(config, jax.random.key(0),
                                    pretrain.views_shape_of(config, batch),
                                    steps_per_epoch, sharding=replicated)
  # The base key of the views, replicated as pretraining makes its own.
  rng = jax.jit(functools.partial(jax.random.key, 1), out_shardings=replicated)()
  per_process = slice(jax.process_index() * batch // jax.process_count(),
                      (jax.process_index() + 1) * batch // jax.process_count())
  local = lambda i: {
      "frames": jax.make_array_from_process_local_data(sharded, frames[i, per_process]),
      "sizes": jax.make_array_from_process_local_data(sharded, sizes[per_process])}
  # The step pretraining jits, its state donated, compiled on every process
  # before any runs it (gloo gives a collective only 30 s for all to arrive).
  step = pretrain.jitted_train_step(config, steps_per_epoch, mesh,
                                    models.conv_compiler_options(config.dtype))
  if num_steps:
    step = parallel.compiled_together(step, state, local(0), rng, name="worker step")
  totals = []
  for i in range(num_steps):
    state, metrics = step(state, local(i), rng)
    totals.append(float(metrics["total"]))
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  params = {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
            for path, leaf in flat}
  return params, np.asarray(totals)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = (
      f"--xla_force_host_platform_device_count={args.devices_per_process}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    # CPU collectives across processes go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  params, totals = run_steps(Mesh(np.asarray(jax.devices()), ("data",)))
  if jax.process_index() == 0:
    np.savez(args.out, totals=totals, **params)
  if args.num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
