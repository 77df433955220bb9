"""Runs a few full pretraining steps (views, forward, backward, update) on a mesh.

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
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from configs import ucf101  # pylint: disable=g-import-not-at-top
  from cvc_jax import pretrain, views  # pylint: disable=g-import-not-at-top

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
  t, (h, w), s = config.input.num_frames, config.input.raw_size, config.input.crop_size
  frames = np.random.default_rng(0).integers(0, 256, (num_steps, batch, 2 * t, h, w, 3),
                                             dtype=np.uint8)
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state = pretrain.init_train_state(config, jax.random.key(0), (batch, 6, t, s, s, 3),
                                    steps_per_epoch, sharding=replicated)

  def step(state, frames):
    v = views.pretrain_views(frames, jax.random.fold_in(jax.random.key(1), state.step),
                             config)
    return pretrain.train_step(state, v, config, steps_per_epoch)

  step = jax.jit(step, in_shardings=(replicated, sharded), out_shardings=replicated)
  per_process = batch // jax.process_count()
  local = lambda i: jax.make_array_from_process_local_data(
      sharded, frames[i, jax.process_index() * per_process:
                      (jax.process_index() + 1) * per_process])
  if num_steps:
    step = step.lower(state, local(0)).compile()
  if jax.process_count() > 1:
    # Gloo gives a collective 30 s for every process to arrive: on a loaded CI
    # machine the two processes' compiles can differ by more, so they meet at a
    # coordination-service barrier (no collective) once both have compiled.
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    distributed.global_state.client.wait_at_barrier("cvc_compiled", 600_000)
  totals = []
  for i in range(num_steps):
    state, metrics = step(state, local(i))
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
