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


def init_compiler_options() -> dict | None:
  """`CPU_INIT_COMPILER_OPTIONS` on CPU; None (XLA's defaults) elsewhere."""
  return CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None


def jit_init(fn, **jit_kwargs):
  """`jax.jit(fn, **jit_kwargs)` for a function run once to make variables,
  compiled with `init_compiler_options()`.

  Call it outside any jit: JAX refuses compiler options on a nested one.
  """
  return jax.jit(fn, compiler_options=init_compiler_options(), **jit_kwargs)
