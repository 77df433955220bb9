"""What the pretraining and the downstream training loops share about checkpoints:
the CheckpointManager they save with, orbax's restore target, checking that a
checkpoint fits, and preemption turned into a checkpoint and a clean stop (the
last save awaited before SIGTERM's handler is given back).
"""

import os
import signal

from absl import logging
import jax
import orbax.checkpoint as ocp


def abstract(tree):
  """Shapes, dtypes and shardings of a pytree: orbax's restore target."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def checkpoint_manager(workdir: str, *, max_to_keep: int,
                       save_interval_steps: int) -> ocp.CheckpointManager:
  """The training loops' checkpoint manager, over `workdir/checkpoints`: saves
  every `save_interval_steps` (and when forced), keeps the newest `max_to_keep`,
  and clears the temporary folders of saves cut short. Close it (a `with`): it
  stops orbax's asynchronous machinery, which complains at exit otherwise."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
          cleanup_tmp_directories=True))


def restore(manager: ocp.CheckpointManager, step: int, target):
  """Checkpoint `step` restored into the shapes, dtypes and shardings of `target`.

  Raises:
    ValueError: the checkpoint holds other arrays than `target` has (a run of
      another config, or of another kind, wrote it), naming the first that
      differ; nothing is restored or written.
  """
  path = os.path.join(str(manager.directory), str(step), "default")
  with ocp.StandardCheckpointer() as checkpointer:
    stored = _by_name(checkpointer.metadata(path).item_metadata.tree)
  wanted = _by_name(target)
  shape = lambda leaf: tuple(getattr(leaf, "shape", ()))  # python scalars: ()
  differ = [f"{n}: none in the checkpoint, {shape(wanted[n])} here"
            for n in wanted if n not in stored]
  differ += [f"{n}: {shape(stored[n])} in the checkpoint, none here"
             for n in stored if n not in wanted]
  differ += [f"{n}: {shape(stored[n])} in the checkpoint, {shape(wanted[n])} here"
             for n in wanted if n in stored and shape(stored[n]) != shape(wanted[n])]
  if differ:
    differ.sort(key=lambda line: not line.startswith("params/"))  # parameters first
    more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
    raise ValueError(
        f"The checkpoint of step {step} in {manager.directory} does not fit this "
        f"run's config: {'; '.join(differ[:3])}{more}. Another config wrote it: "
        "resume with that one (the workdir's config.json is the last run's), or "
        "give this run a new --workdir.")
  return manager.restore(step, args=ocp.args.StandardRestore(abstract(target)))


def _by_name(tree) -> dict:
  """A pytree's leaves by path, 'params/backbone/stem_0/kernel', whether the
  path's nodes are dicts, sequences or (as orbax reads them back) named tuples."""
  def name(key):
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
  return {"/".join(name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Preemption:
  """Whether a training loop should save and stop after a step: SIGTERM, the
  notice of a preemption, has come. A context manager around the loop.

  One process: a SIGTERM handler of its own sets a flag. Several processes:
  every one must stop after the same step (a save and the next step's
  collectives involve them all), and a notice may reach one host only or hosts
  at different steps. jax.distributed's preemption service (installed by
  `jax.distributed.initialize`, which catches SIGTERM itself: a handler of ours
  would take its place) tells all of them one step, through the checkpoint
  manager. On exit, however the loop ends, the manager's last save is awaited
  and only then is the previous handler put back: a second signal in between
  must not kill the save.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self._own_handler = jax.process_count() == 1
    self._received = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    if self._own_handler:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc_info):
    try:
      self._manager.wait_until_finished()
    finally:  # a failed save must not leave our handler behind
      # None: the previous handler was not Python's, and Python cannot put it back.
      if self._own_handler and self._previous is not None:
        signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self._received = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (call once per step, on every process)."""
    if self._own_handler:
      return self._received
    return self._manager.reached_preemption(step)
