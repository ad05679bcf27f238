"""Every op in plain PyTorch: the oracle of the tests, the `eager` benchmark provider and the fallback.

Each function is written the way the model family writes it today, so that benchmarks against it
measure what a user of DiffIR / Restormer / POSTER++ would actually gain.
"""

from __future__ import annotations

import torch


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
    q = torch.nn.functional.normalize(q, dim=-1)
    k = torch.nn.functional.normalize(k, dim=-1)
    attention = (q @ k.transpose(-2, -1)) * temperature.reshape(-1, 1, 1).to(q.dtype)
    return attention.softmax(dim=-1) @ v


def channel_attention_qkv(qkv: torch.Tensor, temperature: torch.Tensor, heads: int) -> torch.Tensor:
    """Channel attention on a packed (B, 3C, H, W) qkv, split and reshaped as Restormer's Attention does."""
    batch, _, height, width = qkv.shape
    q, k, v = (t.reshape(batch, heads, -1, height * width) for t in qkv.chunk(3, dim=1))
    return channel_attention(q, k, v, temperature).reshape(batch, -1, height, width)
