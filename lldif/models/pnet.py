"""The prior networks: PNET_S1 (Eq. 1, stage-1 teacher) and PNET_S2 (Eq. 15, DiffIR's CPEN_S2) (SPEC 3.2, 3.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lldif.models.config import PriorConfig

PRIOR_NORMS = ("batch", "none")


def check_shape(x: torch.Tensor, name: str, shape: tuple[int | None, ...]) -> None:
    """Raise naming `name` unless `x` has `shape` (None matches any size)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    want = tuple("*" if s is None else s for s in shape)
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape, strict=True)):
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")


def attention_heads(dim: int, max_heads: int = 4, min_head_dim: int = 16) -> int:
    """The most heads (at most `max_heads`) that divide `dim` with head width >= `min_head_dim` (at least 1)."""
    for heads in range(min(max_heads, max(1, dim // min_head_dim)), 0, -1):
        if dim % heads == 0:
            return heads
    return 1


class ResBlock(nn.Module):
    """conv3x3 - LReLU(0.1) - conv3x3 plus the input (EDSR/DiffIR ResBlock, biased)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PNetS2(nn.Module):
    """Image -> condition vector c (B, dim): unshuffle, convs, ResBlocks, global pool, 2-layer LReLU MLP."""

    def __init__(self, config: PriorConfig, in_channels: int = 3):
        super().__init__()
        feats, dim = config.pnet_s2_feats, config.dim
        self.in_channels = in_channels
        self.pixel_unshuffle = nn.PixelUnshuffle(4)
        self.E = nn.Sequential(
            nn.Conv2d(in_channels * 16, feats, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            *[ResBlock(feats) for _ in range(config.pnet_s2_res_blocks)],
            nn.Conv2d(feats, feats * 2, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(feats * 2, feats * 2, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(feats * 2, dim, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim), nn.LeakyReLU(0.1, inplace=True), nn.Linear(dim, dim), nn.LeakyReLU(0.1, inplace=True)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) with H, W divisible by 4 -> c (B, dim)."""
        check_shape(image, "image", (None, self.in_channels, None, None))
        if image.shape[-1] % 4 or image.shape[-2] % 4:
            raise ValueError(f"image height and width must be divisible by 4, got {tuple(image.shape[-2:])}")
        return self.mlp(self.E(self.pixel_unshuffle(image)).flatten(1))


class CrossAttention(nn.Module):
    """Multi-head attention of query tokens over context tokens (biased projections)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttentionBlock(nn.Module):
    """Pre-LN block: q + CA(LN(q), LN(u)), then q + MLP(LN(q))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm_q(q), self.norm_kv(context))
        return q + self.mlp(self.norm2(q))


class PNetS1(nn.Module):
    """(e_I, e_lab) -> EPD Z (B, dim): a learned query cross-attends to the two embedding tokens, or concat + MLP."""

    def __init__(self, config: PriorConfig, image_embed_dim: int, label_embed_dim: int):
        super().__init__()
        dim = config.dim
        self.kind = config.pnet_s1
        self.image_embed_dim, self.label_embed_dim = image_embed_dim, label_embed_dim
        if self.kind == "cross_attention":
            self.image_proj = nn.Linear(image_embed_dim, dim)
            self.label_proj = nn.Linear(label_embed_dim, dim)
            self.type_embed = nn.Parameter(torch.zeros(1, 2, dim))
            self.query = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.type_embed, std=0.02)
            nn.init.trunc_normal_(self.query, std=0.02)
            heads = attention_heads(dim)
            self.blocks = nn.ModuleList([CrossAttentionBlock(dim, heads) for _ in range(2)])
        elif self.kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(image_embed_dim + label_embed_dim, dim), nn.LeakyReLU(0.1, True))
        else:
            raise ValueError(f"config.pnet_s1 must be 'cross_attention' or 'mlp', got {self.kind!r}")
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim), nn.LeakyReLU(0.1, inplace=True), nn.Linear(dim, dim), nn.LeakyReLU(0.1, inplace=True)
        )
        if config.normalize not in PRIOR_NORMS:
            raise ValueError(f"config.normalize must be one of {PRIOR_NORMS}, got {config.normalize!r}")
        # Each dimension of Z standardised over the data (statistics of stage 1, frozen with PNET_S1 afterwards):
        # what tells samples apart is then at unit scale, the scale a zero-initialised modulation kernel learns
        # from at its learning rate and the diffusion's unit-variance noise assumes. At initialisation nearly all
        # of the raw Z is a vector shared by every sample (the biases, the learned query).
        self.out_norm = nn.BatchNorm1d(dim, affine=False) if config.normalize == "batch" else nn.Identity()

    def forward(self, image_embed: torch.Tensor, label_embed: torch.Tensor) -> torch.Tensor:
        """(B, image_embed_dim), (B, label_embed_dim) -> Z (B, dim)."""
        check_shape(image_embed, "image_embed", (None, self.image_embed_dim))
        check_shape(label_embed, "label_embed", (image_embed.shape[0], self.label_embed_dim))
        if self.kind == "mlp":
            return self.out_norm(self.mlp(self.proj(torch.cat([image_embed, label_embed], dim=1))))
        tokens = torch.stack([self.image_proj(image_embed), self.label_proj(label_embed)], dim=1) + self.type_embed
        q = self.query.expand(image_embed.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, tokens)
        return self.out_norm(self.mlp(q[:, 0]))
