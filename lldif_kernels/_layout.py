"""Memory layouts the kernels serve, shared by every backend's launcher.

The kernels see an activation as (B, C, P): B samples, C channels, P positions (pixels or tokens).
Two dense layouts cover every supported input:

* channels-inner: the C values of one position are adjacent (channels_last NCHW, or (B, N, C) tokens);
  channel stride 1, position stride C.
* planar: each channel is a contiguous plane (contiguous NCHW); channel stride P, position stride 1.
"""

from __future__ import annotations

import torch


def canonical(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` itself when it is already in a served layout, else a contiguous copy."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def channels_inner(x: torch.Tensor) -> bool:
    """Whether a canonical ``x`` keeps the channels of a position adjacent (see module docstring)."""
    return x.dim() == 3 or (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))


def as_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``t`` (same shape as the canonical ``like``) with exactly ``like``'s strides.

    Gradients arrive in any layout (a ``sum()`` gives a stride-0 expand); the kernels index ``t`` with
    ``like``'s strides, so anything else is copied once here.
    """
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def channels_and_positions(x: torch.Tensor) -> tuple[int, int]:
    """(C, P) of a (B, N, C) or (B, C, H, W) tensor, whatever its strides."""
    if x.dim() == 3:
        return x.shape[2], x.shape[1]
    return x.shape[1], x.shape[2] * x.shape[3]


def bcp_strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(C, P, channel stride, position stride) of a canonical ``x`` seen as (B, C, P)."""
    channels, positions = channels_and_positions(x)
    if channels_inner(x):
        return channels, positions, 1, channels
    return channels, positions, positions, 1
