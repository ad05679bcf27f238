"""DLNet's backbones (SPEC 3.4): IR-50 stages 1-3, a light ResNet, MobileFaceNet and a landmark-heatmap encoder.

Every image backbone maps (B, 3, S, S) to three maps at S/2, S/4, S/8 with channels `out_channels`; every
landmark backbone gives three maps at S/4, S/8, S/16. Module names follow POSTER++'s `ir50.py` and
`mobilefacenet.py`, so state dicts of its pretrained IR-50 and MobileFaceNet load by name.
"""

from __future__ import annotations

import torch
from torch import nn


class BottleneckIR(nn.Module):
    """ArcFace's improved-residual unit: BN, conv3x3, PReLU, conv3x3 (stride), BN, plus a shortcut."""

    def __init__(self, in_channels: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)  # a parameter-free subsample, as ArcFace's IR-50
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def _ir_stage(in_channels: int, depth: int, units: int) -> nn.Sequential:
    return nn.Sequential(*(BottleneckIR(in_channels if i == 0 else depth, depth, 2 if i == 0 else 1)
                           for i in range(units)))


class IR50(nn.Module):
    """The first three stages of IR-50: stem at S, then 3, 4 and 14 units giving 64, 128, 256 channels."""

    out_channels = (64, 128, 256)

    def __init__(self) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        self.body1 = _ir_stage(64, 64, 3)
        self.body2 = _ir_stage(64, 128, 4)
        self.body3 = _ir_stage(128, 256, 14)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x1 = self.body1(self.input_layer(x))
        x2 = self.body2(x1)
        return x1, x2, self.body3(x2)


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + shortcut)


class LightResNet(nn.Module):
    """A small ResNet with IR-50's interface: a stride-1 stem, then 3 stages of `blocks` BasicBlocks at /2, /4, /8."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 2) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1 or blocks < 1:
            raise ValueError(f"widths must be three positive ints and blocks >= 1, got {widths}, {blocks}")
        self.out_channels = tuple(widths)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        ins = (widths[0], *widths[:2])
        self.layer1, self.layer2, self.layer3 = (
            nn.Sequential(BasicBlock(c_in, c_out, 2), *(BasicBlock(c_out, c_out) for _ in range(blocks - 1)))
            for c_in, c_out in zip(ins, widths, strict=True))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x1 = self.layer1(self.stem(x))
        x2 = self.layer2(x1)
        return x1, x2, self.layer3(x2)


class ConvBlock(nn.Module):
    """Conv (no bias) + BN + PReLU, MobileFaceNet's `Conv_block`."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_c)
        self.prelu = nn.PReLU(out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn(self.conv(x)))


