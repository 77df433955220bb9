"""What the pretraining and the downstream training loops share about checkpoints:
orbax's restore target, and preemption turned into a checkpoint and a clean stop.
"""

import signal

from absl import logging
import jax
import orbax.checkpoint as ocp


def abstract(tree):
  """Shapes, dtypes and shardings of a pytree: orbax's restore target."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class StopSignal:
  """Turns SIGTERM (preemption) into a flag a training loop checks between steps.

  The loop then saves a checkpoint and returns; `restore()` puts the previous
  handler back.
  """

  def __init__(self):
    self.received = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self.received = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)
