"""DLNet (SPEC 3.4, Eq. 5-9): landmark-queried window cross-attention on image features at three scales.

Attribute names are POSTER++'s (`ir_back`, `face_landback`, `last_face_conv`, `conv1..3`, `window1..3.norm`,
`attn1..3`, `ffn1..3`), so the matching parts of its checkpoints load by name.
"""

from __future__ import annotations

import torch
from torch import nn

from lldif_kernels.nn import WindowCrossAttention

from .backbones import IR50, HeatmapLandmarkEncoder, LightResNet, MobileFaceNet
from .config import DLNetConfig
from .layers import DropPath, Mlp


class WindowNorm(nn.Module):
    """The LayerNorm before the window attention (POSTER++'s `window` module, whose partition is a no-op here)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class FeedForward(nn.Module):
    """Eq. 8-9 around the attention output: X1 = x + g1 * DropPath(attn); X1 + g2 * DropPath(MLP(LN(X1)))."""

    def __init__(self, dim: int, mlp_ratio: float, layer_scale: float, drop_path: float) -> None:
        super().__init__()
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.drop_path = DropPath(drop_path)

    def forward(self, attn: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        x = shortcut + self.drop_path(self.gamma1 * attn)
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm(x)))


class DLNet(nn.Module):
    """Image features (IR-50 or a light ResNet) cross-attended by landmark queries (MobileFaceNet or heatmaps).

    `forward(image (B, 3, S, S), landmarks (B, P, 2) pixels or None)` returns O1, O2, O3 channel-first with
    channels `dims` at S/4, S/8, S/16; each scale is one window (window size = the map's side). `landmarks` is
    used only by the "heatmap" landmark features and ignored otherwise.
    """

    def __init__(self, config: DLNetConfig, internal_size: int, backend: str | None = None) -> None:
        super().__init__()
        dims, heads = tuple(config.dims), tuple(config.heads)
        if len(dims) != 3 or len(heads) != 3 or any(d % h for d, h in zip(dims, heads, strict=True)):
            raise ValueError(f"dims and heads must be three values with heads dividing dims, got {dims}, {heads}")
        if internal_size < 16 or internal_size % 16:
            raise ValueError(f"internal_size must be a positive multiple of 16, got {internal_size}")
        if config.image_backbone not in ("ir50", "resnet"):
            raise ValueError(f"image_backbone must be 'ir50' or 'resnet', got {config.image_backbone!r}")
        if config.landmark_features not in ("mobilefacenet", "heatmap"):
            raise ValueError(f"landmark_features must be 'mobilefacenet' or 'heatmap', got "
                             f"{config.landmark_features!r}")
        self.config, self.internal_size, self.out_channels = config, internal_size, dims
        self.window_sizes = tuple(internal_size // f for f in (4, 8, 16))
        self.heads = heads

        self.ir_back = IR50() if config.image_backbone == "ir50" else LightResNet(config.resnet_widths)
        widths = self.ir_back.out_channels
        if config.landmark_features == "mobilefacenet":
            self.face_landback = MobileFaceNet()
            self.last_face_conv = nn.Conv2d(MobileFaceNet.out_channels[2], dims[2], 3, padding=1)
            landmark_channels = (*MobileFaceNet.out_channels[:2], dims[2])
        else:
            self.face_landback = HeatmapLandmarkEncoder(config.landmark_points, dims, config.heatmap_sigma)
            landmark_channels = dims
        if landmark_channels != dims:
            raise ValueError(f"MobileFaceNet's queries have {landmark_channels[:2]} channels at the first two "
                             f"scales, so dims must start with them, got {dims}")

        rates = torch.linspace(0, config.drop_path, 5)[:3].tolist()
        scales = zip(widths, dims, self.window_sizes, heads, rates, strict=True)
        for i, (width, dim, ws, head, rate) in enumerate(scales, 1):
            setattr(self, f"conv{i}", nn.Conv2d(width, dim, 3, stride=2, padding=1))
            setattr(self, f"window{i}", WindowNorm(dim))
            setattr(self, f"attn{i}", WindowCrossAttention(dim, window_size=ws, heads=head, backend=backend))
            setattr(self, f"ffn{i}", FeedForward(dim, config.mlp_ratio, config.layer_scale, rate))
            if config.query_projection:
                setattr(self, f"q_proj{i}", nn.Linear(dim, dim, bias=False))

    def _landmark_maps(self, image: torch.Tensor, landmarks: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if isinstance(self.face_landback, MobileFaceNet):
            out3, out4, sep = self.face_landback(image)
            return out3, out4, self.last_face_conv(sep)
        expected = (image.shape[0], self.config.landmark_points, 2)
        if landmarks is None or landmarks.shape != expected or not landmarks.is_floating_point():
            got = None if landmarks is None else f"{tuple(landmarks.shape)} {landmarks.dtype}"
            raise ValueError(f"landmarks must be a float {expected} tensor of (x, y) pixels for heatmap landmark "
                             f"features, got {got}")
        return self.face_landback(landmarks, self.internal_size)

    def forward(self, image: torch.Tensor, landmarks: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = self.internal_size
        if image.dim() != 4 or tuple(image.shape[1:]) != (3, size, size):
            raise ValueError(f"image must be (B, 3, {size}, {size}), got {tuple(image.shape)}")
        batch = image.shape[0]
        maps = self._landmark_maps(image, landmarks)
        features = self.ir_back(image)

        outputs = []
        scales = zip(features, maps, self.window_sizes, self.heads, strict=True)
        for i, (feature, landmark, ws, heads) in enumerate(scales, 1):
            x = getattr(self, f"conv{i}")(feature).flatten(2).transpose(1, 2)  # (B, M, D), M = ws*ws
            q = landmark.flatten(2).transpose(1, 2)
            if self.config.query_projection:
                q = getattr(self, f"q_proj{i}")(q)
            dim = x.shape[-1]
            # POSTER++'s head split: contiguous channel blocks of each token.
            q = q.reshape(batch, ws * ws, heads, dim // heads).transpose(1, 2)
            shortcut = getattr(self, f"window{i}")(x)
            out = getattr(self, f"ffn{i}")(getattr(self, f"attn{i}")(shortcut, q), shortcut)
            outputs.append(out.transpose(1, 2).reshape(batch, dim, ws, ws))
        return tuple(outputs)
