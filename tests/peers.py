"""Independent plain-PyTorch re-implementations of the peers' modules, with their parameter names: Restormer's
attention, POSTER++'s window attention and window branch, DiffIR's stage-2 DIRformer. They produce the state dicts
and the outputs the drop-in and converter tests hold LLDif's modules to."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RestormerAttention(nn.Module):
    """Restormer's Attention as its authors wrote it, in plain PyTorch: the module test's oracle."""

    def __init__(self, dim, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, stride=1, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(b, c, h, w))



class PosterWindowAttentionGlobal(nn.Module):
    """POSTER++'s WindowAttentionGlobal as its authors wrote it, in plain PyTorch: the module test's oracle."""

    def __init__(self, dim, num_heads, window_size, qkv_bias=True):
        super().__init__()
        self.window_size = (window_size, window_size)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid([torch.arange(window_size), torch.arange(window_size)], indexing="ij"))
        coords_flatten = torch.flatten(coords, 1)
        relative_coords = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
        relative_coords[:, :, 0] += window_size - 1
        relative_coords[:, :, 1] += window_size - 1
        relative_coords[:, :, 0] *= 2 * window_size - 1
        self.register_buffer("relative_position_index", relative_coords.sum(-1))
        self.qkv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, q_global):
        windows, tokens, channels = x.shape
        head_dim = channels // self.num_heads
        windows_per_image = windows // q_global.shape[0]
        kv = self.qkv(x).reshape(windows, tokens, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        q = q_global.repeat(1, windows_per_image, 1, 1, 1).reshape(windows, self.num_heads, tokens, head_dim)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(tokens, tokens, -1)
        attn = (attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(windows, tokens, channels))


class _ChannelsNorm(nn.Module):
    """DiffIR's LayerNorm: the per-token norm over channels of a (B, C, H, W) map lives in `body`."""

    def __init__(self, dim, bias_free):
        super().__init__()
        self.body = nn.Module()
        self.body.weight = nn.Parameter(torch.ones(dim))
        self.body.bias = None if bias_free else nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        variance = tokens.var(-1, keepdim=True, unbiased=False)
        centred = tokens if self.body.bias is None else tokens - tokens.mean(-1, keepdim=True)
        out = centred / torch.sqrt(variance + 1e-5) * self.body.weight
        if self.body.bias is not None:
            out = out + self.body.bias
        return out.transpose(1, 2).reshape(b, c, h, w)


def _modulated(kernel, x, prior):
    scale, shift = kernel(prior).view(-1, 2 * x.shape[1], 1, 1).chunk(2, dim=1)
    return x * scale + shift


class DiffIRAttention(RestormerAttention):
    """DiffIR's attention: Restormer's, its input first modulated by `kernel(prior)` (scale, shift)."""

    def __init__(self, dim, num_heads, bias, prior_dim):
        super().__init__(dim, num_heads, bias)
        self.kernel = nn.Sequential(nn.Linear(prior_dim, 2 * dim, bias=False))

    def forward(self, x, prior):
        return super().forward(_modulated(self.kernel, x, prior))


class DiffIRFeedForward(nn.Module):
    """DiffIR's gated depth-wise feed-forward with its own prior `kernel`."""

    def __init__(self, dim, expansion, bias, prior_dim):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, 2 * hidden, 1, bias=bias)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)
        self.kernel = nn.Sequential(nn.Linear(prior_dim, 2 * dim, bias=False))

    def forward(self, x, prior):
        gate, value = self.dwconv(self.project_in(_modulated(self.kernel, x, prior))).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class DiffIRBlock(nn.Module):
    def __init__(self, dim, heads, expansion, bias, bias_free, prior_dim):
        super().__init__()
        self.norm1 = _ChannelsNorm(dim, bias_free)
        self.attn = DiffIRAttention(dim, heads, bias, prior_dim)
        self.norm2 = _ChannelsNorm(dim, bias_free)
        self.ffn = DiffIRFeedForward(dim, expansion, bias, prior_dim)

    def forward(self, x, prior):
        x = x + self.attn(self.norm1(x), prior)
        return x + self.ffn(self.norm2(x), prior)


def _resample(channels, down):
    """DiffIR's Downsample / Upsample: a 3x3 conv to half / twice the channels, then pixel (un)shuffle."""
    module = nn.Module()
    shuffle = nn.PixelUnshuffle(2) if down else nn.PixelShuffle(2)
    width = channels // 2 if down else channels * 2
    module.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), shuffle)
    module.forward = module.body.forward
    return module


