"""nn.Modules that own the parameters of the fused ops and call them."""

from __future__ import annotations

import torch
from torch import nn

from .ops.modulated_layer_norm import modulated_layer_norm


class ModulatedLayerNorm(nn.Module):
    """LayerNorm over channels, modulated per sample by a prior vector (LLDif Eq. 2).

    ``forward(x, z)``: ``[scale; shift] = kernel(z)`` with a bias-free ``Linear(prior_dim, 2C)`` (DiffIR's
    ``kernel``), then ``scale * LayerNorm(x) + shift``. ``x`` is ``(B, C, H, W)`` or ``(B, N, C)``, ``z`` is
    ``(B, prior_dim)``.
    """

    def __init__(
        self,
        channels: int,
        prior_dim: int = 256,
        bias_free: bool = False,
        eps: float = 1e-5,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if channels < 1 or prior_dim < 1:
            raise ValueError(f"channels and prior_dim must be >= 1, got {channels} and {prior_dim}")
        self.channels, self.bias_free, self.eps, self.backend = channels, bias_free, eps, backend
        self.kernel = nn.Linear(prior_dim, 2 * channels, bias=False)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = None if bias_free else nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        scale, shift = self.kernel(z).chunk(2, dim=1)
        return modulated_layer_norm(x, scale, shift, self.weight, self.bias, self.eps, self.bias_free,
                                    backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.channels}, prior_dim={self.kernel.in_features}, bias_free={self.bias_free}, eps={self.eps}"
