"""3D ResNet encoders: torchvision's video ResNets and Hara's 3D-ResNets, in Flax.

Input is channels-last video [B, T, H, W, 3]; every encoder returns the pooled
feature [B, D] and the last feature map [B, T', H', W', D] (SPEC section 2).

Submodule names map one-to-one onto the PyTorch state-dict names: a PyTorch key
`layer1.0.conv1.0.0.weight` lives at `params/layer1_0/conv1_0_0/kernel` (a digit in
a PyTorch path joins the name before it with "_"). `cvc_jax.convert` relies on that.
Kernels are in (t, h, w) order.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# torchvision and Hara initialise convolutions with kaiming_normal(fan_out, relu).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# BatchNorm as in PyTorch (eps 1e-5, momentum 0.1). Under jit on global arrays the
# batch statistics are global-batch statistics across all devices, no axis_name.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

# Blocks per stage for the named depths (Hara's table; torchvision's 18 is the same).
DEPTH_TO_BLOCKS = {
    10: (1, 1, 1, 1),
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


def _conv(features, kernel, strides, name, dtype):
  """A bias-free 3D convolution with PyTorch's symmetric padding k // 2."""
  return nn.Conv(
      features, kernel, strides=strides, padding=[(k // 2, k // 2) for k in kernel],
      use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


def r2plus1d_midplanes(in_planes: int, out_planes: int) -> int:
  """Mid channels of a (2+1)D conv so it has the parameters of a 3x3x3 one."""
  return (in_planes * out_planes * 27) // (in_planes * 9 + 3 * out_planes)


def spatiotemporal_conv(x, features, kind, stride, prefix, *, mid_features, dtype, train):
  """torchvision's conv builders: '3d' (3x3x3), '2d' (1x3x3) or '2plus1d'.

  Called inside a compact module so the convolutions are that module's children;
  `prefix` is their PyTorch name ("conv1_0"). The (2+1)D builder is a Sequential,
  so its parts are prefix_0 (1x3x3), prefix_1 (BatchNorm) and prefix_3 (3x1x1).
  """
  s = stride
  if kind == "3d":
    return _conv(features, (3, 3, 3), (s, s, s), prefix, dtype)(x)
  if kind == "2d":
    return _conv(features, (1, 3, 3), (1, s, s), prefix, dtype)(x)
  x = _conv(mid_features, (1, 3, 3), (1, s, s), f"{prefix}_0", dtype)(x)
  x = BatchNorm(use_running_average=not train, dtype=dtype, name=f"{prefix}_1")(x)
  return _conv(features, (3, 1, 1), (s, 1, 1), f"{prefix}_3", dtype)(nn.relu(x))


def _downsample(x, features, strides, dtype, train, names):
  """The 1x1x1 convolution + BatchNorm shortcut (Hara's type B)."""
  x = _conv(features, (1, 1, 1), strides, names[0], dtype)(x)
  return BatchNorm(use_running_average=not train, dtype=dtype, name=names[1])(x)


class TorchvisionBlock(nn.Module):
  """torchvision's BasicBlock / Bottleneck with a pluggable conv builder."""
  planes: int
  conv_kind: str
  stride: int = 1
  bottleneck: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    bn = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    in_planes = x.shape[-1]
    out_planes = self.planes * (4 if self.bottleneck else 1)
    # torchvision sizes every (2+1)D conv of a block from the block's input width.
    conv = functools.partial(
        spatiotemporal_conv, kind=self.conv_kind, dtype=self.dtype, train=train,
        mid_features=r2plus1d_midplanes(in_planes, self.planes))
    if self.bottleneck:
      y = nn.relu(bn(name="conv1_1")(_conv(self.planes, (1, 1, 1), (1, 1, 1), "conv1_0",
                                           self.dtype)(x)))
      y = conv(y, self.planes, stride=self.stride, prefix="conv2_0")
      y = nn.relu(bn(name="conv2_1")(y))
      y = _conv(out_planes, (1, 1, 1), (1, 1, 1), "conv3_0", self.dtype)(y)
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
                      ("downsample_0", "downsample_1"))
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
  """
  arch: str = "r2plus1d"
  blocks: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  bottleneck: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.arch not in ("r2plus1d", "r3d", "mc3"):
      raise ValueError(f"Unknown torchvision video ResNet {self.arch!r}; "
                       "use 'r2plus1d', 'r3d' or 'mc3'.")
    bn = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    x = x.astype(self.dtype)
    if self.arch == "r2plus1d":
      # torchvision hard-codes 45 mid channels at width 64; scale it for small nets.
      mid = 45 * self.width // 64
      x = nn.relu(bn(name="stem_1")(_conv(mid, (1, 7, 7), (1, 2, 2), "stem_0", self.dtype)(x)))
      x = nn.relu(bn(name="stem_4")(_conv(self.width, (3, 1, 1), (1, 1, 1), "stem_3",
                                          self.dtype)(x)))
    else:
      x = nn.relu(bn(name="stem_1")(_conv(self.width, (3, 7, 7), (1, 2, 2), "stem_0",
                                          self.dtype)(x)))
    for i, num_blocks in enumerate(self.blocks):
      kind = {"r2plus1d": "2plus1d", "r3d": "3d", "mc3": "3d" if i == 0 else "2d"}[self.arch]
      for j in range(num_blocks):
        x = TorchvisionBlock(
            self.width * 2**i, kind, stride=2 if (i > 0 and j == 0) else 1,
            bottleneck=self.bottleneck, dtype=self.dtype, name=f"layer{i + 1}_{j}")(
                x, train=train)
    return jnp.mean(x, axis=(1, 2, 3)), x


class HaraBlock(nn.Module):
  """Hara's BasicBlock / Bottleneck (3x3x3 convolutions, names conv1, bn1, ...)."""
  planes: int
  stride: int = 1
  bottleneck: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    bn = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    s = self.stride
    out_planes = self.planes * (4 if self.bottleneck else 1)
    if self.bottleneck:
      y = nn.relu(bn(name="bn1")(_conv(self.planes, (1, 1, 1), (1, 1, 1), "conv1", self.dtype)(x)))
      y = nn.relu(bn(name="bn2")(_conv(self.planes, (3, 3, 3), (s, s, s), "conv2", self.dtype)(y)))
      y = bn(name="bn3")(_conv(out_planes, (1, 1, 1), (1, 1, 1), "conv3", self.dtype)(y))
    else:
      y = nn.relu(bn(name="bn1")(_conv(self.planes, (3, 3, 3), (s, s, s), "conv1", self.dtype)(x)))
      y = bn(name="bn2")(_conv(self.planes, (3, 3, 3), (1, 1, 1), "conv2", self.dtype)(y))
    if s != 1 or x.shape[-1] != out_planes:
      x = _downsample(x, out_planes, (s, s, s), self.dtype, train,
                      ("downsample_0", "downsample_1"))
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
  """
  depth: int = 18
  width: int = 64
  conv1_t_size: int = 7
  conv1_t_stride: int = 1
  no_max_pool: bool = False
  pool_t: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.depth not in DEPTH_TO_BLOCKS:
      raise ValueError(f"Hara ResNet depth must be one of {sorted(DEPTH_TO_BLOCKS)}, "
                       f"got {self.depth}.")
    x = x.astype(self.dtype)
    x = _conv(self.width, (self.conv1_t_size, 7, 7), (self.conv1_t_stride, 2, 2), "conv1",
              self.dtype)(x)
    x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn1")(x))
    if not self.no_max_pool:
      t = self.pool_t
      x = nn.max_pool(x, (t, 3, 3), strides=(1 if t == 1 else 2, 2, 2),
                      padding=((t // 2, t // 2), (1, 1), (1, 1)))
    for i, num_blocks in enumerate(DEPTH_TO_BLOCKS[self.depth]):
      for j in range(num_blocks):
        x = HaraBlock(self.width * 2**i, stride=2 if (i > 0 and j == 0) else 1,
                      bottleneck=self.depth >= 50, dtype=self.dtype,
                      name=f"layer{i + 1}_{j}")(x, train=train)
    return jnp.mean(x, axis=(1, 2, 3)), x


def feature_dim(cfg) -> int:
  """Channels D of an encoder's pooled feature, from its config."""
  bottleneck = cfg.get("bottleneck", False) or (
      cfg["arch"] == "hara" and cfg.get("depth", 18) >= 50)
  return cfg["width"] * 8 * (4 if bottleneck else 1)


def build_encoder(cfg, dtype=jnp.float32, name=None) -> nn.Module:
  """The encoder described by `config.model.encoder`.

  Args:
    cfg: a mapping with `arch` ('r2plus1d', 'r3d', 'mc3' or 'hara'), `width`, and
      `blocks` (torchvision layout) or `depth` (Hara layout), plus the optional keys
      `bottleneck` and the Hara stem keys of `HaraResNet`.
    dtype: compute dtype.
    name: the Flax submodule name (the authors call it "backbone").
  """
  if cfg["arch"] == "hara":
    return HaraResNet(
        depth=cfg["depth"], width=cfg["width"], conv1_t_size=cfg.get("conv1_t_size", 7),
        conv1_t_stride=cfg.get("conv1_t_stride", 1),
        no_max_pool=cfg.get("no_max_pool", False), pool_t=cfg.get("pool_t", 1),
        dtype=dtype, name=name)
  return VideoResNet(arch=cfg["arch"], blocks=tuple(cfg["blocks"]), width=cfg["width"],
                     bottleneck=cfg.get("bottleneck", False), dtype=dtype, name=name)
