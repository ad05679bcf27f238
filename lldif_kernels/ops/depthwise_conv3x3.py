"""Depth-wise 3x3 convolution with Restormer's optional GELU gate (LLDif Eq. 3-4): the public op, its argument
checks and its registration.

``gate=False`` is the convolution of the attention's qkv path; ``gate=True`` is the feed-forward's
``gelu(y[:, :C/2]) * y[:, C/2:]`` on the convolution's output ``y``, which the kernels never store: the forward
writes half the channels, and the backward recomputes ``y`` from ``x``.
"""

from __future__ import annotations

import torch

from .. import _extension, dispatch, reference
from .._layout import canonical, channels_inner
from ..profiling import nvtx_range
from ._kernels import check_tensor, kernels, triton_limit_reasons

OP = "depthwise_conv3x3"


def _output_like(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: bool) -> torch.Tensor:
    x = canonical(x)
    batch, channels, height, width = x.shape
    memory_format = torch.channels_last if channels_inner(x) else torch.contiguous_format
    return x.new_empty((batch, channels // 2 if gate else channels, height, width)).contiguous(
        memory_format=memory_format)


def _native_backward_like(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(canonical(x)), torch.empty_like(weight), weight.new_empty(weight.shape[0])


if _extension.CPP_UNAVAILABLE is None:
    torch.library.register_fake(f"lldif_native::{OP}_fwd")(_output_like)
    torch.library.register_fake(f"lldif_native::{OP}_bwd")(_native_backward_like)


@torch.library.custom_op(f"lldif_kernels::{OP}", mutates_args=())
def _depthwise_conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: bool, backend: str
) -> torch.Tensor:
    forward, _ = kernels(OP, backend)
    with nvtx_range(f"lldif::{OP}:fwd"):
        return forward(x, weight, bias, gate)


@_depthwise_conv3x3.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: bool, backend: str) -> torch.Tensor:
    return _output_like(x, weight, bias, gate)


@torch.library.custom_op(f"lldif_kernels::{OP}_backward", mutates_args=())
def _depthwise_conv3x3_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, backward = kernels(OP, backend)
    with nvtx_range(f"lldif::{OP}:bwd"):
        return backward(dy, x, weight, bias, gate)


@_depthwise_conv3x3_backward.register_fake
def _(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _native_backward_like(dy, x, weight, bias, gate)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, gate, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.gate, ctx.backend = gate, backend


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _depthwise_conv3x3_backward(grad, x, weight, bias, ctx.gate, ctx.backend)
    return dx, dweight, None if bias is None else dbias, None, None


_depthwise_conv3x3.register_autograd(_backward, setup_context=_setup_context)


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: bool) -> None:
    check_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) image, got shape {tuple(x.shape)}")
    channels = x.shape[1]
    check_tensor("weight", weight, ("x", x))
    if tuple(weight.shape) != (channels, 1, 3, 3):
        raise ValueError(f"weight must be (C, 1, 3, 3) = ({channels}, 1, 3, 3), a depth-wise 3x3 kernel per channel "
                         f"of x, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ("x", x))
        if tuple(bias.shape) != (channels,):
            raise ValueError(f"bias must be (C,) = ({channels},), got {tuple(bias.shape)}")
    if not isinstance(gate, bool):
        raise TypeError(f"gate must be a bool, got {type(gate).__name__}")
    if gate and channels % 2:
        raise ValueError(f"gate=True needs an even number of channels in x (gelu of the first half times the second), "
                         f"got C={channels}")


def op_reasons(backend: str, x: torch.Tensor) -> list[str]:
    """Limits of this op's kernels beyond the dispatcher's availability, device and dtype checks."""
    return triton_limit_reasons(OP, backend, *x.shape)


def depthwise_conv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gate: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1, groups=C)``, then with ``gate`` Restormer's GELU gate
    ``gelu(y[:, :C/2]) * y[:, C/2:]`` (exact GELU), in one pass over ``x``.

    Args:
        x: ``(B, C, H, W)``, contiguous or channels_last.
        weight: ``(C, 1, 3, 3)``, an ``nn.Conv2d(C, C, 3, padding=1, groups=C)``'s weight.
        bias: ``(C,)`` or None.
        gate: apply the feed-forward gate; C must be even.
        backend: ``reference``, ``cpp``, ``cuda`` or ``triton``; default per :mod:`lldif_kernels.dispatch`.

    Returns:
        ``(B, C, H, W)``, or ``(B, C/2, H, W)`` with ``gate``, in x's dtype and memory format. The weight and bias
        are used in x's dtype (as autocast would), and the convolution accumulates in float32 (float64 for
        float64 x).
    """
    _check_args(x, weight, bias, gate)
    chosen = dispatch.select(OP, backend, (x, weight, bias), lambda b: op_reasons(b, x))
    if chosen == "reference":
        return reference.depthwise_conv3x3(x, weight, bias, gate)
    bias = None if bias is None else bias.to(x.dtype)
    return _depthwise_conv3x3(canonical(x), weight.to(x.dtype), bias, gate, chosen)
