"""DTNet (SPEC 3.3, Eq. 2-4): DiffIR's DIRformer, a Restormer U-Net whose LayerNorms are modulated by the prior.

Module and parameter names follow Restormer/DiffIR (``encoder_level1``, ``down1_2.body``, ``attn.qkv``,
``ffn.project_in``...). DiffIR's per-branch ``kernel`` Linear lives in the block's ModulatedLayerNorm here, so
DiffIR's ``attn.kernel.0`` maps to ``norm1.kernel`` and ``ffn.kernel.0`` to ``norm2.kernel``.
"""

from __future__ import annotations

import torch
from torch import nn

from lldif.models.config import DTNetConfig
from lldif_kernels.nn import MODULATIONS, GatedDepthwiseFeedForward, ModulatedLayerNorm, TransposedAttention

TAPS = ("decoder", "encoder")


class TransformerBlock(nn.Module):
    """DiffIR's dynamic transformer block: prior-modulated LayerNorm before the attention and before the FFN."""

    def __init__(
        self, dim: int, heads: int, ffn_expansion: float, prior_dim: int, bias: bool = False,
        bias_free_norm: bool = False, backend: str | None = None, modulation: str = "diffir",
    ) -> None:
        super().__init__()
        self.norm1 = ModulatedLayerNorm(dim, prior_dim, bias_free=bias_free_norm, backend=backend,
                                        modulation=modulation)
        self.attn = TransposedAttention(dim, heads, bias=bias, backend=backend)
        self.norm2 = ModulatedLayerNorm(dim, prior_dim, bias_free=bias_free_norm, backend=backend,
                                        modulation=modulation)
        self.ffn = GatedDepthwiseFeedForward(dim, ffn_expansion, bias=bias, backend=backend)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x, z))
        return x + self.ffn(self.norm2(x, z))


class Downsample(nn.Module):
    """Restormer's downsampling: halve the channels, then PixelUnshuffle(2) (C -> 2C, side / 2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Restormer's upsampling: double the channels, then PixelShuffle(2) (C -> C/2, side x 2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class OverlapPatchEmbed(nn.Module):
    """Restormer's patch embedding: one 3x3 conv from the image to the level-1 width."""

    def __init__(self, in_channels: int, dim: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class DTNet(nn.Module):
    """The LLformer's image branch: a truncated DIRformer U-Net giving three prior-modulated feature maps.

    ``forward(image (B, in_channels, S, S), z (B, prior_dim))`` returns ``(F1', F2', F3')`` with
    ``tap_channels`` = (2, 4, 8) x dim channels at sides S/4, S/8 and S/16 (sides must be divisible by 16).
    """

    def __init__(self, config: DTNetConfig, prior_dim: int, in_channels: int = 3, backend: str | None = None) -> None:
        super().__init__()
        if config.taps not in TAPS:
            raise ValueError(f"config.taps must be one of {TAPS}, got {config.taps!r}")
        if config.modulation not in MODULATIONS:
            raise ValueError(f"config.modulation must be one of {MODULATIONS}, got {config.modulation!r}")
        if len(config.encoder_blocks) != 4 or len(config.heads) != 4 or len(config.decoder_blocks) != 2:
            raise ValueError("config needs 4 encoder_blocks, 4 heads and 2 decoder_blocks, got "
                             f"{config.encoder_blocks}, {config.heads}, {config.decoder_blocks}")
        self.config, self.prior_dim, self.in_channels = config, prior_dim, in_channels
        dim, widths = config.dim, [config.dim * 2**level for level in range(4)]
        self.tap_channels = (widths[1], widths[2], widths[3])

        def level(width: int, blocks: int, heads: int) -> nn.Sequential:
            return nn.Sequential(*(
                TransformerBlock(width, heads, config.ffn_expansion, prior_dim, config.bias, config.bias_free_norm,
                                 backend, config.modulation) for _ in range(blocks)))

        blocks, heads = config.encoder_blocks, config.heads
        self.patch_embed = OverlapPatchEmbed(in_channels, dim)
        self.encoder_level1 = level(widths[0], blocks[0], heads[0])
        self.down1_2 = Downsample(widths[0])
        self.encoder_level2 = level(widths[1], blocks[1], heads[1])
        self.down2_3 = Downsample(widths[1])
        self.encoder_level3 = level(widths[2], blocks[2], heads[2])
        self.down3_4 = Downsample(widths[2])
        self.latent = level(widths[3], blocks[3], heads[3])
        if config.taps == "decoder":
            self.up4_3 = Upsample(widths[3])
            self.reduce_chan_level3 = nn.Conv2d(widths[3], widths[2], kernel_size=1, bias=config.bias)
            self.decoder_level3 = level(widths[2], config.decoder_blocks[0], heads[2])
            self.up3_2 = Upsample(widths[2])
            self.reduce_chan_level2 = nn.Conv2d(widths[2], widths[1], kernel_size=1, bias=config.bias)
            self.decoder_level2 = level(widths[1], config.decoder_blocks[1], heads[1])
        # Stride-2 convs bring the taps to the DLNet scales, as POSTER++'s conv1/2/3 do for IR-50.
        self.tap_convs = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in self.tap_channels)

    @staticmethod
    def _run(level: nn.Sequential, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        for block in level:
            x = block(x, z)
        return x

    def forward(self, image: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if image.dim() != 4 or image.shape[1] != self.in_channels or image.shape[-1] % 16 or image.shape[-2] % 16:
            raise ValueError(f"image must be (B, {self.in_channels}, H, W) with H and W divisible by 16, "
                             f"got {tuple(image.shape)}")
        if z.dim() != 2 or tuple(z.shape) != (image.shape[0], self.prior_dim):
            raise ValueError(f"z must be (B, prior_dim) = ({image.shape[0]}, {self.prior_dim}), got {tuple(z.shape)}")
        enc1 = self._run(self.encoder_level1, self.patch_embed(image), z)
        enc2 = self._run(self.encoder_level2, self.down1_2(enc1), z)
        enc3 = self._run(self.encoder_level3, self.down2_3(enc2), z)
        latent = self._run(self.latent, self.down3_4(enc3), z)
        if self.config.taps == "decoder":
            dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], dim=1))
            dec3 = self._run(self.decoder_level3, dec3, z)
            dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], dim=1))
            dec2 = self._run(self.decoder_level2, dec2, z)
            taps = (dec2, dec3, latent)
        else:
            taps = (enc2, enc3, latent)
        return tuple(conv(tap) for conv, tap in zip(self.tap_convs, taps, strict=True))