class DiffIRDIRformer(nn.Module):
    """DiffIR's stage-2 U-Net, whole (level-1 decoder, refinement and output included). `forward(image, prior)`
    returns its intermediate maps by name; the last is the restored image."""

    def __init__(self, dim, num_blocks, heads, refinement_blocks, expansion=2.66, bias=False, bias_free=False,
                 prior_dim=256):
        super().__init__()
        widths = [dim * 2**level for level in range(4)]

        def level(width, count, head):
            return nn.ModuleList(DiffIRBlock(width, head, expansion, bias, bias_free, prior_dim) for _ in range(count))

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 3, padding=1, bias=bias)
        self.encoder_level1 = level(widths[0], num_blocks[0], heads[0])
        self.down1_2 = _resample(widths[0], down=True)
        self.encoder_level2 = level(widths[1], num_blocks[1], heads[1])
        self.down2_3 = _resample(widths[1], down=True)
        self.encoder_level3 = level(widths[2], num_blocks[2], heads[2])
        self.down3_4 = _resample(widths[2], down=True)
        self.latent = level(widths[3], num_blocks[3], heads[3])
        self.up4_3 = _resample(widths[3], down=False)
        self.reduce_chan_level3 = nn.Conv2d(widths[3], widths[2], 1, bias=bias)
        self.decoder_level3 = level(widths[2], num_blocks[2], heads[2])
        self.up3_2 = _resample(widths[2], down=False)
        self.reduce_chan_level2 = nn.Conv2d(widths[2], widths[1], 1, bias=bias)
        self.decoder_level2 = level(widths[1], num_blocks[1], heads[1])
        self.up2_1 = _resample(widths[1], down=False)
        self.decoder_level1 = level(widths[1], num_blocks[0], heads[0])
        self.refinement = level(widths[1], refinement_blocks, heads[0])
        self.output = nn.Conv2d(widths[1], 3, 3, padding=1, bias=bias)

    def forward(self, image, prior):
        def run(blocks, x):
            for block in blocks:
                x = block(x, prior)
            return x

        maps = {"encoder_level1": run(self.encoder_level1, self.patch_embed.proj(image))}
        maps["encoder_level2"] = run(self.encoder_level2, self.down1_2(maps["encoder_level1"]))
        maps["encoder_level3"] = run(self.encoder_level3, self.down2_3(maps["encoder_level2"]))
        maps["latent"] = run(self.latent, self.down3_4(maps["encoder_level3"]))
        x = self.reduce_chan_level3(torch.cat([self.up4_3(maps["latent"]), maps["encoder_level3"]], 1))
        maps["decoder_level3"] = run(self.decoder_level3, x)
        x = self.reduce_chan_level2(torch.cat([self.up3_2(maps["decoder_level3"]), maps["encoder_level2"]], 1))
        maps["decoder_level2"] = run(self.decoder_level2, x)
        x = run(self.decoder_level1, torch.cat([self.up2_1(maps["decoder_level2"]), maps["encoder_level1"]], 1))
        maps["output"] = self.output(run(self.refinement, x)) + image
        return maps


class PosterWindowBranch(nn.Module):
    """The parts of POSTER++'s pyramid_trans_expr2 around its window attention, under its names, with stand-ins
    for its embeddings and ViT (`backbone_channels`: the image backbone's widths, IR-50's = `dims` by default).
    `forward(features, landmark_maps)` takes the backbones' three maps per scale and
    returns the three branch outputs channel-first, as POSTER++ computes them (one window per map)."""

    def __init__(self, dims, heads, window_sizes, backbone_channels=None):
        super().__init__()
        self.heads, self.window_sizes = heads, window_sizes
        scales = zip(dims, heads, window_sizes, backbone_channels or dims, strict=True)
        for i, (dim, head, size, channels) in enumerate(scales, 1):
            setattr(self, f"conv{i}", nn.Conv2d(channels, dim, 3, stride=2, padding=1))
            window = nn.Module()
            window.norm = nn.LayerNorm(dim)
            setattr(self, f"window{i}", window)
            setattr(self, f"attn{i}", PosterWindowAttentionGlobal(dim, head, size))
            ffn = nn.Module()
            ffn.gamma1 = nn.Parameter(torch.rand(dim))
            ffn.gamma2 = nn.Parameter(torch.rand(dim))
            ffn.mlp = nn.Module()
            ffn.mlp.fc1, ffn.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            ffn.norm = nn.LayerNorm(dim)
            setattr(self, f"ffn{i}", ffn)
        self.last_face_conv = nn.Conv2d(512, dims[2], 3, padding=1)
        self.embed_q = nn.Conv2d(dims[0], 8, 3, stride=2, padding=1)
        self.VIT = nn.Linear(8, 7)

    def forward(self, features, landmark_maps):
        outputs = []
        for i, (feature, landmark) in enumerate(zip(features, landmark_maps, strict=True), 1):
            window, attn, ffn = (getattr(self, f"{name}{i}") for name in ("window", "attn", "ffn"))
            x = getattr(self, f"conv{i}")(feature).permute(0, 2, 3, 1)
            b, h, w, c = x.shape
            shortcut = window.norm(x)
            heads = self.heads[i - 1]
            q = landmark.permute(0, 2, 3, 1).reshape(b, 1, h * w, heads, c // heads).permute(0, 1, 3, 2, 4)
            attended = attn(shortcut.reshape(b, h * w, c), q).reshape(b, h, w, c)
            x = shortcut + ffn.gamma1 * attended
            x = x + ffn.gamma2 * ffn.mlp.fc2(F.gelu(ffn.mlp.fc1(ffn.norm(x))))
            outputs.append(x.permute(0, 3, 1, 2))
        return outputs
