"""Fusion and classifier (SPEC 3.5, Eq. 10-12): per-scale concat, POSTER++'s embedding convs, a small ViT, SE, head.

Each scale is brought to the last scale's side by 3x3 stride-2 convs (one per halving; a 1x1 conv when it is
already there), which gives POSTER++'s embed_q/embed_k/embed_v for the 28/14/7 sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from .config import FusionConfig
from .layers import Mlp

READOUTS = ("cls", "mean", "tokens")


def _halvings(side: int, target: int) -> int:
    """How many 3x3 stride-2 convs (padding 1) take `side` to `target`; raises if none does."""
    count, current = 0, side
    while current > target:
        current, count = (current + 1) // 2, count + 1
    if current != target:
        raise ValueError(f"scales: side {side} cannot be brought to {target} by stride-2 convs")
    return count


def _embedding(in_channels: int, embed_dim: int, side: int, target: int) -> nn.Sequential:
    """POSTER++-style embedding of one scale: stride-2 3x3 convs down to `target`, or a 1x1 conv."""
    halvings = _halvings(side, target)
    if halvings == 0:
        return nn.Sequential(nn.Conv2d(in_channels, embed_dim, 1))
    widths = [in_channels] + [embed_dim] * halvings
    return nn.Sequential(*[nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in pairwise(widths)])


class Attention(nn.Module):
    """Multi-head self-attention with a biased qkv projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN ViT block (Eq. 11, 12)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SEBlock(nn.Module):
    """Squeeze-excitation gate on a vector: x * sigmoid(W2 ReLU(W1 x))."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, dim)
        self.relu = nn.ReLU(inplace=True)
        self.linear2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.linear2(self.relu(self.linear1(x))))


class FusionHead(nn.Module):
    """Three DTNet taps and three DLNet outputs -> logits (B, num_classes).

    `concat="channel"` embeds [F_s; O_s] per scale (3 x side**2 tokens); `"token"` embeds F_s and O_s separately
    (each embed_* is then a ModuleList [dtnet, dlnet]) and doubles the tokens. `readout` is what the classifier
    reads: POSTER++'s cls token, the mean of the tokens, or all tokens with their positions ("tokens": the SE gate
    per token, one Linear over them all), which on aligned faces learns where a cls token first has to learn to
    attend.
    """

    def __init__(self, config: FusionConfig, dtnet_channels: Sequence[int], dlnet_channels: Sequence[int],
                 num_classes: int, scales: Sequence[int]):
        super().__init__()
        for name, value in (("dtnet_channels", dtnet_channels), ("dlnet_channels", dlnet_channels),
                            ("scales", scales)):
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 entries, got {tuple(value)}")
        if config.concat not in ("channel", "token"):
            raise ValueError(f"config.concat must be 'channel' or 'token', got {config.concat!r}")
        if config.readout not in READOUTS:
            raise ValueError(f"config.readout must be one of {READOUTS}, got {config.readout!r}")
        self.readout = config.readout
        self.dtnet_channels, self.dlnet_channels = tuple(dtnet_channels), tuple(dlnet_channels)
        self.scales, self.concat = tuple(scales), config.concat
        dim, target = config.embed_dim, scales[2]
        embeds = []
        for dt, dl, side in zip(dtnet_channels, dlnet_channels, scales, strict=True):
            if self.concat == "channel":
                embeds.append(_embedding(dt + dl, dim, side, target))
            else:
                embeds.append(nn.ModuleList([_embedding(dt, dim, side, target), _embedding(dl, dim, side, target)]))
        self.embed_q, self.embed_k, self.embed_v = embeds
        tokens = 3 * target * target * (1 if self.concat == "channel" else 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, config.heads, config.mlp_ratio) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.se_block = SEBlock(dim)
        self.head = nn.Linear(dim * tokens if self.readout == "tokens" else dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in [self.blocks, self.se_block, self.head]:
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.01)
                    nn.init.zeros_(layer.bias)

    def _check(self, features: Sequence[torch.Tensor], name: str, channels: tuple[int, ...]) -> None:
        if len(features) != 3:
            raise ValueError(f"{name} must hold 3 feature maps, got {len(features)}")
        batch = features[0].shape[0]
        for i, (x, c, side) in enumerate(zip(features, channels, self.scales, strict=True)):
            if x.ndim != 4 or tuple(x.shape[1:]) != (c, side, side) or x.shape[0] != batch:
                raise ValueError(f"{name}[{i}] must have shape ({batch}, {c}, {side}, {side}), got {tuple(x.shape)}")

    def features(self, dtnet_features: Sequence[torch.Tensor], dlnet_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The SE-gated feature before the classifier: the cls token's or the tokens' mean (B, embed_dim), or every
        token, flattened in order (B, tokens * embed_dim)."""
        self._check(dtnet_features, "dtnet_features", self.dtnet_channels)
        self._check(dlnet_features, "dlnet_features", self.dlnet_channels)
        if dlnet_features[0].shape[0] != dtnet_features[0].shape[0]:
            raise ValueError(f"dlnet_features batch {dlnet_features[0].shape[0]} differs from dtnet_features "
                             f"batch {dtnet_features[0].shape[0]}")
        tokens = []
        for embed, f, o in zip((self.embed_q, self.embed_k, self.embed_v), dtnet_features, dlnet_features,
                               strict=True):
            if self.concat == "channel":
                tokens.append(embed(torch.cat([f, o], dim=1)).flatten(2).transpose(1, 2))
            else:
                tokens += [embed[0](f).flatten(2).transpose(1, 2), embed[1](o).flatten(2).transpose(1, 2)]
        x = torch.cat(tokens, dim=1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        if self.readout == "tokens":
            return self.se_block(x[:, 1:]).flatten(1)
        return self.se_block(x[:, 0] if self.readout == "cls" else x[:, 1:].mean(dim=1))

    def forward(self, dtnet_features: Sequence[torch.Tensor], dlnet_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Three (B, C_s, side_s, side_s) maps from each branch -> logits (B, num_classes)."""
        return self.head(self.features(dtnet_features, dlnet_features))
