"""DMNet transposed (channel) attention (LLDif Eq. 3, Restormer's MDTA core): the public ops, their checks
and their registration.

``out[b,h] = softmax_j(τ_h q̂_i·k̂_j) v`` with q̂, k̂ the rows of q, k normalised over the N positions, so the
attention matrix is d x d per head. Kernels of every backend follow the contract at the top of
``csrc/common/channel_attention.h``: forward returns the output and what backward needs (the d x d cosine
matrix and the clamped norms, never a d x N temporary); backward writes dq, dk, dv into the tensors it is
given, so the packed variant gets one (B, 3C, H, W) gradient without a concatenation, and returns dτ per
(sample, head), summed here in a fixed order.
"""

from __future__ import annotations

import torch

from .. import _extension, dispatch, reference
from ..profiling import nvtx_range
from ._kernels import accumulation_dtype, check_tensor, kernel_limit_reasons, kernels

OP = "channel_attention"


def _stats_like(x: torch.Tensor, batch: int, heads: int, dim: int) -> tuple[torch.Tensor, ...]:
    """Empty cosine (B, heads, d, d), q_norm and k_norm (B, heads, d), as the forward kernels return them."""
    dtype = accumulation_dtype(x)
    return (x.new_empty((batch, heads, dim, dim), dtype=dtype), x.new_empty((batch, heads, dim), dtype=dtype),
            x.new_empty((batch, heads, dim), dtype=dtype))


def _forward_like(q: torch.Tensor, *_: object) -> tuple[torch.Tensor, ...]:
    return q.new_empty(q.shape), *_stats_like(q, *q.shape[:3])


def _backward_like(dout: torch.Tensor, q: torch.Tensor, *_: object) -> torch.Tensor:
    return q.new_empty(q.shape[:2], dtype=accumulation_dtype(q))


if _extension.CPP_UNAVAILABLE is None:
    torch.library.register_fake("lldif_native::channel_attention_fwd")(_forward_like)
    torch.library.register_fake("lldif_native::channel_attention_bwd")(_backward_like)


def _run_forward(q, k, v, temperature, backend) -> tuple[torch.Tensor, ...]:
    forward, _ = kernels(OP, backend)
    with nvtx_range(f"lldif::{OP}:fwd"):
        return forward(q, k, v, temperature)


def _run_backward(dout, q, k, v, temperature, cosine, q_norm, k_norm, grads, backend) -> torch.Tensor:
    """Writes dq, dk, dv into ``grads``; returns dτ (heads,), summed over samples in a fixed order."""
    _, backward = kernels(OP, backend)
    with nvtx_range(f"lldif::{OP}:bwd"):
        return backward(dout, q, k, v, temperature, cosine, q_norm, k_norm, *grads).sum(0)


