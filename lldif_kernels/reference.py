"""Every op in plain PyTorch: the oracle of the tests, the `eager` benchmark provider and the fallback.

Each function is written the way the model family writes it today, so that benchmarks against it
measure what a user of DiffIR / Restormer / POSTER++ would actually gain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def modulated_layer_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    bias_free: bool = False,
) -> torch.Tensor:
    """scale[b,c] * LayerNorm_C(x)[b,c,...] + shift[b,c], DiffIR-style: to tokens, normalise, modulate, back."""
    image = x.dim() == 4
    tokens = x.flatten(2).transpose(1, 2).contiguous() if image else x
    mean = tokens.mean(-1, keepdim=True)
    var = tokens.var(-1, keepdim=True, unbiased=False)
    normed = (tokens if bias_free else tokens - mean) / torch.sqrt(var + eps)
    if weight is not None:
        normed = normed * weight.to(x.dtype)
    if bias is not None:
        normed = normed + bias.to(x.dtype)
    y = normed * scale.to(x.dtype)[:, None, :] + shift.to(x.dtype)[:, None, :]
    if not image:
        return y
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return y.transpose(1, 2).reshape(x.shape).contiguous(memory_format=memory_format)


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """softmax_j(τ_h q̂_i·k̂_j) v for (B, heads, d, N) q, k, v, Restormer-style (normalise, matmul, softmax)."""
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attention = (q @ k.transpose(-2, -1)) * temperature.reshape(-1, 1, 1).to(q.dtype)
    return attention.softmax(dim=-1) @ v


def channel_attention_qkv(qkv: torch.Tensor, temperature: torch.Tensor, heads: int) -> torch.Tensor:
    """Channel attention on a packed (B, 3C, H, W) qkv, split and reshaped as Restormer's Attention does."""
    batch, _, height, width = qkv.shape
    q, k, v = (t.reshape(batch, heads, -1, height * width) for t in qkv.chunk(3, dim=1))
    return channel_attention(q, k, v, temperature).reshape(batch, -1, height, width)


def relative_position_index(window_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(M, M) table row of every (query, key) token pair of a window, Swin / POSTER++'s convention.

    ``idx(i, j) = (r_i - r_j + ws - 1)(2ws - 1) + (c_i - c_j + ws - 1)`` for token ``i = r_i·ws + c_i``.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size, device=device),
                                        torch.arange(window_size, device=device), indexing="ij")).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :] + window_size - 1
    return relative[0] * (2 * window_size - 1) + relative[1]


def window_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_table: torch.Tensor, window_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(scale·q kᵀ + B_rel) v per window and head, POSTER++-style with the M x M bias materialised.

    q is (Wq, heads, M, d) and serves W / Wq consecutive windows of the (W, heads, M, d) k, v.
    """
    windows, heads, tokens, dim = k.shape
    scale = dim**-0.5 if scale is None else scale
    bias = rel_pos_table[relative_position_index(window_size, k.device).reshape(-1)]
    bias = bias.reshape(tokens, tokens, heads).permute(2, 0, 1).to(k.dtype)
    q = q.reshape(q.shape[0], 1, heads, tokens, dim).expand(-1, windows // max(q.shape[0], 1), -1, -1, -1)
    attention = (q * scale).reshape(windows, heads, tokens, dim) @ k.transpose(-2, -1) + bias
    return attention.softmax(dim=-1) @ v


def depthwise_conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gate: bool = False
) -> torch.Tensor:
    """Restormer's 3x3 depth-wise convolution (padding 1); with ``gate``, its feed-forward gate on the result,
    ``gelu(y[:, :C/2]) * y[:, C/2:]`` (exact GELU)."""
    y = F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=1, groups=x.shape[1])
    if not gate:
        return y
    gate_half, value = y.chunk(2, dim=1)
    return F.gelu(gate_half) * value
