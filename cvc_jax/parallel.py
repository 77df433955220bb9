"""Where arrays live, and how the processes of a run meet.

Every program of cvc_jax runs one jitted step on global arrays over a 1-D
`data` mesh of all devices of all processes: the batch split along its first
axis, everything else replicated (BatchNorm statistics are then global-batch
statistics, with no axis_name). With several processes
(`jax.distributed.initialize`), each holds only its own devices, which is what
`replicate` and `barrier` are for.
"""

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp


def data_mesh(batch_size: int, devices=None) -> Mesh:
  """The 1-D `data` mesh over `devices` (default: every device of every host),
  over which a global batch of `batch_size` is split evenly, as checked here."""
  devices = jax.devices() if devices is None else list(devices)
  if batch_size % len(devices):
    raise ValueError(f"batch_size {batch_size} must be divisible by the {len(devices)} "
                     f"devices: set --config.batch_size to a multiple of {len(devices)}.")
  return Mesh(np.asarray(devices), ("data",))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
  """(replicated, batch) placements on a `data_mesh`: everything replicated but
  the batch, split along its first axis."""
  return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def barrier(name: str) -> None:
  """Every process waits here for all the others (none with one process), at the
  coordination service's barrier: a collective would wait only so long for a
  process still compiling (gloo's, on CPUs, 30 s)."""
  ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=3_600_000)


def replicate(tree, sharding: NamedSharding):
  """Values every process holds alike (host arrays, or arrays on one of its own
  devices), as global arrays placed by `sharding`, a replicated one: with several
  processes `jax.device_put` cannot reach the other processes' devices. Arrays
  already placed so (a trained state) stay where they are."""
  def place(x):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  return jax.tree_util.tree_map(place, tree)


def compiled_together(jitted, *args, name: str):
  """`jitted` for `args` (arrays or shapes). With several processes it is
  compiled here and all processes then meet at a `barrier`, so that none waits in
  the program's first collective for one still compiling; with one, `jitted`
  itself (compiled at its first call)."""
  if jax.process_count() == 1:
    return jitted
  compiled = jitted.lower(*args).compile()
  barrier(f"cvc_jax: {name} compiled")
  return compiled
