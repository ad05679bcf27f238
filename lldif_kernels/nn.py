"""nn.Modules that own the parameters of the fused ops and call them."""

from __future__ import annotations

import torch
from torch import nn

from .ops.channel_attention import channel_attention_qkv
from .ops.depthwise_conv3x3 import depthwise_conv3x3
from .ops.modulated_layer_norm import modulated_layer_norm
from .ops.window_cross_attention import window_cross_attention
from .reference import relative_position_index

MODULATIONS = ("diffir", "adaln")


def _head_count(heads: int | None, num_heads: int | None) -> int:
    """`heads`, or the peers' name for it, `num_heads`; exactly one of them (or two equal values)."""
    if heads is None and num_heads is None:
        raise TypeError("heads (or num_heads) is required")
    if heads is not None and num_heads is not None and heads != num_heads:
        raise ValueError(f"heads={heads} and num_heads={num_heads} disagree; give one of them")
    return heads if heads is not None else num_heads


class ModulatedLayerNorm(nn.Module):
    """LayerNorm over channels, modulated per sample by a prior vector (LLDif Eq. 2).

    ``forward(x, z)``: ``[s; h] = kernel(z)`` with a bias-free ``Linear(prior_dim, 2C)`` (DiffIR's ``kernel``),
    then, with ``modulation="diffir"``, DiffIR's ``s * LayerNorm(x) + h``; with ``modulation="adaln"``,
    ``(1 + s) * LayerNorm(x) + h`` with ``kernel`` zero-initialised (AdaLN-Zero): the layer starts as a plain
    LayerNorm whatever the prior's scale, instead of scaling its output by ``kernel(z)`` ≈ 0. ``x`` is
    ``(B, C, H, W)`` or ``(B, N, C)``, ``z`` is ``(B, prior_dim)``.
    """

    def __init__(
        self,
        channels: int,
        prior_dim: int = 256,
        bias_free: bool = False,
        eps: float = 1e-5,
        backend: str | None = None,
        modulation: str = "diffir",
    ) -> None:
        super().__init__()
        if channels < 1 or prior_dim < 1:
            raise ValueError(f"channels and prior_dim must be >= 1, got {channels} and {prior_dim}")
        if modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {', '.join(MODULATIONS)}, got {modulation!r}")
        self.channels, self.bias_free, self.eps, self.backend = channels, bias_free, eps, backend
        self.modulation = modulation
        self.kernel = nn.Linear(prior_dim, 2 * channels, bias=False)
        if modulation == "adaln":
            nn.init.zeros_(self.kernel.weight)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = None if bias_free else nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        scale, shift = self.kernel(z).chunk(2, dim=1)
        if self.modulation == "adaln":
            scale = scale + 1
        return modulated_layer_norm(x, scale, shift, self.weight, self.bias, self.eps, self.bias_free,
                                    backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.channels}, prior_dim={self.kernel.in_features}, bias_free={self.bias_free}, eps={self.eps}, "
                f"modulation={self.modulation}")


class TransposedAttention(nn.Module):
    """Restormer's multi-Dconv head transposed attention (LLDif's DMNet, Eq. 3) on the fused op.

    1x1 conv to q, k, v, a 3x3 depth-wise conv, attention across the ``dim / heads`` channels of each head,
    and a 1x1 output projection. Parameter names and shapes are those of Restormer's ``Attention``
    (``temperature``, ``qkv``, ``qkv_dwconv``, ``project_out``), so its state dicts load unchanged, and its
    constructor's ``(dim, num_heads, bias)`` works here as written, positionally or with ``num_heads=``.
    ``forward(x)`` maps ``(B, dim, H, W)`` to ``(B, dim, H, W)``.
    """

    def __init__(self, dim: int, heads: int | None = None, bias: bool = False, backend: str | None = None, *,
                 num_heads: int | None = None) -> None:
        super().__init__()
        heads = _head_count(heads, num_heads)
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"dim must be a positive multiple of heads, got dim={dim}, heads={heads}")
        self.heads, self.backend = heads, backend
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = depthwise_conv3x3(self.qkv(x), self.qkv_dwconv.weight, self.qkv_dwconv.bias, backend=self.backend)
        return self.project_out(channel_attention_qkv(qkv, self.temperature, self.heads, backend=self.backend))

    def extra_repr(self) -> str:
        return f"dim={self.project_out.in_channels}, heads={self.heads}"


