"""3D ResNet encoders: torchvision's video ResNets and Hara's 3D-ResNets, in Flax.

Input is channels-last video [B, T, H, W, 3]; every encoder returns the pooled
feature [B, D] and the last feature map [B, T', H', W', D] (SPEC section 2).

Submodule names map one-to-one onto the PyTorch state-dict names: a PyTorch key
`layer1.0.conv1.0.0.weight` lives at `params/layer1_0/conv1_0_0/kernel` (a digit in
a PyTorch path joins the name before it with "_"). `cvc_jax.convert` relies on that.
Kernels are in (t, h, w) order.

Three speed options change how the encoders run, never their parameters:
`conv_impl` (the form of the convolutions, `CONV_IMPLS`), `stem_impl` (the form of
the first, `STEM_IMPLS`) and `remat` (what the backward pass recomputes,
`REMAT_POLICIES`).
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

# torchvision and Hara initialise convolutions with kaiming_normal(fan_out, relu).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm(x, scale, bias, epsilon):
  """(y, mean, var) of training-mode BatchNorm over every axis but the last."""
  return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
  # Statistics in at least float32, variance as E[x^2] - E[x]^2 clipped at 0:
  # what flax's BatchNorm computes (use_fast_variance, force_float32_reductions).
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, axes)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(xf), axes) - jnp.square(mean))
  inv = lax.rsqrt(var + epsilon)
  y = (xf - mean) * (inv * scale) + bias
  return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(epsilon, residuals, cotangents):
  del epsilon  # inside `inv`
  x, mean, inv, scale = residuals
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  dy = dy.astype(mean.dtype)
  centred = x.astype(mean.dtype) - mean
  xhat = centred * inv
  dbias = jnp.sum(dy, axes)
  dscale = jnp.sum(dy * xhat, axes)
  # The textbook BatchNorm gradient, plus the (usually zero) cotangents of the
  # returned statistics: d mean / dx = 1 / n, d var / dx = 2 (x - mean) / n.
  dx = (scale * inv) * (dy - (dbias + xhat * dscale) / n) + (dmean + 2 * dvar * centred) / n
  return dx.astype(x.dtype), dscale, dbias


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
  """BatchNorm over every axis but the last, as PyTorch's (eps 1e-5, momentum 0.1).

  The variables, statistics and outputs of `nn.BatchNorm` (tests/test_benchmark.py
  compares them), with a hand-written backward pass in training mode: the
  gradient XLA derives from flax's forward pass reads and writes the
  activations more often (BatchNorm + ReLU forward and backward over R(2+1)D's
  largest activation: 0.41 s that way, 0.35 s with this one, 2-core CPU). Under
  jit on global arrays the batch statistics are global-batch statistics across
  all devices, no axis_name. Like flax's, the running variance averages the
  biased batch variance where PyTorch's averages the unbiased one: a factor
  n / (n - 1) for n values per channel: at layer 4 of a 16x112x112 encoder, 98
  values per clip, 0.003 % for pretraining's 64 videos of 6 clips.
  """
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
    if self.use_running_average:
      y = (x - ra_mean.value) * (lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
    else:
      y, mean, var = _batch_norm(x, scale, bias, self.epsilon)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype or x.dtype)


# Blocks per stage for the named depths (Hara's table; torchvision's 18 is the same).
DEPTH_TO_BLOCKS = {
    10: (1, 1, 1, 1),
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


# How convolutions run. '3d': all as 3D convolutions. '3d_pad8': as '3d', each
# one's input and output channels zero-padded to a multiple of 8 around the call
# (`PaddedConv`): cuDNN's tensor-core kernels want such widths and otherwise pad
# them themselves, which took 10.8% of the bf16 step's GPU time on an H200 for
# R(2+1)D's widths 3, 45, 230, 460 and 921 (benchmarks/RESULTS.md); whether
# padding in XLA, where it can join the neighbouring fusions, is faster is for
# `benchmarks/gpu_run.sh` stage 8 to measure. '2d1d': those with a
# (1, k, k) or (1, 1, 1) kernel as 2D convolutions of single frames (time joins
# the batch), those with a (k, 1, 1) kernel as (k, 1) 2D convolutions over time
# and pixels ([B, T, H*W, C]); full 3D kernels stay 3D; their kernel gradients
# are matrix products over groups of frames, which XLA's CPU backend runs
# several times faster than the convolutions it derives. '2d': the same 2D
# convolutions with the gradients XLA derives, which on a GPU are cuDNN's 2D
# kernels, its most used. Compiled for an H100 (`benchmarks/compile_for.py`)
# all 110 convolutions of configs/ucf101.py's step become 2D channels-last
# cuDNN calls with no transposes, and XLA's own kernels move 121.6 GB per step
# at 16 videos against 113.8 with '3d' (where a block's output meets the next
# block's 2D view, the ReLU's gradient keeps a kernel of its own). So '2d' pays
# if cuDNN runs 2D convolutions about 3 ms faster than 3D ones with a kernel
# depth of 1: `benchmarks/gpu_run.sh` stage 6 times it.
# 'auto': the form measured fastest on the backend (benchmarks/RESULTS.md):
# '2d1d' on CPUs, whose XLA backend runs 3D convolutions and their gradients
# far slower than 2D ones; '3d' elsewhere (cuDNN and the TPU compiler take 3D
# as it is).
CONV_IMPLS = ("3d", "3d_pad8", "2d1d", "2d", "auto")

# How the stem's first convolution (7x7, stride 2 in space, over the 3 RGB
# channels) runs. 'conv': as every other one (`conv_impl`). 'space_to_depth':
# each 2x2 block of input pixels becomes one pixel of 12 channels and the kernel
# a 4x4 one over them with spatial stride 1 (`space_to_depth`): the same function
# (the 8x8 taps that 7x7 does not fill are zeros, 31 % more multiply-adds) in a
# form with 4x the channels. cuDNN pads 3 input channels to 8 for its tensor
# cores: on an H100 in bfloat16 the space-to-depth form ran this convolution in
# 2.47 ms instead of 4.40 forward and 2.67 instead of 4.14 for the kernel
# gradient, and the train step of configs/ucf101.py at 16 videos in 127.3 ms
# instead of 132.9; on the development CPU, whose convolutions are the 2d1d
# form, it was 2.7x slower forward (benchmarks/RESULTS.md). 'auto' picks it
# where it was measured faster: 16-bit compute on an NVIDIA GPU (TPUs and
# float32 on GPUs are unmeasured and keep 'conv').
STEM_IMPLS = ("conv", "space_to_depth", "auto")

# What a residual block keeps for the backward pass (`remat`). 'none': every
# activation (fastest). 'blocks': only each block's input, all else recomputed
# (least memory, about one more forward pass). 'dots': convolution and matmul
# outputs, BatchNorm and ReLU recomputed (a middle way).
REMAT_POLICIES = {"none": None, "blocks": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_saveable}


# The 'auto' forms below are decided for a device: by default the first of
# `jax.devices()`, or one given, such as a device of a GPU or TPU topology that
# `benchmarks/compile_for.py` compiles for on a machine without that device.


def resolve_conv_impl(conv_impl: str, device=None) -> str:
  """`conv_impl` with 'auto' decided for `device`: one of `CONV_IMPLS` less 'auto'."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.")
  if conv_impl == "auto":
    return "2d1d" if (device or jax.devices()[0]).platform == "cpu" else "3d"
  return conv_impl


