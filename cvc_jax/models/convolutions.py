"""The forms a bias-free convolution of the encoders can run in, all one function.

Each form takes `nn.Conv`'s one parameter ('kernel' [kt, kh, kw, in, out],
initialised as torchvision does) and PyTorch's symmetric padding k // 2, so
checkpoints and `cvc_jax.convert` cannot tell them apart; only what the backend
is asked to run changes. `conv` builds a convolution in the form `conv_impl`
names (`CONV_IMPLS`), `stem_conv` the stem's first one (`STEM_IMPLS`); 'auto'
picks the form measured fastest on the device (benchmarks/RESULTS.md).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from cvc_jax.models import kernel_grads

# torchvision and Hara initialise convolutions with kaiming_normal(fan_out, relu).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


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


# On XLA's CPU backend the 2D form runs the forward pass and the input gradient
# 2-3x faster than the 3D form, but the kernel gradient XLA derives for it 4-5x
# slower. static: ((sh, sw), ((ph, ph), (pw, pw))).
_frames_conv = kernel_grads.with_kernel_grad(_frames_conv_2d,
                                            kernel_grads.frames_kernel_grad)


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


# The (kt, 1) convolution over [B, T, H*W, C] needs no transpose: at R(2+1)D's
# layer-1 shapes (12 x 16 x 64 x 64 x 144 -> 64) it ran with the BatchNorm and
# ReLU after it 0.32 s forward and 1.15 s forward + backward on the development
# CPU, against 0.69 s and 2.1 s as 1D convolutions of single pixels, whose two
# transposes also laid out the BatchNorm's input so that XLA reduced it with a
# slow reduce-window (benchmarks/RESULTS.md). With XLA's own kernel gradient for
# the 2D form the same block took 6.6 s forward + backward. static: (stride,).
_temporal_conv = kernel_grads.with_kernel_grad(_temporal_conv_2d,
                                              kernel_grads.temporal_kernel_grad)


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


def conv(features, kernel, strides, name, dtype, conv_impl="3d"):
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
  return conv(features, kernel, strides, name, dtype, conv_impl)
