r"""Entry point: pretraining, and (with a downstream config) evaluation.

    python -m cvc_jax.main --config=configs/demo.py --workdir=/tmp/cvc_demo
    python -m cvc_jax.main --config=configs/ucf101.py:sigma=linear --workdir=DIR \
        --config.batch_size=128

Runs launched as several processes (TPU pod slices, SLURM) add --distributed;
elsewhere also --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""

import logging as pylogging
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from cvc_jax import pretrain

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with variants after ':'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and config.json.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first: for runs of several "
                  "processes (its settings are detected on TPU pods and SLURM).")
flags.DEFINE_string("coordinator_address", None, "With --distributed where nothing "
                    "detects them: process 0's host:port ...")
flags.DEFINE_integer("num_processes", None, "... the number of processes ...")
flags.DEFINE_integer("process_id", None, "... and this one's index, from 0.")
flags.mark_flags_as_required(["config", "workdir"])


# Where ml_collections resolves a --config.A.B=... override's path in the config.
_OVERRIDE_LOOKUP = os.path.join("ml_collections", "config_flags", "config_path.py")


class _QuietLibraries(pylogging.Filter):
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint)."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  given = [f"--{name}" for name in ("coordinator_address", "num_processes", "process_id")
           if FLAGS[name].present]
  if given and not FLAGS.distributed:
    raise app.UsageError(f"{', '.join(given)} take effect only with --distributed; "
                         "add it (or drop them for a single-process run).")
  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
    # orbax's barriers through the coordination service, not collectives: its
    # asynchronous saves meet from a background thread, where a collective would
    # interleave with the train step's (gloo, on CPUs, then fails outright).
    FLAGS.experimental_orbax_use_distributed_barrier = True
  logging.info("JAX process %d of %d, %d local / %d global devices (%s).",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  config, workdir = FLAGS.config, FLAGS.workdir
  mode = config.get("mode", "pretrain")
  if mode == "pretrain":
    pretrain.train_and_evaluate(config, workdir)
    if config.get("eval_after_pretraining", False):
      from cvc_jax.downstream import demo  # pylint: disable=g-import-not-at-top
      demo.compare(config, workdir)
  elif mode in ("linear", "finetune"):
    from cvc_jax.downstream import classify  # pylint: disable=g-import-not-at-top
    classify.train_and_evaluate(config, workdir)
  elif mode == "retrieval":
    from cvc_jax.downstream import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.run_retrieval(config, workdir)
  else:
    raise app.UsageError(f"config.mode must be pretrain, linear, finetune or retrieval, "
                         f"got {mode!r}.")


def _parse_flags(argv):
  """absl's flag parsing; a --config.KEY the config lacks is said in one line
  (ml_collections raises it from deep inside the parsing, as a traceback)."""
  try:
    return app.parse_flags_with_usage(argv)  # says a bad value in one line itself
  except (AttributeError, KeyError) as e:
    # Only a failed lookup of an override's path is a misspelt key; the same
    # exceptions from a config file's own code keep their traceback.
    frames = traceback.extract_tb(e.__traceback__)
    if not any(f.filename.endswith(_OVERRIDE_LOOKUP) for f in frames):
      raise
    detail = e
    while isinstance(detail, BaseException) and detail.args:
      detail = detail.args[0]  # ml_collections wraps its KeyError's message twice
    sys.exit(f"FATAL: no such config key: {detail}\n(Overrides name keys of the "
             "config file, e.g. --config.batch_size=8; a config's keys are in "
             "configs/common.py.)")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