def nvidia_16bit(dtype, device=None) -> bool:
  """Whether `device` is an NVIDIA GPU and `dtype` 16-bit: where cuDNN runs
  convolutions on the tensor cores, channels-last."""
  device = device or jax.devices()[0]
  return (device.platform == "gpu" and device.device_kind.startswith("NVIDIA")
          and jnp.dtype(dtype).itemsize == 2)


def resolve_stem_impl(stem_impl: str, dtype=jnp.float32,
                      strides: Sequence[int] = (1, 2, 2), device=None) -> str:
  """`stem_impl` with 'auto' decided for `device`, the compute `dtype` and the
  stem's `strides`: 'space_to_depth' or 'conv' (`STEM_IMPLS`)."""
  if stem_impl not in STEM_IMPLS:
    raise ValueError(f"stem_impl must be one of {STEM_IMPLS}, got {stem_impl!r}.")
  if stem_impl == "auto":
    return ("space_to_depth" if nvidia_16bit(dtype, device)
            and tuple(strides[1:]) == (2, 2) else "conv")
  return stem_impl


def _conv3d(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _frames_conv_2d(x, kernel, strides, padding):
  """x [B, T, H, W, C] and kernel [1, kh, kw, C, O] as a 2D convolution of B*T frames."""
  b, t = x.shape[:2]
  y = lax.conv_general_dilated(x.reshape((b * t,) + x.shape[2:]), kernel[0], strides,
                               padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.reshape((b, t) + y.shape[1:])


# `_frames_kernel_grad` works through the frames in groups of at most this many
# bytes of input and output gradient, so that the shifted copies of a group stay
# in a core's L2 cache (4 MB on the development CPU): over all frames at once the
# copies went through main memory: 1.6x slower at layer 1, 3x at the stem
# (benchmarks/RESULTS.md).
KERNEL_GRAD_GROUP_BYTES = 3 << 20
# Below this many input channels a kernel row's kw taps share one product (the
# stem's C = 3 gives products too thin to run at speed); above it each tap has its
# own, which copies less.
KERNEL_GRAD_ROW_CHANNELS = 16


def _frames_kernel_grad(x, dy, kernel_shape, strides, padding):
  """The kernel gradient of `_frames_conv_2d` as matrix products, frame group by group.

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
  # The batch is split over all devices when it divides evenly (cvc_jax.pretrain).
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


def _with_kernel_grad(conv, kernel_grad):
  """`conv(x, kernel, static)` whose kernel gradient is `kernel_grad(x, dy, kernel.shape, *static)`.

  `conv(x, kernel, *static)` is a convolution in a form XLA's CPU backend runs
  fast forward and for the input gradient but derives a slow kernel gradient
  for (benchmarks/RESULTS.md); that one pass is written out by hand. The input
  gradient is the transpose of `conv` alone: a vjp would trace the forward pass
  again (dead code XLA removes, but the jaxpr `benchmark.jaxpr_flops` counts
  would hold it). `static` is a tuple of the hashable remaining arguments.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def run(x, kernel, static):
    return conv(x, kernel, *static)

  def run_fwd(x, kernel, static):
    return conv(x, kernel, *static), (x, kernel)

  def run_bwd(static, residuals, dy):
    x, kernel = residuals
    dx, = jax.linear_transpose(lambda x: conv(x, kernel, *static), x)(dy)
    return dx, kernel_grad(x, dy, kernel.shape, *static)

  run.defvjp(run_fwd, run_bwd)
  return run


# On XLA's CPU backend the 2D form runs the forward pass and the input gradient
# 2-3x faster than the 3D form, but the kernel gradient XLA derives for it 4-5x
# slower. static: ((sh, sw), ((ph, ph), (pw, pw))).
_frames_conv = _with_kernel_grad(_frames_conv_2d, _frames_kernel_grad)


def _frames_conv_form(x, kernel, static, xla_gradients):
  """The frame-by-frame 2D convolution with the kernel gradient XLA derives
  (conv_impl '2d') or the hand-written one (`_frames_conv`, '2d1d')."""
  if xla_gradients:
    return _frames_conv_2d(x, kernel, *static)
  return _frames_conv(x, kernel, static)


def _temporal_conv_2d(x, kernel, stride):
  """x [B, T, H, W, C] and kernel [kt, C, O] as a (kt, 1) 2D convolution over [B, T, H*W, C]."""
  b, t, h, w, c = x.shape
  pad = kernel.shape[0] // 2
  y = lax.conv_general_dilated(x.reshape(b, t, h * w, c), kernel[:, None], (stride, 1),
                               [(pad, pad), (0, 0)], dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.reshape((b, y.shape[1], h, w, y.shape[-1]))


def _shift_frames(x, s):
  """x[:, t + s] at frame t, zeros where t + s falls outside."""
  t = x.shape[1]
  if s == 0:
    return x
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, s) if s > 0 else (-s, 0)
  return jnp.pad(lax.slice_in_dim(x, max(s, 0), t + min(s, 0), axis=1), pad)


def _temporal_kernel_grad(x, dy, kernel_shape, stride):
  """The kernel gradient of `_temporal_conv_2d` as kt [C, N] x [N, O] products.

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


# The (kt, 1) convolution over [B, T, H*W, C] needs no transpose: at R(2+1)D's
# layer-1 shapes (12 x 16 x 64 x 64 x 144 -> 64) it ran with the BatchNorm and
# ReLU after it 0.32 s forward and 1.15 s forward + backward on the development
# CPU, against 0.69 s and 2.1 s as 1D convolutions of single pixels, whose two
# transposes also laid out the BatchNorm's input so that XLA reduced it with a
# slow reduce-window (benchmarks/RESULTS.md). With XLA's own kernel gradient for
# the 2D form the same block took 6.6 s forward + backward. static: (stride,).
_temporal_conv = _with_kernel_grad(_temporal_conv_2d, _temporal_kernel_grad)


class FactorisedConv(nn.Module):
  """A bias-free (1, kh, kw), (1, 1, 1) or (kt, 1, 1) convolution run as a 2D one.

  Its one parameter is `nn.Conv`'s: 'kernel' [kt, kh, kw, in, out], initialised
  the same way, so checkpoints and `cvc_jax.convert` cannot tell the two apart.
  Padding is PyTorch's symmetric k // 2.

  Attributes:
    xla_gradients: False (conv_impl '2d1d'): the forms written for XLA's CPU
      backend, kernel gradients as matrix products over groups of frames and
      temporal convolutions of 2 output frames as products; True ('2d'): plain
      2D convolutions whose gradients XLA derives, as cuDNN runs them.
  """
  features: int
  kernel_size: tuple[int, int, int]
  strides: tuple[int, int, int]
  dtype: Any = jnp.float32
  xla_gradients: bool = False

  @nn.compact
  def __call__(self, x):
    (kt, kh, kw), (st, sh, sw) = self.kernel_size, self.strides
    kernel = self.param("kernel", conv_init,
                        (kt, kh, kw, x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if kt == 1:  # frame by frame: [B*T, H, W, C]
      return _frames_conv_form(x[:, ::st], kernel,
                               ((sh, sw), ((kh // 2, kh // 2), (kw // 2, kw // 2))),
                               self.xla_gradients)
    if kh != 1 or kw != 1:
      raise ValueError(f"FactorisedConv takes (1, k, k) or (k, 1, 1) kernels, got "
                       f"{self.kernel_size}.")
    x = x[:, :, ::sh, ::sw]
    if self.xla_gradients:
      return _temporal_conv_2d(x, kernel[:, 0, 0], st)
    pad = kt // 2
    out_t = (x.shape[1] + 2 * pad - kt) // st + 1
    if out_t <= 2:
      # A sum of kt matrix products over shifted frames. A convolution over time
      # is pathological on XLA's CPU backend for such short outputs: R(2+1)D-18's
      # last temporal convolution (2 frames, 921 channels) took 2.9 s forward
      # as a 1D one against 0.02 s as products (benchmarks/RESULTS.md).
      xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0), (0, 0)))
      return sum(lax.dot_general(lax.slice_in_dim(xp, d, d + st * (out_t - 1) + 1, st, 1),
                                 kernel[d, 0, 0], (((4,), (0,)), ((), ())))
                 for d in range(kt))
    return _temporal_conv(x, kernel[:, 0, 0], (st,))


def _padded_conv3d(x, kernel, strides, padding, multiple):
  """`_conv3d` with the input's and output's channels zero-padded to `multiple`."""
  features = kernel.shape[-1]
  extra_in, extra_out = -x.shape[-1] % multiple, -features % multiple
  x = jnp.pad(x, [(0, 0)] * 4 + [(0, extra_in)])
  kernel = jnp.pad(kernel, [(0, 0)] * 3 + [(0, extra_in), (0, extra_out)])
  return _conv3d(x, kernel, strides, padding)[..., :features]


class PaddedConv(nn.Module):
  """A bias-free 3D convolution run with its channels zero-padded to a multiple.

  The padded input channels meet zero kernel rows and the padded output channels
  are cut off, so it computes `nn.Conv`'s function, with `nn.Conv`'s one
  parameter ('kernel' [kt, kh, kw, in, out], initialised the same way); only the
  shapes the backend's convolution sees change. Padding is PyTorch's symmetric k // 2.
  """
  features: int
  kernel_size: tuple[int, int, int]
  strides: tuple[int, int, int]
  multiple: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", conv_init,
                        tuple(self.kernel_size) + (channels, self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return _padded_conv3d(x, kernel, self.strides,
                          [(k // 2, k // 2) for k in self.kernel_size], self.multiple)


def space_to_depth(x, kernel):
  """The input and kernel of a stride-1 'valid' convolution in space that computes
  the convolution of x [B, T, H, W, C] with kernel [kt, kh, kw, C, O] at spatial
  stride 2 and PyTorch's padding k // 2.

  Pixel (i, j) of the new input holds the padded input's pixels (2i + a, 2j + b)
  for a, b in {0, 1}, as channels (a, b, c); tap (i, j) of the new kernel holds the
  taps (2i + a, 2j + b), zero past the kernel's end. Output pixel o read padded
  pixels 2o + k for k < kh, i.e. 2(o + i) + a with k = 2i + a: the new
  convolution's tap i, channel group a. The time axis is left as it is.
  """
  b, t, h, w, c = x.shape
  kt, kh, kw, _, o = kernel.shape
  ah, aw = -(-kh // 2), -(-kw // 2)  # taps of the new kernel
  oh, ow = (h + 2 * (kh // 2) - kh) // 2 + 1, (w + 2 * (kw // 2) - kw) // 2 + 1
  # The padded input that the new kernel's taps cover for every output pixel.
  lh, lw = 2 * (oh + ah - 1), 2 * (ow + aw - 1)
  x = jnp.pad(x, ((0, 0), (0, 0), (kh // 2, lh - h - kh // 2), (kw // 2, lw - w - kw // 2),
                  (0, 0)))
  x = x.reshape(b, t, lh // 2, 2, lw // 2, 2, c).transpose(0, 1, 2, 4, 3, 5, 6)
  kernel = jnp.pad(kernel, ((0, 0), (0, 2 * ah - kh), (0, 2 * aw - kw), (0, 0), (0, 0)))
  kernel = kernel.reshape(kt, ah, 2, aw, 2, c, o).transpose(0, 1, 3, 2, 4, 5, 6)
  return (x.reshape(b, t, lh // 2, lw // 2, 4 * c), kernel.reshape(kt, ah, aw, 4 * c, o))


class SpaceToDepthConv(nn.Module):
  """A bias-free convolution with spatial stride 2 run on the space-to-depth input
  (`space_to_depth`, `STEM_IMPLS`), in the form `conv_impl` gives the others.

  Its one parameter is `nn.Conv`'s 'kernel' [kt, kh, kw, in, out], initialised
  the same way; only what the backend is asked to run changes. Padding is
  PyTorch's symmetric k // 2.
  """
  features: int
  kernel_size: tuple[int, int, int]
  strides: tuple[int, int, int]
  conv_impl: str = "3d"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    (kt, kh, kw), (st, sh, sw) = self.kernel_size, self.strides
    if (sh, sw) != (2, 2):
      raise ValueError(f"A space-to-depth convolution has spatial stride 2, got "
                       f"strides {self.strides}; use stem_impl='conv'.")
    kernel = self.param("kernel", conv_init,
                        (kt, kh, kw, x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    x, kernel = space_to_depth(x, kernel)
    impl = resolve_conv_impl(self.conv_impl)
    if impl in ("2d1d", "2d") and kt == 1:
      return _frames_conv_form(x[:, ::st], kernel, ((1, 1), ((0, 0), (0, 0))),
                               impl == "2d")
    padding = [(kt // 2, kt // 2), (0, 0), (0, 0)]
    if impl == "3d_pad8":
      return _padded_conv3d(x, kernel, (st, 1, 1), padding, 8)
    return _conv3d(x, kernel, (st, 1, 1), padding)


def _conv(features, kernel, strides, name, dtype, conv_impl="3d"):
  """A bias-free 3D convolution with PyTorch's symmetric padding k // 2."""
  kt, kh, kw = kernel
  impl = resolve_conv_impl(conv_impl)
  if impl in ("2d1d", "2d") and (kt == 1 or kh == kw == 1):
    return FactorisedConv(features, tuple(kernel), tuple(strides), dtype,
                          xla_gradients=impl == "2d", name=name)
  if impl == "3d_pad8":
    return PaddedConv(features, tuple(kernel), tuple(strides), 8, dtype, name=name)
  return nn.Conv(
      features, kernel, strides=strides, padding=[(k // 2, k // 2) for k in kernel],
      use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


def stem_conv(features, kernel, strides, name, dtype, conv_impl, stem_impl):
  """The stem's first convolution in the form `stem_impl` names (`STEM_IMPLS`)."""
  if resolve_stem_impl(stem_impl, dtype, strides) == "space_to_depth":
    return SpaceToDepthConv(features, tuple(kernel), tuple(strides), conv_impl, dtype,
                            name=name)
  return _conv(features, kernel, strides, name, dtype, conv_impl)


def _run_block(block, x, *, train, remat):
  """`block(x, train=train)`, its activations recomputed in the backward pass as
  `remat` says (`REMAT_POLICIES`)."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}.")
  if remat == "none":
    return block(x, train=train)
  # The function form keeps `train` a Python bool and the block's name unchanged.
  return nn.remat(lambda mdl, y: mdl(y, train=train), policy=REMAT_POLICIES[remat])(
      block, x)


def r2plus1d_midplanes(in_planes: int, out_planes: int) -> int:
  """Mid channels of a (2+1)D conv so it has the parameters of a 3x3x3 one."""
  return (in_planes * out_planes * 27) // (in_planes * 9 + 3 * out_planes)


def spatiotemporal_conv(x, features, kind, stride, prefix, *, mid_features, dtype, train,
                        conv_impl="3d"):
  """torchvision's conv builders: '3d' (3x3x3), '2d' (1x3x3) or '2plus1d'.

  Called inside a compact module so the convolutions are that module's children;
  `prefix` is their PyTorch name ("conv1_0"). The (2+1)D builder is a Sequential,
  so its parts are prefix_0 (1x3x3), prefix_1 (BatchNorm) and prefix_3 (3x1x1).
  """
  s = stride
  conv = functools.partial(_conv, dtype=dtype, conv_impl=conv_impl)
  if kind == "3d":
    return conv(features, (3, 3, 3), (s, s, s), prefix)(x)
  if kind == "2d":
    return conv(features, (1, 3, 3), (1, s, s), prefix)(x)
  x = conv(mid_features, (1, 3, 3), (1, s, s), f"{prefix}_0")(x)
  norm = BatchNorm(use_running_average=not train, dtype=dtype, name=f"{prefix}_1")
  if resolve_conv_impl(conv_impl) == "2d":
    # The same function, with BatchNorm and ReLU in the [B*T, H, W, C] view the 2D
    # convolution wrote: in the [B, T, H, W, C] view XLA kept the ReLU's gradient
    # out of the BatchNorm's backward kernels (the step compiled for an H100
    # moved 144.0 GB per step through XLA's kernels that way, 121.6 GB this
    # way; benchmarks/RESULTS.md).
    b, t = x.shape[:2]
    x = nn.relu(norm(x.reshape((b * t,) + x.shape[2:]))).reshape(x.shape)
  else:
    x = nn.relu(norm(x))
  return conv(features, (3, 1, 1), (s, 1, 1), f"{prefix}_3")(x)


def _downsample(x, features, strides, dtype, train, names, conv_impl="3d"):
  """The 1x1x1 convolution + BatchNorm shortcut (Hara's type B)."""
  x = _conv(features, (1, 1, 1), strides, names[0], dtype, conv_impl)(x)
  return BatchNorm(use_running_average=not train, dtype=dtype, name=names[1])(x)


class TorchvisionBlock(nn.Module):
  """torchvision's BasicBlock / Bottleneck with a pluggable conv builder."""
  planes: int
  conv_kind: str
  stride: int = 1
  bottleneck: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "3d"

  @nn.compact
  def __call__(self, x, *, train: bool):
    bn = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    conv1x1 = functools.partial(_conv, dtype=self.dtype, conv_impl=self.conv_impl)
    in_planes = x.shape[-1]
    out_planes = self.planes * (4 if self.bottleneck else 1)
    # torchvision sizes every (2+1)D conv of a block from the block's input width.
    conv = functools.partial(
        spatiotemporal_conv, kind=self.conv_kind, dtype=self.dtype, train=train,
        mid_features=r2plus1d_midplanes(in_planes, self.planes), conv_impl=self.conv_impl)
    if self.bottleneck:
      y = nn.relu(bn(name="conv1_1")(conv1x1(self.planes, (1, 1, 1), (1, 1, 1), "conv1_0")(x)))
      y = conv(y, self.planes, stride=self.stride, prefix="conv2_0")
      y = nn.relu(bn(name="conv2_1")(y))
      y = conv1x1(out_planes, (1, 1, 1), (1, 1, 1), "conv3_0")(y)
      y = bn(name="conv3_1")(y)
    else:
      y = conv(x, self.planes, stride=self.stride, prefix="conv1_0")
      y = nn.relu(bn(name="conv1_1")(y))
      y = conv(y, self.planes, stride=1, prefix="conv2_0")
      y = bn(name="conv2_1")(y)
    if self.stride != 1 or in_planes != out_planes:
      # The no-temporal builder (MC3's later stages) downsamples space only.
      s = self.stride
      strides = (1, s, s) if self.conv_kind == "2d" else (s, s, s)
      x = _downsample(x, out_planes, strides, self.dtype, train,
                      ("downsample_0", "downsample_1"), self.conv_impl)
    return nn.relu(y + x)


class VideoResNet(nn.Module):
  """torchvision's `VideoResNet`: R(2+1)D, R3D and MC3 with any blocks per stage.

  Attributes:
    arch: 'r2plus1d', 'r3d' or 'mc3'.
    blocks: blocks per stage; torchvision's 18-layer nets use (2, 2, 2, 2), the
      authors' pretraining code builds R(2+1)D with (1, 1, 1, 1).
    width: channels of the first stage (64); stages use width x (1, 2, 4, 8).
    bottleneck: Bottleneck blocks (x4 expansion) instead of BasicBlocks.
    dtype: compute dtype; parameters stay float32.
    conv_impl: the form of the convolutions, one of `CONV_IMPLS`.
    stem_impl: the form of the first convolution, one of `STEM_IMPLS`.
    remat: what the backward pass recomputes in each block, a key of
      `REMAT_POLICIES`.
  """
  arch: str = "r2plus1d"
  blocks: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  bottleneck: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  stem_impl: str = "auto"
  remat: str = "none"

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.arch not in ("r2plus1d", "r3d", "mc3"):
      raise ValueError(f"Unknown torchvision video ResNet {self.arch!r}; "
                       "use 'r2plus1d', 'r3d' or 'mc3'.")
    if len(self.blocks) != 4:
      raise ValueError(f"model.encoder.blocks gives the blocks of the 4 stages, e.g. "
                       f"(2, 2, 2, 2); got {tuple(self.blocks)}.")
    bn = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    conv = functools.partial(_conv, dtype=self.dtype, conv_impl=self.conv_impl)
    stem = functools.partial(stem_conv, name="stem_0", dtype=self.dtype,
                             conv_impl=self.conv_impl, stem_impl=self.stem_impl)
    x = x.astype(self.dtype)
    if self.arch == "r2plus1d":
      # torchvision hard-codes 45 mid channels at width 64; scale it for small nets.
      mid = 45 * self.width // 64
      x = nn.relu(bn(name="stem_1")(stem(mid, (1, 7, 7), (1, 2, 2))(x)))
      x = nn.relu(bn(name="stem_4")(conv(self.width, (3, 1, 1), (1, 1, 1), "stem_3")(x)))
    else:
      x = nn.relu(bn(name="stem_1")(stem(self.width, (3, 7, 7), (1, 2, 2))(x)))
    for i, num_blocks in enumerate(self.blocks):
      kind = {"r2plus1d": "2plus1d", "r3d": "3d", "mc3": "3d" if i == 0 else "2d"}[self.arch]
      for j in range(num_blocks):
        block = TorchvisionBlock(
            self.width * 2**i, kind, stride=2 if (i > 0 and j == 0) else 1,
            bottleneck=self.bottleneck, dtype=self.dtype, conv_impl=self.conv_impl,
            name=f"layer{i + 1}_{j}")
        x = _run_block(block, x, train=train, remat=self.remat)
    return jnp.mean(x, axis=(1, 2, 3)), x


class HaraBlock(nn.Module):
  """Hara's BasicBlock / Bottleneck (3x3x3 convolutions, names conv1, bn1, ...)."""
  planes: int
  stride: int = 1
  bottleneck: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "3d"

  @nn.compact
  def __call__(self, x, *, train: bool):
    bn = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    conv = functools.partial(_conv, dtype=self.dtype, conv_impl=self.conv_impl)
    s = self.stride
    out_planes = self.planes * (4 if self.bottleneck else 1)
    if self.bottleneck:
      y = nn.relu(bn(name="bn1")(conv(self.planes, (1, 1, 1), (1, 1, 1), "conv1")(x)))
      y = nn.relu(bn(name="bn2")(conv(self.planes, (3, 3, 3), (s, s, s), "conv2")(y)))
      y = bn(name="bn3")(conv(out_planes, (1, 1, 1), (1, 1, 1), "conv3")(y))
    else:
      y = nn.relu(bn(name="bn1")(conv(self.planes, (3, 3, 3), (s, s, s), "conv1")(x)))
      y = bn(name="bn2")(conv(self.planes, (3, 3, 3), (1, 1, 1), "conv2")(y))
    if s != 1 or x.shape[-1] != out_planes:
      x = _downsample(x, out_planes, (s, s, s), self.dtype, train,
                      ("downsample_0", "downsample_1"), self.conv_impl)
    return nn.relu(y + x)


class HaraResNet(nn.Module):
  """Hara et al.'s 3D-ResNets, as in the authors' `r3d.py`.

  Attributes:
    depth: 10, 18, 34 (BasicBlocks) or 50, 101, 152 (Bottlenecks).
    width: channels of the first stage (64).
    conv1_t_size, conv1_t_stride: temporal kernel and stride of the 7x7 stem.
    no_max_pool: skip the max-pool after the stem.
    pool_t: temporal size of that max-pool; the authors' `r3d.py` pools over space
      only (1), Hara's original pools 3x3x3 with stride 2 (3).
    dtype: compute dtype; parameters stay float32.
    conv_impl: the form of the convolutions, one of `CONV_IMPLS` (only the 1x1x1
      ones have another form: Hara's nets are 3x3x3 throughout).
    stem_impl: the form of the first convolution, one of `STEM_IMPLS`.
    remat: what the backward pass recomputes in each block (`REMAT_POLICIES`).
  """
  depth: int = 18
  width: int = 64
  conv1_t_size: int = 7
  conv1_t_stride: int = 1
  no_max_pool: bool = False
  pool_t: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  stem_impl: str = "auto"
  remat: str = "none"

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.depth not in DEPTH_TO_BLOCKS:
      raise ValueError(f"Hara ResNet depth must be one of {sorted(DEPTH_TO_BLOCKS)}, "
                       f"got {self.depth}.")
    x = x.astype(self.dtype)
    x = stem_conv(self.width, (self.conv1_t_size, 7, 7), (self.conv1_t_stride, 2, 2),
                   "conv1", self.dtype, self.conv_impl, self.stem_impl)(x)
    x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn1")(x))
    if not self.no_max_pool:
      t = self.pool_t
      x = nn.max_pool(x, (t, 3, 3), strides=(1 if t == 1 else 2, 2, 2),
                      padding=((t // 2, t // 2), (1, 1), (1, 1)))
    for i, num_blocks in enumerate(DEPTH_TO_BLOCKS[self.depth]):
      for j in range(num_blocks):
        block = HaraBlock(self.width * 2**i, stride=2 if (i > 0 and j == 0) else 1,
                          bottleneck=self.depth >= 50, dtype=self.dtype,
                          conv_impl=self.conv_impl, name=f"layer{i + 1}_{j}")
        x = _run_block(block, x, train=train, remat=self.remat)
    return jnp.mean(x, axis=(1, 2, 3)), x


def feature_dim(cfg) -> int:
  """Channels D of an encoder's pooled feature, from its config."""
  bottleneck = cfg.get("bottleneck", False) or (
      cfg["arch"] == "hara" and cfg.get("depth", 18) >= 50)
  return cfg["width"] * 8 * (4 if bottleneck else 1)


def build_encoder(cfg, dtype=jnp.float32, name=None, remat: str = "none") -> nn.Module:
  """The encoder described by `config.model.encoder`.

  Args:
    cfg: a mapping with `arch` ('r2plus1d', 'r3d', 'mc3' or 'hara'), `width`, and
      `blocks` (torchvision layout) or `depth` (Hara layout), plus the optional keys
      `bottleneck`, `conv_impl` (default 'auto'), `stem_impl` (default 'auto')
      and the Hara stem keys of `HaraResNet`.
    dtype: compute dtype.
    name: the Flax submodule name (the authors call it "backbone").
    remat: what the backward pass recomputes (`REMAT_POLICIES`; `config.remat`).
  """
  speed = dict(conv_impl=cfg.get("conv_impl", "auto"),
               stem_impl=cfg.get("stem_impl", "auto"), remat=remat)
  if cfg["arch"] == "hara":
    return HaraResNet(
        depth=cfg["depth"], width=cfg["width"], conv1_t_size=cfg.get("conv1_t_size", 7),
        conv1_t_stride=cfg.get("conv1_t_stride", 1),
        no_max_pool=cfg.get("no_max_pool", False), pool_t=cfg.get("pool_t", 1),
        dtype=dtype, name=name, **speed)
  return VideoResNet(arch=cfg["arch"], blocks=tuple(cfg["blocks"]), width=cfg["width"],
                     bottleneck=cfg.get("bottleneck", False), dtype=dtype, name=name,
                     **speed)
