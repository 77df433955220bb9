"""Hand-written kernel gradients for the 2D forms of the encoders' convolutions.

XLA's CPU backend runs a (1, kh, kw) convolution written as a 2D convolution of
single frames, and a (kt, 1, 1) one written as a (kt, 1) 2D convolution over
[B, T, H*W, C], fast forward and for the input gradient, but derives kernel
gradients for them that run several times slower than the same sums written as
matrix products (benchmarks/RESULTS.md). `with_kernel_grad` gives a form its
hand-written kernel gradient; `cvc_jax.models.convolutions` uses it for
conv_impl '2d1d'.
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp


# `frames_kernel_grad` works through the frames in groups of at most this many
# bytes of input and output gradient, so that the shifted copies of a group stay
# in a core's L2 cache (4 MB on the development CPU): over all frames at once the
# copies went through main memory: 1.6x slower at layer 1, 3x at the stem
# (benchmarks/RESULTS.md).
KERNEL_GRAD_GROUP_BYTES = 3 << 20
# Below this many input channels a kernel row's kw taps share one product (the
# stem's C = 3 gives products too thin to run at speed); above it each tap has its
# own, which copies less.
KERNEL_GRAD_ROW_CHANNELS = 16


def frames_kernel_grad(x, dy, kernel_shape, strides, padding):
  """The kernel gradient of a frame-by-frame 2D convolution
  (`convolutions._frames_conv_2d`) as matrix products, frame group by group.

  dk[i, j] = sum over frames and output pixels of x_padded[s h + i, s w + j]^T dy[h, w]:
  one [C, N] x [N, O] product per tap (i, j), or, for few channels, one [kw C, N]
  x [N, O] product per kernel row i with the kw shifted inputs joined along
  channels; N = the group's frames x H' x W'. XLA's CPU backend runs these at
  matrix-multiply speed; the convolution it emits for the same gradient (one
  that contracts over all frames) ran 3-4x slower, the 3D form's about 2x
  (benchmarks/RESULTS.md).

  A loop takes the frames in groups (`KERNEL_GRAD_GROUP_BYTES`). Where the batch
  is split over devices, each step takes one group from every device's share
  and keeps the devices' sums apart until the end, so that the loop holds no
  collective: one all-reduce follows it.
  """
  kh, kw, c, o = kernel_shape[1:]
  (sh, sw), ((ph0, ph1), (pw0, pw1)) = strides, padding
  ho, wo = dy.shape[2:4]
  acc = jnp.promote_types(x.dtype, jnp.float32)  # bfloat16 sums in float32
  frames = x.shape[0] * x.shape[1]
  # The batch is split over all devices when it divides evenly (parallel.data_mesh).
  shards = jax.device_count() if x.shape[0] % jax.device_count() == 0 else 1
  frame_bytes = (math.prod(x.shape[2:]) + math.prod(dy.shape[2:])) * x.dtype.itemsize
  group = max([g for g in range(1, frames // shards + 1) if (frames // shards) % g == 0
               and g * frame_bytes <= KERNEL_GRAD_GROUP_BYTES] or [1])
  steps = frames // shards // group
  xs = x.reshape((shards, steps, group) + x.shape[2:])
  dys = dy.reshape((shards, steps, group) + dy.shape[2:])

  def taps(x, i, js):
    """Padded frames shifted by (i, j) for j in js, joined along channels: [S, N, len(js) C]."""
    return jnp.concatenate(
        [x[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] for j in js],
        axis=-1).reshape(shards, -1, len(js) * c)

  def add_group(step, dk):
    x = lax.dynamic_index_in_dim(xs, step, 1, keepdims=False)
    dy = lax.dynamic_index_in_dim(dys, step, 1, keepdims=False).reshape(shards, -1, o)
    x = jnp.pad(x, ((0, 0), (0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
    if c < KERNEL_GRAD_ROW_CHANNELS:
      lhs = [taps(x, i, range(kw)) for i in range(kh)]
    else:
      lhs = [taps(x, i, [j]) for i in range(kh) for j in range(kw)]
    return dk + jnp.stack([lax.dot_general(a, dy, (((1,), (1,)), ((0,), (0,))),
                                           preferred_element_type=acc) for a in lhs], axis=1)

  # [shards, products, channels they contract, O]
  products = (kh, kw * c) if c < KERNEL_GRAD_ROW_CHANNELS else (kh * kw, c)
  dk = jnp.zeros((shards,) + products + (o,), acc)
  # One group (small frames): no loop, which also compiles faster.
  dk = add_group(0, dk) if steps == 1 else lax.fori_loop(0, steps, add_group, dk)
  return jnp.sum(dk, 0).reshape(kernel_shape).astype(x.dtype)


def with_kernel_grad(form, kernel_grad):
  """`form(x, kernel, static)` whose kernel gradient is `kernel_grad(x, dy, kernel.shape, *static)`.

  `form(x, kernel, *static)` is a convolution in a form XLA's CPU backend runs
  fast forward and for the input gradient but derives a slow kernel gradient
  for (benchmarks/RESULTS.md); that one pass is written out by hand. The input
  gradient is the transpose of `form` alone: a vjp would trace the forward pass
  again (dead code XLA removes, but the jaxpr `costs.jaxpr_flops` counts
  would hold it). `static` is a tuple of the hashable remaining arguments.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def run(x, kernel, static):
    return form(x, kernel, *static)

  def run_fwd(x, kernel, static):
    return form(x, kernel, *static), (x, kernel)

  def run_bwd(static, residuals, dy):
    x, kernel = residuals
    dx, = jax.linear_transpose(lambda x: form(x, kernel, *static), x)(dy)
    return dx, kernel_grad(x, dy, kernel.shape, *static)

  run.defvjp(run_fwd, run_bwd)
  return run


def _shift_frames(x, s):
  """x[:, t + s] at frame t, zeros where t + s falls outside."""
  t = x.shape[1]
  if s == 0:
    return x
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, s) if s > 0 else (-s, 0)
  return jnp.pad(lax.slice_in_dim(x, max(s, 0), t + min(s, 0), axis=1), pad)


def temporal_kernel_grad(x, dy, kernel_shape, stride):
  """The kernel gradient of `convolutions._temporal_conv_2d` as kt [C, N] x [N, O] products.

  dk[d] = sum over t of x[stride t + d - pad]^T dy[t]. Where the output has the
  input's frames (stride 1, odd kt) the input is read as it lies and dy shifted
  by pad - d frames (dy has the fewer channels in R(2+1)D's temporal
  convolutions); otherwise the strided frames of the padded x are taken.
  """
  kt, c, o = kernel_shape
  pad = kt // 2
  acc = jnp.promote_types(x.dtype, jnp.float32)
  product = lambda a, b: lax.dot_general(a.reshape(-1, c), b.reshape(-1, o),
                                         (((0,), (0,)), ((), ())), preferred_element_type=acc)
  if stride == 1 and dy.shape[1] == x.shape[1]:
    dk = [product(x, _shift_frames(dy, pad - d)) for d in range(kt)]
  else:
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0), (0, 0)))
    out_t = dy.shape[1]
    dk = [product(lax.slice_in_dim(xp, d, d + stride * (out_t - 1) + 1, stride, 1), dy)
          for d in range(kt)]
  return jnp.stack(dk).astype(x.dtype)