class LinearBlock(nn.Module):
    """Conv (no bias) + BN without activation, MobileFaceNet's `Linear_block`."""

    def __init__(self, in_c: int, out_c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `groups`, depth-wise 3x3, 1x1 project; residual when asked."""

    def __init__(self, in_c: int, out_c: int, groups: int, stride: int = 2, residual: bool = False) -> None:
        super().__init__()
        self.conv = ConvBlock(in_c, groups)
        self.conv_dw = ConvBlock(groups, groups, 3, stride, 1, groups=groups)
        self.project = LinearBlock(groups, out_c)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.conv_dw(self.conv(x)))
        return x + out if self.residual else out


class Residual(nn.Module):
    """`num_block` residual stride-1 DepthWise units."""

    def __init__(self, c: int, num_block: int, groups: int) -> None:
        super().__init__()
        self.model = nn.Sequential(*(DepthWise(c, c, groups, stride=1, residual=True) for _ in range(num_block)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MobileFaceNet(nn.Module):
    """POSTER++'s landmark MobileFaceNet without its unused GDC head: out3 64 ch at /4, out4 128 at /8, 512 at /16.

    Trainable by default; `load_mobilefacenet_checkpoint` freezes it (no grads, BatchNorm kept in eval mode).
    """

    out_channels = (64, 128, 512)

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False
        self.conv1 = ConvBlock(3, 64, 3, 2, 1)
        self.conv2_dw = ConvBlock(64, 64, 3, 1, 1, groups=64)
        self.conv_23 = DepthWise(64, 64, groups=128)
        self.conv_3 = Residual(64, 4, groups=128)
        self.conv_34 = DepthWise(64, 128, groups=256)
        self.conv_4 = Residual(128, 6, groups=256)
        self.conv_45 = DepthWise(128, 128, groups=512)
        self.conv_5 = Residual(128, 2, groups=256)
        self.conv_6_sep = ConvBlock(128, 512)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def freeze(self) -> None:
        """Stop gradients and keep BatchNorm statistics fixed, also under a later `train()`."""
        self.frozen = True
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> MobileFaceNet:
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out3 = self.conv_3(self.conv_23(self.conv2_dw(self.conv1(x))))
        out4 = self.conv_4(self.conv_34(out3))
        return out3, out4, self.conv_6_sep(self.conv_5(self.conv_45(out4)))


def render_heatmaps(points: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Gaussian heatmaps (B, P, size, size) peaking at 1 on each (x, y) point; pixel i's centre is at i."""
    grid = torch.arange(size, dtype=points.dtype, device=points.device)
    gx = torch.exp(-(grid - points[..., 0, None]) ** 2 / (2 * sigma**2))  # (B, P, size) along x
    gy = torch.exp(-(grid - points[..., 1, None]) ** 2 / (2 * sigma**2))
    # Far from its point the Gaussian underflows into subnormal floats, which x86 CPUs multiply about 100x more
    # slowly: with 5% of the maps subnormal, the first convolution over them took 15% of a training step. Factors
    # under 1.01 sqrt(smallest normal) become 0, so neither they nor their products are subnormal.
    if points.dtype in (torch.float32, torch.float64):
        floor = 1.01 * torch.finfo(points.dtype).tiny ** 0.5
        gx, gy = gx.masked_fill(gx < floor, 0), gy.masked_fill(gy < floor, 0)
    return gy[..., :, None] * gx[..., None, :]


class HeatmapLandmarkEncoder(nn.Module):
    """Landmark queries from given points: one Gaussian heatmap channel per point, then stride-2 conv blocks.

    `forward(points (B, P, 2) in pixels of the S x S image, size S)` returns maps with channels `dims` at
    S/4, S/8, S/16. One channel per point keeps each landmark's identity, which a summed map would lose.
    """

    def __init__(self, points: int, dims: tuple[int, ...], sigma: float) -> None:
        super().__init__()
        if points < 1 or sigma <= 0 or len(dims) != 3:
            raise ValueError(f"need points >= 1, sigma > 0 and three dims, got {points}, {sigma}, {dims}")
        self.points, self.sigma, self.out_channels = points, sigma, tuple(dims)
        ins = (points, dims[0], dims[0], dims[1])
        self.stem, self.stage1, self.stage2, self.stage3 = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())
            for c_in, c_out in zip(ins, (dims[0], *dims), strict=True))

    def forward(self, points: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heatmaps = render_heatmaps(points.detach().to(self.stem[0].weight.dtype), size, self.sigma)
        x1 = self.stage1(self.stem(heatmaps))
        x2 = self.stage2(x1)
        return x1, x2, self.stage3(x2)


def _load_checkpoint(module: nn.Module, path: str, prefix: str) -> tuple[list[str], list[str]]:
    """Tensor-only load (`read_checkpoint`) with `prefix` stripped; keys of the wrong shape count as unexpected."""
    from .pretrained import read_checkpoint

    own = module.state_dict()
    kept, unexpected = {}, []
    for key, value in read_checkpoint(path).items():
        name = key.removeprefix(prefix)
        if name in own and own[name].shape == value.shape:
            kept[name] = value
        else:
            unexpected.append(key)
    missing = module.load_state_dict(kept, strict=False).missing_keys
    return list(missing), unexpected


def load_ir50_checkpoint(module: IR50, path: str) -> tuple[list[str], list[str]]:
    """Load a user's IR-50 .pth (POSTER++'s `ir50.pth` names) into `module`; returns (missing, unexpected) keys."""
    return _load_checkpoint(module, path, "ir_back.")


def load_mobilefacenet_checkpoint(module: MobileFaceNet, path: str) -> tuple[list[str], list[str]]:
    """Load a user's MobileFaceNet .pth and freeze the module; returns (missing, unexpected) keys."""
    result = _load_checkpoint(module, path, "face_landback.")
    module.freeze()
    return result
