"""Flax modules: 3D ResNet encoders (`resnet3d`) and the forms their convolutions
run in (`convolutions`, with the CPU backend's hand-written kernel gradients in
`kernel_grads`), concept heads (`heads`), the pretraining model (`cvc`) and
exported encoders (`exported`)."""

import jax

from cvc_jax.models import convolutions

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


# cuDNN runs 16-bit convolutions on the tensor cores channels-last. XLA's layout
# heuristic gives that layout to 16-bit 2D convolutions only, so around each of
# R(2+1)D's 3D ones cuDNN transposed the operands to channels-last and back: 41%
# of the GPU time of the bfloat16 train step of configs/ucf101.py (16 videos, an
# H200; jax.profiler trace of `benchmarks/gpu_run.sh` stage 1). With the layout
# forced the step took 125.1 ms instead of 170.3 (benchmarks/RESULTS.md). Float32
# convolutions keep XLA's choice: nobody has timed them forced.
GPU_16BIT_CONV_COMPILER_OPTIONS = {"xla_gpu_force_conv_nhwc": True}


def conv_compiler_options(dtype, device=None) -> dict | None:
  """XLA options for a program whose convolutions compute in `dtype` on `device`
  (default: the first of `jax.devices()`): `GPU_16BIT_CONV_COMPILER_OPTIONS` for
  16-bit dtypes on NVIDIA GPUs, else None."""
  return (GPU_16BIT_CONV_COMPILER_OPTIONS if convolutions.nvidia_16bit(dtype, device)
          else None)
