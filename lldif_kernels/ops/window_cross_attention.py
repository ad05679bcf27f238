"""DLNet window cross-attention with a relative-position bias (LLDif Eq. 5-7, POSTER++'s global window
attention): the public op, its checks and its registration.

``out = softmax(scale·q kᵀ + B_rel) v`` per window and head, with ``B_rel[h, i, j] = table[idx(i, j), h]``
in the Swin / POSTER++ index convention. Kernels of every backend follow the contract at the top of
``csrc/common/window_cross_attention.h``: the bias is computed from token coordinates inside the kernel and
never materialised; forward saves only the log-sum-exp of each row; backward recomputes the probabilities,
returns dq only when q needs a gradient (LLDif's landmark queries at two scales come from a frozen
network) and reduces the table gradient in a fixed order.
"""

from __future__ import annotations

import math

import torch

from .. import _extension, dispatch, reference
from ..profiling import nvtx_range
from ._kernels import accumulation_dtype, check_tensor, kernel_limit_reasons, kernels

OP = "window_cross_attention"


def _forward_like(q, k, *_: object) -> tuple[torch.Tensor, torch.Tensor]:
    return k.new_empty(k.shape), k.new_empty(k.shape[:3], dtype=accumulation_dtype(k))


def _backward_like(dout, q, k, v, table, out, lse, window_size, scale, need_dq, *_: object) -> tuple[torch.Tensor, ...]:
    dq = q.new_empty(q.shape) if need_dq else q.new_empty(0)
    return dq, k.new_empty(k.shape), k.new_empty(k.shape), table.new_empty(table.shape)


if _extension.CPP_UNAVAILABLE is None:
    torch.library.register_fake("lldif_native::window_cross_attention_fwd")(_forward_like)
    torch.library.register_fake("lldif_native::window_cross_attention_bwd")(_backward_like)


@torch.library.custom_op("lldif_kernels::window_cross_attention", mutates_args=())
def _window_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, window_size: int, scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    forward, _ = kernels(OP, backend)
    with nvtx_range(f"lldif::{OP}:fwd"):
        return forward(q, k, v, table, window_size, scale)


_window_cross_attention.register_fake(_forward_like)


@torch.library.custom_op("lldif_kernels::window_cross_attention_backward", mutates_args=())
def _window_cross_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, window_size: int, scale: float, need_dq: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, backward = kernels(OP, backend)
    # Gradients often arrive as stride-0 expands or in another dtype; the kernels take dout like out.
    dout = dout.to(out.dtype).contiguous()
    with nvtx_range(f"lldif::{OP}:bwd"):
        return backward(dout, q, k, v, table, out, lse, window_size, scale, need_dq)


_window_cross_attention_backward.register_fake(_backward_like)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, table, window_size, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, table, out, lse)
    ctx.window_size, ctx.scale, ctx.backend = window_size, scale, backend


def _backward(ctx, grad, _grad_lse) -> tuple:
    q, k, v, table, out, lse = ctx.saved_tensors
    need_dq = ctx.needs_input_grad[0]
    dq, dk, dv, dtable = _window_cross_attention_backward(grad, q, k, v, table, out, lse, ctx.window_size,
                                                          ctx.scale, need_dq, ctx.backend)
    return dq if need_dq else None, dk, dv, dtable, None, None, None


_window_cross_attention.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q: object, k: object, v: object, table: object, window_size: object, scale: object) -> float:
    """Raises naming the first bad argument; returns the scale to use."""
    check_tensor("k", k)
    if k.dim() != 4 or 0 in k.shape[1:]:
        raise ValueError(f"k must be (windows, heads, M, d) with heads, M, d >= 1, got shape {tuple(k.shape)}")
    windows, heads, tokens, dim = k.shape
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be an int >= 1, got {window_size!r}")
    if tokens != window_size**2:
        raise ValueError(f"k has M={tokens} tokens per window, but window_size={window_size} needs "
                         f"M = window_size² = {window_size**2}")
    for name, t in (("q", q), ("v", v)):
        check_tensor(name, t, ("k", k))
        if t.dtype != k.dtype:
            raise TypeError(f"{name} must have k's dtype {k.dtype}, got {t.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.dim() != 4 or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q must be (Wq, heads, M, d) with k's heads, M, d = {heads}, {tokens}, {dim}, "
                         f"got shape {tuple(q.shape)}")
    query_windows = q.shape[0]
    if (query_windows == 0) != (windows == 0) or (query_windows and windows % query_windows):
        raise ValueError(f"q's {query_windows} windows must divide k's {windows} windows (one query per image "
                         f"serves that image's windows)")
    check_tensor("rel_pos_table", table, ("k", k))
    rows = (2 * window_size - 1) ** 2
    if tuple(table.shape) != (rows, heads):
        raise ValueError(f"rel_pos_table must be ((2·window_size-1)², heads) = ({rows}, {heads}), "
                         f"got {tuple(table.shape)}")
    if scale is None:
        return dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


# The CUDA kernels keep a tile's head dimension on chip.
CUDA_MAX_HEAD_DIM = 128


def op_reasons(backend: str, windows: int, heads: int, tokens: int, dim: int) -> list[str]:
    """Limits of this op's kernels beyond the dispatcher's availability, device and dtype checks."""
    return kernel_limit_reasons(OP, backend, dim, CUDA_MAX_HEAD_DIM, windows, heads, tokens, dim)


def _channel_stride_one(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def window_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_table: torch.Tensor, window_size: int,
    scale: float | None = None, *, backend: str | None = None,
) -> torch.Tensor:
    """Window cross-attention with a relative-position bias: ``softmax(scale·q kᵀ + B_rel) v``.

    Args:
        q: ``(Wq, heads, M, d)`` queries. ``Wq`` divides the number of windows W: window ``w`` attends with
            ``q[w // (W // Wq)]``, so a query given once per image serves all of that image's (consecutive)
            windows without a copy, as POSTER++'s global query does.
        k, v: ``(W, heads, M, d)`` with ``M = window_size²``; any strides (views of one kv projection are
            read in place when their channel stride is 1).
        rel_pos_table: ``((2·window_size - 1)², heads)``; ``B_rel[h, i, j] = rel_pos_table[idx(i, j), h]``
            with ``idx(i, j) = (r_i - r_j + ws - 1)(2ws - 1) + (c_i - c_j + ws - 1)`` for token
            ``i = r_i·ws + c_i``, the Swin / POSTER++ convention.
        window_size: ws, the side of a square window.
        scale: the logit scale, default ``d**-0.5``.
        backend: ``reference``, ``cpp``, ``cuda`` or ``triton``; default per :mod:`lldif_kernels.dispatch`.

    Returns:
        ``(W, heads, M, d)`` in k's dtype, accumulated in float32 (float64 for float64 inputs). The fused
        backends never form the M x M bias or probabilities; a row whose logits are all -inf gives 0.
    """
    scale = _check_inputs(q, k, v, rel_pos_table, window_size, scale)
    windows, heads, tokens, dim = k.shape
    chosen = dispatch.select(OP, backend, (q, k, v, rel_pos_table),
                             lambda b: op_reasons(b, windows, heads, tokens, dim))
    if chosen == "reference":
        return reference.window_cross_attention(q, k, v, rel_pos_table, window_size, scale)
    table = rel_pos_table.to(accumulation_dtype(k)).contiguous()
    q, k, v = (_channel_stride_one(t) for t in (q, k, v))
    return _window_cross_attention(q, k, v, table, window_size, scale, chosen)[0]
