"""EPD-modulated LayerNorm (LLDif Eq. 2): the public op, its argument checks and its registration.

The kernels of every backend compute ``y = a[b,c] * n + e[b,c]`` with ``n`` the LayerNorm of ``x`` over
channels, and return ``dx``, ``da = sum_p g*n`` and ``de = sum_p g`` in backward. The LayerNorm affine
and the modulation are folded into ``a`` and ``e`` here, in float32 (float64 for float64 x) outside the kernels,
so autograd carries ``da`` and ``de`` back to scale, shift, weight and bias.
"""

from __future__ import annotations

import math

import torch

from .. import _extension, dispatch, reference
from .._layout import canonical, channels_and_positions
from ..profiling import nvtx_range
from ._kernels import kernels, triton_limit_reasons

OP = "modulated_layer_norm"


def _forward_like(x: torch.Tensor, a: torch.Tensor, *_: object) -> torch.Tensor:
    return torch.empty_like(canonical(x))


def _backward_like(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, *_: object) -> tuple[torch.Tensor, ...]:
    return torch.empty_like(canonical(x)), torch.empty_like(a), torch.empty_like(a)


if _extension.CPP_UNAVAILABLE is None:
    torch.library.register_fake("lldif_native::modulated_layer_norm_fwd")(_forward_like)
    torch.library.register_fake("lldif_native::modulated_layer_norm_bwd")(_backward_like)


@torch.library.custom_op("lldif_kernels::modulated_layer_norm", mutates_args=())
def _modulated_layer_norm(
    x: torch.Tensor, a: torch.Tensor, e: torch.Tensor, eps: float, bias_free: bool, backend: str
) -> torch.Tensor:
    forward, _ = kernels(OP, backend)
    with nvtx_range(f"lldif::{OP}:fwd"):
        return forward(x, a, e, eps, bias_free)


_modulated_layer_norm.register_fake(_forward_like)


@torch.library.custom_op("lldif_kernels::modulated_layer_norm_backward", mutates_args=())
def _modulated_layer_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, eps: float, bias_free: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, backward = kernels(OP, backend)
    with nvtx_range(f"lldif::{OP}:bwd"):
        return backward(dy, x, a, eps, bias_free)


_modulated_layer_norm_backward.register_fake(_backward_like)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, a, _, eps, bias_free, backend = inputs
    ctx.save_for_backward(x, a)
    ctx.eps, ctx.bias_free, ctx.backend = eps, bias_free, backend


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    x, a = ctx.saved_tensors
    dx, da, de = _modulated_layer_norm_backward(grad, x, a, ctx.eps, ctx.bias_free, ctx.backend)
    return dx, da, de, None, None, None


_modulated_layer_norm.register_autograd(_backward, setup_context=_setup_context)


def _check_args(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    bias_free: bool,
) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be (B, N, C) tokens or a (B, C, H, W) image, got shape {tuple(x.shape)}")
    batch, (channels, _) = x.shape[0], channels_and_positions(x)
    expected = {"scale": (batch, channels), "shift": (batch, channels), "weight": (channels,), "bias": (channels,)}
    given = {"x": x, "scale": scale, "shift": shift, "weight": weight, "bias": bias}
    for name, tensor in given.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} to match x of shape {tuple(x.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
    if bias_free and bias is not None:
        raise ValueError("bias must be None when bias_free=True (the BiasFree LayerNorm has no bias)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def op_reasons(backend: str, x: torch.Tensor) -> list[str]:
    """Limits of this op's kernels beyond the dispatcher's availability, device and dtype checks."""
    return triton_limit_reasons(OP, backend, x.shape[0], *channels_and_positions(x))


def modulated_layer_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    bias_free: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """scale[b,c] * LayerNorm_C(x)[b,c,...] + shift[b,c], the EPD modulation of LLDif Eq. 2.

    Args:
        x: ``(B, C, H, W)`` (contiguous or channels_last) or ``(B, N, C)`` tokens; normalised over C.
        scale, shift: ``(B, C)`` per-sample modulation (from the prior's Linear).
        weight, bias: ``(C,)`` LayerNorm affine, or None.
        eps: added to the variance.
        bias_free: Restormer's BiasFree LayerNorm, ``x / sigma * weight`` (variance still centred, no bias).
        backend: ``reference``, ``cpp``, ``cuda`` or ``triton``; default per :mod:`lldif_kernels.dispatch`.

    Returns:
        A tensor shaped, typed and laid out like ``x``.
    """
    _check_args(x, scale, shift, weight, bias, eps, bias_free)
    chosen = dispatch.select(OP, backend, (x, scale, shift, weight, bias), lambda b: op_reasons(b, x))
    if chosen == "reference":
        return reference.modulated_layer_norm(x, scale, shift, weight, bias, eps, bias_free)
    fold_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = scale.to(fold_dtype)
    a = scale if weight is None else scale * weight.to(fold_dtype)
    e = shift.to(fold_dtype) if bias is None else shift.to(fold_dtype) + scale * bias.to(fold_dtype)
    return _modulated_layer_norm(canonical(x), a.contiguous(), e.contiguous(), float(eps), bias_free, chosen)