def _split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """Views q, k, v (B, heads, d, N) of a contiguous packed (B, 3C, H, W) tensor."""
    batch, channels3, height, width = qkv.shape
    return qkv.view(batch, 3, heads, channels3 // (3 * heads), height * width).unbind(1)


# The unpacked op: q, k, v given separately.


@torch.library.custom_op("lldif_kernels::channel_attention", mutates_args=())
def _channel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run_forward(q, k, v, temperature, backend)


_channel_attention.register_fake(_forward_like)


@torch.library.custom_op("lldif_kernels::channel_attention_backward", mutates_args=())
def _channel_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
    cosine: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = tuple(q.new_empty(q.shape) for _ in range(3))
    dtemperature = _run_backward(dout, q, k, v, temperature, cosine, q_norm, k_norm, grads, backend)
    return (*grads, dtemperature)


@_channel_attention_backward.register_fake
def _(dout, q, *_):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(
        q.shape[1], dtype=accumulation_dtype(q))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, temperature, backend = inputs
    _, cosine, q_norm, k_norm = output
    ctx.mark_non_differentiable(cosine, q_norm, k_norm)
    ctx.save_for_backward(q, k, v, temperature, cosine, q_norm, k_norm)
    ctx.backend = backend


def _backward(ctx, grad, *_unused) -> tuple:
    dq, dk, dv, dtemperature = _channel_attention_backward(grad, *ctx.saved_tensors, ctx.backend)
    return dq, dk, dv, dtemperature, None


_channel_attention.register_autograd(_backward, setup_context=_setup_context)


# The packed op: one (B, 3C, H, W) qkv, as the depth-wise conv writes it; its gradient is one tensor too.


@torch.library.custom_op("lldif_kernels::channel_attention_qkv", mutates_args=())
def _channel_attention_qkv(
    qkv: torch.Tensor, temperature: torch.Tensor, heads: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, *stats = _run_forward(*_split_qkv(qkv, heads), temperature, backend)
    batch, channels3, height, width = qkv.shape
    return (out.view(batch, channels3 // 3, height, width), *stats)


@_channel_attention_qkv.register_fake
def _(qkv, temperature, heads, backend):
    batch, channels3, height, width = qkv.shape
    out = qkv.new_empty((batch, channels3 // 3, height, width))
    return out, *_stats_like(qkv, batch, heads, channels3 // (3 * heads))


@torch.library.custom_op("lldif_kernels::channel_attention_qkv_backward", mutates_args=())
def _channel_attention_qkv_backward(
    dout: torch.Tensor, qkv: torch.Tensor, temperature: torch.Tensor, cosine: torch.Tensor, q_norm: torch.Tensor,
    k_norm: torch.Tensor, heads: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _split_qkv(qkv, heads)
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    dtemperature = _run_backward(dout.reshape(q.shape), q, k, v, temperature, cosine, q_norm, k_norm,
                                 _split_qkv(dqkv, heads), backend)
    return dqkv, dtemperature


@_channel_attention_qkv_backward.register_fake
def _(dout, qkv, temperature, *_):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), temperature.new_empty(temperature.shape)


def _setup_context_qkv(ctx, inputs, output) -> None:
    qkv, temperature, heads, backend = inputs
    _, cosine, q_norm, k_norm = output
    ctx.mark_non_differentiable(cosine, q_norm, k_norm)
    ctx.save_for_backward(qkv, temperature, cosine, q_norm, k_norm)
    ctx.heads, ctx.backend = heads, backend


def _backward_qkv(ctx, grad, *_unused) -> tuple:
    dqkv, dtemperature = _channel_attention_qkv_backward(grad, *ctx.saved_tensors, ctx.heads, ctx.backend)
    return dqkv, dtemperature, None, None


_channel_attention_qkv.register_autograd(_backward_qkv, setup_context=_setup_context_qkv)


# Public functions.


def _check_temperature(temperature: object, heads: int, like: tuple[str, torch.Tensor]) -> torch.Tensor:
    check_tensor("temperature", temperature, like)
    if tuple(temperature.shape) not in ((heads,), (heads, 1, 1)):
        raise ValueError(f"temperature must be (heads,) or (heads, 1, 1) with heads={heads}, "
                         f"got {tuple(temperature.shape)}")
    return temperature


def _check_qkv(q: object, k: object, v: object) -> None:
    check_tensor("q", q)
    if q.dim() != 4 or q.shape[1] == 0 or q.shape[2] == 0:
        raise ValueError(f"q must be (B, heads, d, N) with heads, d >= 1, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ("q", q))
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")


# The CUDA kernels keep a head's d x d matrices on chip (kMaxDim in csrc/cuda/channel_attention.cu).
CUDA_MAX_HEAD_DIM = 128


def op_reasons(backend: str, batch: int, heads: int, dim: int, positions: int) -> list[str]:
    """Limits of this op's kernels beyond the dispatcher's availability, device and dtype checks."""
    return kernel_limit_reasons(OP, backend, dim, CUDA_MAX_HEAD_DIM, batch, heads, dim, positions)


def _kernel_temperature(temperature: torch.Tensor, heads: int, like: torch.Tensor) -> torch.Tensor:
    """(heads,) in the kernels' accumulation dtype; autograd carries dτ back through the reshape and cast."""
    return temperature.reshape(heads).to(accumulation_dtype(like)).contiguous()


def channel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Transposed (channel) attention: ``softmax_j(τ_h q̂_i·k̂_j) v`` per sample and head.

    Args:
        q, k, v: ``(B, heads, d, N)``: d channels per head, N = H·W positions; one floating dtype.
        temperature: τ, ``(heads,)`` or Restormer's ``(heads, 1, 1)`` parameter.
        backend: ``reference``, ``cpp``, ``cuda`` or ``triton``; default per :mod:`lldif_kernels.dispatch`.

    Returns:
        ``(B, heads, d, N)`` in q's dtype. q̂, k̂ are q, k normalised over N as ``F.normalize`` does (norms
        clamped at 1e-12); the softmax runs over the key channels j, accumulated in float32 (float64 for
        float64 inputs).
    """
    _check_qkv(q, k, v)
    batch, heads, dim, positions = q.shape
    _check_temperature(temperature, heads, ("q", q))
    chosen = dispatch.select(OP, backend, (q, k, v, temperature),
                             lambda b: op_reasons(b, batch, heads, dim, positions))
    if chosen == "reference":
        return reference.channel_attention(q, k, v, temperature)
    # The kernels read positions with stride 1 and one set of strides for q, k and v.
    if q.stride(-1) != 1 or k.stride() != q.stride() or v.stride() != q.stride():
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _channel_attention(q, k, v, _kernel_temperature(temperature, heads, q), chosen)[0]


def channel_attention_qkv(
    qkv: torch.Tensor, temperature: torch.Tensor, heads: int, *, backend: str | None = None
) -> torch.Tensor:
    """:func:`channel_attention` on the packed ``(B, 3C, H, W)`` output of Restormer's qkv depth-wise conv.

    q, k, v are read in place as channels ``[0, C)``, ``[C, 2C)``, ``[2C, 3C)``, each split into ``heads``
    groups of ``d = C / heads``, exactly as Restormer's ``Attention`` reshapes them. Returns ``(B, C, H, W)``;
    the gradient of ``qkv`` is one contiguous tensor.
    """
    check_tensor("qkv", qkv)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {heads!r}")
    if qkv.dim() != 4 or qkv.shape[1] == 0 or qkv.shape[1] % (3 * heads):
        raise ValueError(f"qkv must be (B, 3C, H, W) with C a multiple of heads={heads}, got {tuple(qkv.shape)}")
    _check_temperature(temperature, heads, ("qkv", qkv))
    batch, channels3, height, width = qkv.shape
    chosen = dispatch.select(OP, backend, (qkv, temperature),
                             lambda b: op_reasons(b, batch, heads, channels3 // (3 * heads), height * width))
    if chosen == "reference":
        return reference.channel_attention_qkv(qkv, temperature, heads)
    return _channel_attention_qkv(qkv.contiguous(), _kernel_temperature(temperature, heads, qkv), heads, chosen)[0]
