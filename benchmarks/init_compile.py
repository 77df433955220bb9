r"""Compile time of the train state's initialisation at each XLA backend level.

    python benchmarks/init_compile.py --config=configs/demo.py [--levels=3,2,1,0]

Lowers `pretrain.create_train_state` of the config once (at its batch size) and
compiles it at each of --levels (`xla_backend_optimization_level`; 3 is XLA's
default), printing the compile time and how many of the state's arrays are
bitwise those of the first level. Then `pretrain.initial_variables` (the
demo's baseline) run op by op, as the demo ran it before, and under
`models.jit_init`, as it runs it now (its encoder is what the demo compares).
This is the measurement behind `models.CPU_INIT_COMPILER_OPTIONS`.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from cvc_jax import models
from cvc_jax import pretrain

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (FILE[:variants]).",
                                lock_config=True)
_LEVELS = flags.DEFINE_list("levels", ["3", "2"], "Backend levels to compile at.")


def _same(a, b) -> tuple[int, int]:
  """(arrays of a bitwise equal to b's, arrays)."""
  equal = jax.tree.leaves(jax.tree.map(
      lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))
  return sum(equal), len(equal)


def main(argv):
  del argv
  config = FLAGS.config
  rng = jax.random.key(config.seed)
  print(f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s)")

  lowered = jax.jit(lambda r: pretrain.create_train_state(
      config, r, pretrain.views_shape_of(config), 1)).lower(rng)
  first = None
  for level in map(int, _LEVELS.value):
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": level})
    seconds = time.perf_counter() - start
    state = compiled(rng)
    arrays = (state.params, state.batch_stats, state.opt_state, state.queue)
    first = first or arrays
    print(f"create_train_state, level {level}: compile {seconds:.1f} s, "
          "%d of %d arrays bitwise as level %s" % (*_same(arrays, first), _LEVELS.value[0]))

  shape = pretrain.views_shape_of(config, batch=1)
  start = time.perf_counter()
  eager = jax.block_until_ready(pretrain.initial_variables(config, rng, shape))
  eager_s = time.perf_counter() - start
  start = time.perf_counter()
  jitted = jax.block_until_ready(models.jit_init(
      lambda r: pretrain.initial_variables(config, r, shape))(rng))
  jitted_s = time.perf_counter() - start
  print(f"initial_variables op by op: {eager_s:.1f} s, %d of %d arrays bitwise as "
        "jit_init's" % _same(dict(eager), dict(jitted)))
  encoder = _same((jitted["params"]["backbone"], jitted["batch_stats"]["backbone"]),
                  (first[0]["backbone"], first[1]["backbone"]))
  print(f"initial_variables with models.jit_init {models.init_compiler_options()}: "
        f"{jitted_s:.1f} s (compile and run), encoder %d of %d arrays bitwise as "
        f"create_train_state's at level {_LEVELS.value[0]}" % encoder)


if __name__ == "__main__":
  app.run(main)
