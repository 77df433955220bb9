"""Flax modules: 3D ResNet encoders (`resnet3d`), concept heads (`heads`), the
pretraining model (`cvc`) and exported encoders (`exported`)."""

import jax

# Initialisation runs once, so what matters on CPU is its compile time, which is
# mostly LLVM optimising one random-number kernel (a threefry hash and a
# truncated normal) per parameter shape. The train state of configs/demo.py
# compiled in 8.1 s at XLA's default backend level 3 and in 4.2 s at level 2,
# every array bitwise the same (level 0, 3.4 s, rounds 46 of 404 differently);
# `python benchmarks/init_compile.py --config=configs/demo.py --levels=3,2,1,0`
# on this project's 2-core CPU, benchmarks/RESULTS.md.
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}


def jit_init(fn, **jit_kwargs):
  """`jax.jit(fn, **jit_kwargs)` for a function run once to make variables.

  On CPU it compiles with `CPU_INIT_COMPILER_OPTIONS`; elsewhere as `jax.jit`.
  Call it outside any jit: JAX refuses compiler options on a nested one.
  """
  options = CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return jax.jit(fn, compiler_options=options, **jit_kwargs)