class GatedDepthwiseFeedForward(nn.Module):
    """Restormer's gated depth-wise feed-forward network (LLDif's DGNet, Eq. 4) on the fused op.

    A 1x1 conv to ``2 * hidden`` channels, the 3x3 depth-wise conv and the GELU gate in one op
    (``gelu(first half) * second half``), and a 1x1 conv back to ``dim``, ``hidden = int(dim * ffn_expansion)``.
    Parameter names and shapes are those of Restormer's ``FeedForward`` (``project_in``, ``dwconv``,
    ``project_out``), and so is its constructor's ``(dim, ffn_expansion_factor, bias)``.
    """

    def __init__(self, dim: int, ffn_expansion: float, bias: bool = False, backend: str | None = None) -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion)
        if hidden < 1:
            raise ValueError(f"dim * ffn_expansion must be >= 1, got dim={dim}, ffn_expansion={ffn_expansion}")
        self.backend = backend
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = depthwise_conv3x3(self.project_in(x), self.dwconv.weight, self.dwconv.bias, gate=True,
                                   backend=self.backend)
        return self.project_out(hidden)


class WindowCrossAttention(nn.Module):
    """POSTER++'s global window attention (LLDif's DLNet attention, Eq. 5-7) on the fused op.

    Keys and values come from the image tokens through one ``Linear(dim, 2·dim)``; the queries are given
    (LLDif: landmark features), once per image, and serve all of that image's windows. Then attention with
    a learned relative-position bias and an output ``Linear(dim, dim)``. Parameter and buffer names are
    POSTER++'s (``qkv`` for the key/value projection, as POSTER++ calls it although it makes no queries,
    ``proj``, ``relative_position_bias_table``, ``relative_position_index``), so its state dicts load
    unchanged.

    Everything after ``dim`` is keyword-only: POSTER++'s positional order ``(dim, num_heads, window_size)`` is
    not ours, and a positional call in either order would silently build the other module. POSTER++'s keywords
    (``num_heads``, ``attn_drop=0``, ``proj_drop=0``) are accepted.

    ``forward(x, q_global)``: ``x`` is ``(B·n_windows, M, dim)`` window tokens with ``M = window_size²``;
    ``q_global`` is ``(B, heads, M, dim / heads)`` or POSTER++'s ``(B, 1, heads, M, dim / heads)``.
    Returns ``(B·n_windows, M, dim)``.
    """

    def __init__(
        self, dim: int, *, window_size: int, heads: int | None = None, qkv_bias: bool = True,
        qk_scale: float | None = None, backend: str | None = None, num_heads: int | None = None,
        attn_drop: float = 0.0, proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        heads = _head_count(heads, num_heads)
        for name, rate in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if rate != 0:
                raise ValueError(f"{name} must be 0 (POSTER++ trains with 0; the fused op has no dropout), got {rate}")
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"dim must be a positive multiple of heads, got dim={dim}, heads={heads}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.dim, self.window_size, self.heads, self.backend = dim, window_size, heads, backend
        self.scale = qk_scale or (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, q_global: torch.Tensor) -> torch.Tensor:
        tokens, dim, head_dim = self.window_size**2, self.dim, self.dim // self.heads
        if x.dim() != 3 or tuple(x.shape[1:]) != (tokens, dim):
            raise ValueError(f"x must be (B·n_windows, {tokens}, {dim}) window tokens, got {tuple(x.shape)}")
        windows, query = x.shape[0], (self.heads, tokens, head_dim)
        images = q_global.shape[0] if q_global.dim() else 0
        if (tuple(q_global.shape[-3:]) != query or q_global.shape[1:-3] not in ((), (1,))
                or (images == 0) != (windows == 0) or (images and windows % images)):
            shape = ", ".join(map(str, query))
            raise ValueError(f"q_global must be (B, {shape}) or POSTER++'s (B, 1, {shape}) with B dividing x's "
                             f"{windows} windows, got {tuple(q_global.shape)}")
        # Views of the projection: channel stride 1, read in place by the kernels.
        k, v = self.qkv(x).view(windows, tokens, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = q_global.reshape(q_global.shape[0], self.heads, tokens, head_dim)
        out = window_cross_attention(q, k, v, self.relative_position_bias_table, self.window_size, self.scale,
                                     backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(windows, tokens, dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, heads={self.heads}"
