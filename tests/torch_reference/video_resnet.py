"""Reference 3D ResNets in PyTorch, used as an oracle for the Flax encoders.

Two families, each reproducing the *state-dict names* of a public implementation
so that checkpoints load with ``strict=True`` and so that a weight converter can be
tested name by name:

* ``TorchVideoResNet``: torchvision's ``torchvision.models.video`` layout
  (R3D, MC3, R(2+1)D), which is also what the authors' ``r2plus1d.py`` uses.
* ``TorchHaraResNet``: Kensho Hara's 3D-ResNets layout (the authors' ``r3d.py``).

Input is NCTHW float. ``forward`` returns ``(pooled, feature_map)`` with
``pooled`` of shape [B, C_last] (global average over T', H', W') and
``feature_map`` of shape [B, C_last, T', H', W']. There is no classifier in
``forward``; pass ``num_classes`` to get an (unused) ``fc`` layer, which only
exists so that full checkpoints (with ``fc.*``) load strictly.

All BatchNorm layers use PyTorch defaults (eps 1e-5, momentum 0.1).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "TorchVideoResNet",
    "TorchHaraResNet",
    "r2plus1d_midplanes",
    "HARA_DEPTHS",
]


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------

def r2plus1d_midplanes(in_planes: int, out_planes: int) -> int:
    """Hidden channels of a (2+1)D conv chosen so it has about as many weights
    as the 3x3x3 conv it replaces (torchvision's formula)."""
    return (in_planes * out_planes * 27) // (in_planes * 9 + 3 * out_planes)


def _conv(cin: int, cout: int, kernel, stride=1, padding=0) -> nn.Conv3d:
    """Bias-free Conv3d: every conv in these networks is followed by BatchNorm."""
    return nn.Conv3d(cin, cout, kernel_size=kernel, stride=stride, padding=padding,
                     bias=False)


def _init_weights(module: nn.Module) -> None:
    """Initialisation used by both public implementations (He-normal, fan-out).

    It has no bearing on the oracle's role (tests copy weights across), but it
    keeps activations in a sane range when the oracle is run from scratch.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _pool_and_return(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global average pool over (T, H, W); return it with the unpooled map."""
    return x.mean(dim=(2, 3, 4)), x


# ---------------------------------------------------------------------------
# torchvision layout
# ---------------------------------------------------------------------------

# Which spatio-temporal conv each stage uses, per architecture.
#   '3d'      : full 3x3x3 conv (a bare Conv3d, so its key is e.g. conv1.0.weight)
#   '2d'      : 1x3x3 conv, no temporal extent, no temporal stride
#   '2plus1d' : factorised 1x3x3 -> BN -> ReLU -> 3x1x1 (a Sequential, keys conv1.0.{0,1,3})
_STAGE_CONVS = {
    "r3d": ("3d", "3d", "3d", "3d"),
    "mc3": ("3d", "2d", "2d", "2d"),
    "r2plus1d": ("2plus1d", "2plus1d", "2plus1d", "2plus1d"),
}


def _spatiotemporal_conv(kind: str, cin: int, cout: int, mid: int, stride: int) -> nn.Module:
    """Build the 3x3x3-equivalent conv of a residual block for the given kind."""
    s = stride
    if kind == "3d":
        return _conv(cin, cout, (3, 3, 3), stride=(s, s, s), padding=(1, 1, 1))
    if kind == "2d":
        return _conv(cin, cout, (1, 3, 3), stride=(1, s, s), padding=(0, 1, 1))
    if kind == "2plus1d":
        # Spatial part carries the spatial stride, temporal part the temporal stride.
        return nn.Sequential(
            _conv(cin, mid, (1, 3, 3), stride=(1, s, s), padding=(0, 1, 1)),
            nn.BatchNorm3d(mid),
            nn.ReLU(),
            _conv(mid, cout, (3, 1, 1), stride=(s, 1, 1), padding=(1, 0, 0)),
        )
    raise ValueError(f"unknown conv kind {kind!r}")


def _shortcut_stride(kind: str, stride: int) -> Tuple[int, int, int]:
    """The 1x1x1 shortcut must subsample exactly like the block's main path:
    the no-temporal conv never strides in time, the others do."""
    return (1, stride, stride) if kind == "2d" else (stride, stride, stride)


class _TVBasicBlock(nn.Module):
    """Two spatio-temporal convs with a residual connection (torchvision naming)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, kind: str, stride: int,
                 downsample: Optional[nn.Module]):
        super().__init__()
        # torchvision computes the (2+1)D hidden width once per block from the
        # block's *input* and output widths, and reuses it for the second conv
        # too (even though that one maps planes -> planes). Reproduced on purpose:
        # it determines the checkpoint's tensor shapes.
        mid = r2plus1d_midplanes(cin, planes)
        self.conv1 = nn.Sequential(
            _spatiotemporal_conv(kind, cin, planes, mid, stride),
            nn.BatchNorm3d(planes),
            nn.ReLU(),
        )
        self.conv2 = nn.Sequential(
            _spatiotemporal_conv(kind, planes, planes, mid, 1),
            nn.BatchNorm3d(planes),
        )
        self.downsample = downsample  # None registers no submodule (no keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(self.conv1(x)) + identity)


class _TVBottleneck(nn.Module):
    """1x1x1 reduce -> spatio-temporal conv -> 1x1x1 expand (x4), residual."""

    expansion = 4

    def __init__(self, cin: int, planes: int, kind: str, stride: int,
                 downsample: Optional[nn.Module]):
        super().__init__()
        # Same quirk as the basic block: hidden width from the block input width.
        mid = r2plus1d_midplanes(cin, planes)
        self.conv1 = nn.Sequential(
            _conv(cin, planes, 1), nn.BatchNorm3d(planes), nn.ReLU())
        self.conv2 = nn.Sequential(
            _spatiotemporal_conv(kind, planes, planes, mid, stride),
            nn.BatchNorm3d(planes), nn.ReLU())
        self.conv3 = nn.Sequential(
            _conv(planes, planes * 4, 1), nn.BatchNorm3d(planes * 4))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class TorchVideoResNet(nn.Module):
    """torchvision-layout video ResNet (R3D / MC3 / R(2+1)D), parametrised by
    depth (``blocks``), ``width`` (channels of stage 1) and block type.

    ``TorchVideoResNet('r2plus1d')`` has the keys of torchvision's
    ``r2plus1d_18`` (minus ``fc.*`` unless ``num_classes`` is given). Note the
    authors' own ``r2plus1d_18`` uses ``blocks=(1, 1, 1, 1)``.
    """

    def __init__(self, arch: str, blocks: Sequence[int] = (2, 2, 2, 2), width: int = 64,
                 bottleneck: bool = False, num_classes: Optional[int] = None):
        super().__init__()
        if arch not in _STAGE_CONVS:
            raise ValueError(f"arch must be one of {sorted(_STAGE_CONVS)}, got {arch!r}")
        if len(blocks) != 4:
            raise ValueError("blocks must list four stage depths")
        self.arch = arch

        if arch == "r2plus1d":
            # Factorised stem: 1x7x7 spatial conv to `mid` channels, then 3x1x1.
            mid = 45 * width // 64
            self.stem = nn.Sequential(
                _conv(3, mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3)),
                nn.BatchNorm3d(mid),
                nn.ReLU(),
                _conv(mid, width, (3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0)),
                nn.BatchNorm3d(width),
                nn.ReLU(),
            )
        else:
            self.stem = nn.Sequential(
                _conv(3, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3)),
                nn.BatchNorm3d(width),
                nn.ReLU(),
            )

        block_cls = _TVBottleneck if bottleneck else _TVBasicBlock
        cin = width
        for stage, (n_blocks, kind) in enumerate(zip(blocks, _STAGE_CONVS[arch])):
            planes = width * (2 ** stage)
            stride = 1 if stage == 0 else 2
            cout = planes * block_cls.expansion
            downsample = None
            if stride != 1 or cin != cout:
                downsample = nn.Sequential(
                    _conv(cin, cout, 1, stride=_shortcut_stride(kind, stride)),
                    nn.BatchNorm3d(cout),
                )
            layers = [block_cls(cin, planes, kind, stride, downsample)]
            cin = cout
            layers += [block_cls(cin, planes, kind, 1, None) for _ in range(1, n_blocks)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))

        self.out_channels = cin
        if num_classes is not None:
            self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
        return _pool_and_return(x)


# ---------------------------------------------------------------------------
# Hara's 3D-ResNets layout
# ---------------------------------------------------------------------------

# depth -> (bottleneck?, blocks per stage)
HARA_DEPTHS = {
    10: (False, (1, 1, 1, 1)),
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
    200: (True, (3, 24, 36, 3)),
}


class _HaraBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: Optional[nn.Module]):
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv(planes, planes, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class _HaraBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: Optional[nn.Module]):
        super().__init__()
        self.conv1 = _conv(cin, planes, 1)
        self.bn1 = nn.BatchNorm3d(planes)
        # Hara puts the stride on the 3x3x3 conv of the bottleneck.
        self.conv2 = _conv(planes, planes, 3, stride=stride, padding=1)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = _conv(planes, planes * 4, 1)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class TorchHaraResNet(nn.Module):
    """Hara-layout 3D ResNet with shortcut type B (1x1x1 conv + BN).

    Stem: Conv3d(3, width, (conv1_t_size, 7, 7), stride (conv1_t_stride, 2, 2))
    -> BN -> ReLU -> MaxPool3d unless ``no_max_pool``. The pool has kernel
    (pool_t, 3, 3), stride (1 if pool_t == 1 else 2, 2, 2), padding (pool_t // 2, 1, 1):
    ``pool_t=1`` is the authors' r3d.py (purely spatial pooling, which keeps 16
    frames -> 2 at the end), ``pool_t=3`` is Hara's original 3x3x3 / stride-2 pool.
    """

    def __init__(self, depth: int = 18, width: int = 64, conv1_t_size: int = 7,
                 conv1_t_stride: int = 1, no_max_pool: bool = False, pool_t: int = 1,
                 num_classes: Optional[int] = None):
        super().__init__()
        if depth not in HARA_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(HARA_DEPTHS)}, got {depth}")
        bottleneck, blocks = HARA_DEPTHS[depth]
        block_cls = _HaraBottleneck if bottleneck else _HaraBasicBlock

        self.conv1 = _conv(3, width, (conv1_t_size, 7, 7), stride=(conv1_t_stride, 2, 2),
                           padding=(conv1_t_size // 2, 3, 3))
        self.bn1 = nn.BatchNorm3d(width)
        self.no_max_pool = no_max_pool
        self.maxpool = nn.MaxPool3d(kernel_size=(pool_t, 3, 3),
                                    stride=(1 if pool_t == 1 else 2, 2, 2),
                                    padding=(pool_t // 2, 1, 1))

        cin = width
        for stage, n_blocks in enumerate(blocks):
            planes = width * (2 ** stage)
            stride = 1 if stage == 0 else 2
            cout = planes * block_cls.expansion
            downsample = None
            if stride != 1 or cin != cout:
                downsample = nn.Sequential(_conv(cin, cout, 1, stride=stride),
                                           nn.BatchNorm3d(cout))
            layers = [block_cls(cin, planes, stride, downsample)]
            cin = cout
            layers += [block_cls(cin, planes, 1, None) for _ in range(1, n_blocks)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))

        self.out_channels = cin
        if num_classes is not None:
            self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
        return _pool_and_return(x)
