"""3D ResNet encoders: torchvision's video ResNets and Hara's 3D-ResNets, in Flax.

Input is channels-last video [B, T, H, W, 3]; every encoder returns the pooled
feature [B, D] and the last feature map [B, T', H', W', D] (SPEC section 2).

Submodule names map one-to-one onto the PyTorch state-dict names: a PyTorch key
`layer1.0.conv1.0.0.weight` lives at `params/layer1_0/conv1_0_0/kernel` (a digit in
a PyTorch path joins the name before it with "_"). `cvc_jax.convert` relies on that.
Kernels are in (t, h, w) order.

Three speed options change how the encoders run, never their parameters:
`conv_impl` (the form of the convolutions) and `stem_impl` (the form of the
first), both in `cvc_jax.models.convolutions`, and `remat` (what the backward
pass recomputes, `REMAT_POLICIES`).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from cvc_jax.models import convolutions


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

  The variables and outputs of `nn.BatchNorm` (tests/test_speed_options.py
  compares them), with a hand-written backward pass in training mode: the
  gradient XLA derives from flax's forward pass reads and writes the
  activations more often (BatchNorm + ReLU forward and backward over R(2+1)D's
  largest activation: 0.41 s that way, 0.35 s with this one, 2-core CPU). Under
  jit on global arrays the batch statistics are global-batch statistics across
  all devices, no axis_name. The running variance is PyTorch's, not flax's: it
  averages the unbiased batch variance (n / (n - 1) times the biased one that
  normalises, for n values per channel), so running statistics mean what they
  mean in the authors' code and in converted torchvision checkpoints. The
  factor is 1.016 for an MLP sigma's BatchNorm over 64 videos, 1.008 for a
  decoder's over 2 x 64 codes, 1.00003 at layer 4 of a 16x112x112 encoder over
  64 videos of 6 clips.
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
        n = x.size // x.shape[-1]
        unbiased = var * (n / max(n - 1, 1))
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
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


# What a residual block keeps for the backward pass (`remat`). 'none': every
# activation (fastest). 'blocks': only each block's input, all else recomputed
# (least memory, about one more forward pass). 'dots': convolution and matmul
# outputs, BatchNorm and ReLU recomputed (a middle way).
REMAT_POLICIES = {"none": None, "blocks": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_saveable}


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
  conv = functools.partial(convolutions.conv, dtype=dtype, conv_impl=conv_impl)
  if kind == "3d":
    return conv(features, (3, 3, 3), (s, s, s), prefix)(x)
  if kind == "2d":
    return conv(features, (1, 3, 3), (1, s, s), prefix)(x)
  x = conv(mid_features, (1, 3, 3), (1, s, s), f"{prefix}_0")(x)
  norm = BatchNorm(use_running_average=not train, dtype=dtype, name=f"{prefix}_1")
  if convolutions.resolve_conv_impl(conv_impl) == "2d":
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
  x = convolutions.conv(features, (1, 1, 1), strides, names[0], dtype, conv_impl)(x)
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
    conv1x1 = functools.partial(convolutions.conv, dtype=self.dtype,
                                conv_impl=self.conv_impl)
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
    conv_impl: the form of the convolutions, one of `convolutions.CONV_IMPLS`.
    stem_impl: the form of the first convolution, one of `convolutions.STEM_IMPLS`.
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
    conv = functools.partial(convolutions.conv, dtype=self.dtype, conv_impl=self.conv_impl)
    stem = functools.partial(convolutions.stem_conv, name="stem_0", dtype=self.dtype,
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
    conv = functools.partial(convolutions.conv, dtype=self.dtype, conv_impl=self.conv_impl)
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
    conv_impl: the form of the convolutions, one of `convolutions.CONV_IMPLS`
      (only the 1x1x1 ones have another form: Hara's nets are 3x3x3 throughout).
    stem_impl: the form of the first convolution, one of `convolutions.STEM_IMPLS`.
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
    x = convolutions.stem_conv(
        self.width, (self.conv1_t_size, 7, 7), (self.conv1_t_stride, 2, 2), "conv1",
        self.dtype, self.conv_impl, self.stem_impl)(x)
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
