"""A step's model FLOPs as MFU counts them (`cvc_jax.costs`)."""

import jax
import jax.numpy as jnp

from configs import reference
from cvc_jax import costs
from cvc_jax import pretrain


def test_peaks_by_device_kind():
  assert costs.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert costs.peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 67.0
  assert costs.peak_tflops("NVIDIA H200", "bfloat16") == 989.0  # the H100 SXM's compute
  assert costs.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
  assert costs.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 19.5
  assert costs.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
  assert costs.peak_tflops("TPU v5", "bfloat16") == 459.0
  assert costs.peak_tflops("TPU v4", "float32") == 275.0
  assert costs.peak_tflops("TPU v6 lite", "bfloat16") == 918.0
  assert costs.peak_tflops("cpu", "float32") is None
  assert costs.peak_tflops("NVIDIA H100 NVL", "bfloat16") is None  # not the SXM's
  assert costs.peak_tflops("NVIDIA H200 NVL", "bfloat16") is None
  assert costs.peak_tflops("TPU v4 lite", "bfloat16") is None


def test_speed_options_count_only_the_model_flops():
  config = reference.get_config("runlocal")
  config.model.encoder.conv_impl = "3d"
  plain = costs.step_flops(config)
  config.model.encoder.conv_impl = "3d_pad8"  # the zeros it adds are not counted
  assert costs.step_flops(config) == plain
  config.model.encoder.conv_impl = "3d"
  config.model.encoder.stem_impl = "space_to_depth"  # nor the 8x8 stem's zero taps
  assert costs.step_flops(config) == plain
  config.model.encoder.stem_impl = "conv"
  config.remat = "blocks"  # nor the forward passes remat repeats ...
  assert costs.step_flops(config) == plain
  # ... which the traced step does hold: a second forward pass of the encoder in
  # the gradient's remat regions (1.29x the convolutions and products, jax 0.10.2).
  step = pretrain.frames_train_step(config, 1)
  raw = costs.jaxpr_flops(jax.make_jaxpr(step)(*costs.abstract_inputs(config)))
  assert raw > 1.2 * plain


def test_jaxpr_flops_counts_convolutions_and_products_by_hand():
  x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))

  def conv(x, k, stride):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  count = lambda f, *args: costs.jaxpr_flops(jax.make_jaxpr(f)(*args))
  for stride in (1, 2):
    forward = 2 * 2 * (8 // stride) ** 2 * 4 * (3 * 3 * 3)  # 2 x outputs x taps
    assert count(lambda x, k: conv(x, k, stride), x, k) == forward
    # Forward, input gradient (on the zero-dilated output gradient when strided:
    # only real taps count) and kernel gradient: three times the forward pass.
    grad = jax.grad(lambda x, k: conv(x, k, stride).sum(), argnums=(0, 1))
    assert count(grad, x, k) == 3 * forward
  a, b = jnp.ones((5, 7)), jnp.ones((7, 3))
  assert count(jax.grad(lambda a, b: (a @ b).sum(), argnums=(0, 1)), a, b) == 3 * 2 * 105
  m = jnp.ones((6, 6))
  loop = lambda m: jax.lax.fori_loop(0, 4, lambda i, c: c @ m, m)  # a scan of 4
  assert count(loop, m) == 4 * 2 * 6 ** 3
  branches = lambda p, m: jax.lax.cond(p, lambda m: m @ m @ m, lambda m: m, m)
  assert count(branches, True, m) == 2 * 2 * 6 ** 3  # the costlier branch
