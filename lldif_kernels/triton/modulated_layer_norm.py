"""EPD-modulated LayerNorm: y = a * (x - mean_c x) / sqrt(var_c x + eps) + e, normalised over channels.

The kernels see x as (B, C, P) (see ``lldif_kernels._layout``). One program owns every channel of BLOCK_P
positions of one sample, so the channel statistics never leave registers. Forward saves nothing: backward
recomputes the statistics, one more read of x instead of two (B, P) buffers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lldif_kernels._layout import as_layout_of, bcp_strides, canonical

# All channels of a position share one tile; at C = 8192 the backward spills registers even with 16 warps.
MAX_CHANNELS = 4096
# Tile size that keeps the backward's live tiles in registers at the chosen warp counts.
_TILE_ELEMENTS = 4096
# CUDA caps grid axis 1 (the batch) at 2**16 - 1.
_MAX_BATCH = 65535
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _tile(C, P, channel_stride, position_stride, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's sample, its channel indices and mask, and the tile's mask and in-sample offsets."""
    # B * C * P may pass 2**31, so the sample (the base of its pointers) is int64; offsets inside one sample
    # stay int32.
    sample = tl.program_id(1).to(tl.int64)
    channels = tl.arange(0, BLOCK_C)
    positions = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    channel_mask = channels < C
    mask = channel_mask[:, None] & (positions < P)[None, :]
    offsets = channels[:, None] * channel_stride + positions[None, :] * position_stride
    return sample, channels, channel_mask, mask, offsets


@triton.jit
def _normalise(x_ptr, offsets, mask, C, eps, BIAS_FREE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(x - mean, 1 / std, n) of a [BLOCK_C, BLOCK_P] tile; padding lanes of x - mean are 0."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    mean = tl.sum(x, axis=0) / C
    # Centred two-pass variance: E[x^2] - mean^2 cancels catastrophically for large means.
    centred = tl.where(mask, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / C + eps)
    normalised = (x if BIAS_FREE else centred) * rstd[None, :]
    return centred, rstd, normalised


@triton.jit
def _mln_fwd_kernel(
    x_ptr, a_ptr, e_ptr, y_ptr,
    C, P, channel_stride, position_stride, eps,
    BIAS_FREE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    sample, channels, channel_mask, mask, offsets = _tile(C, P, channel_stride, position_stride, BLOCK_C, BLOCK_P)
    x_ptr += sample * C * P
    y_ptr += sample * C * P

    _, _, normalised = _normalise(x_ptr, offsets, mask, C, eps, BIAS_FREE, ACC_DTYPE)
    scale = tl.load(a_ptr + sample * C + channels, mask=channel_mask, other=0.0).to(ACC_DTYPE)
    shift = tl.load(e_ptr + sample * C + channels, mask=channel_mask, other=0.0).to(ACC_DTYPE)
    y = scale[:, None] * normalised + shift[:, None]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mln_bwd_kernel(
    dy_ptr, x_ptr, a_ptr, dx_ptr, da_partial_ptr, de_partial_ptr,
    C, P, channel_stride, position_stride, eps,
    BIAS_FREE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    sample, channels, channel_mask, mask, offsets = _tile(C, P, channel_stride, position_stride, BLOCK_C, BLOCK_P)
    x_ptr += sample * C * P
    dy_ptr += sample * C * P
    dx_ptr += sample * C * P

    centred, rstd, normalised = _normalise(x_ptr, offsets, mask, C, eps, BIAS_FREE, ACC_DTYPE)
    grad = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    scale = tl.load(a_ptr + sample * C + channels, mask=channel_mask, other=0.0).to(ACC_DTYPE)
    grad_normalised = scale[:, None] * grad
    mean_grad_dot_n = tl.sum(grad_normalised * normalised, axis=0) / C
    correction = centred * rstd[None, :] * mean_grad_dot_n[None, :]
    if not BIAS_FREE:
        correction += tl.sum(grad_normalised, axis=0)[None, :] / C
    dx = rstd[None, :] * (grad_normalised - correction)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    # Per-program partial sums reduced by the launcher keep da/de deterministic (no atomics). Padding
    # positions can hold 0 * inf when eps == 0, so they are dropped explicitly rather than trusted to be 0.
    partial_offsets = (sample * tl.num_programs(0) + tl.program_id(0)) * C + channels
    da_partial = tl.sum(tl.where(mask, grad * normalised, 0.0), axis=1)
    tl.store(da_partial_ptr + partial_offsets, da_partial, mask=channel_mask)
    tl.store(de_partial_ptr + partial_offsets, tl.sum(grad, axis=1), mask=channel_mask)


def _launch_config(channels: int, positions: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps): all channels in one tile of about _TILE_ELEMENTS elements."""
    block_c = triton.next_power_of_2(channels)
    block_p = min(max(_TILE_ELEMENTS // block_c, 1), triton.next_power_of_2(positions))
    tile = block_c * block_p
    num_warps = 4 if tile <= 2048 else 8
    return block_c, block_p, num_warps


def _accumulator_dtype(x: torch.Tensor) -> tl.dtype:
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def limit_reasons(batch: int, channels: int, positions: int) -> list[str]:
    """Why these kernels cannot serve a (batch, channels, positions) problem (empty when they can)."""
    reasons = []
    if channels > MAX_CHANNELS:
        reasons.append(f"C={channels} exceeds the Triton kernel's limit of {MAX_CHANNELS} channels")
    if channels * positions >= 2**31:
        reasons.append(f"one sample of {channels} x {positions} elements exceeds the kernels' int32 offsets")
    if batch > _MAX_BATCH:
        reasons.append(f"batch {batch} exceeds the CUDA grid limit of {_MAX_BATCH}")
    return reasons


def _validate(x: torch.Tensor, *per_channel: torch.Tensor) -> tuple[int, int, int, int]:
    """Check x and the (B, C) tensors; return ``bcp_strides(x)``."""
    if x.dim() not in (3, 4) or x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x must be a rank 3 or 4 float tensor, got {tuple(x.shape)} {x.dtype}")
    if canonical(x) is not x:
        raise ValueError(f"x must be in a canonical layout (lldif_kernels._layout), got strides {x.stride()}")
    channels, positions, channel_stride, position_stride = bcp_strides(x)
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    for t in per_channel:
        if t.shape != (x.shape[0], channels) or t.dtype != stats_dtype or not t.is_contiguous():
            raise ValueError(f"a and e must be contiguous ({x.shape[0]}, {channels}) {stats_dtype} tensors, "
                             f"got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
        if t.device != x.device:
            raise ValueError(f"a and e must be on {x.device}, got {t.device}")
    reasons = limit_reasons(x.shape[0], channels, positions)
    if reasons:
        raise ValueError("; ".join(reasons))
    return channels, positions, channel_stride, position_stride


def modulated_layer_norm_forward(
    x: torch.Tensor, a: torch.Tensor, e: torch.Tensor, eps: float, bias_free: bool
) -> torch.Tensor:
    """y = a * n + e, n = (x - mean) / sqrt(var + eps) over channels (mean kept in x when bias_free)."""
    channels, positions, channel_stride, position_stride = _validate(x, a, e)
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    block_c, block_p, num_warps = _launch_config(channels, positions)
    grid = (triton.cdiv(positions, block_p), x.shape[0])
    _mln_fwd_kernel[grid](
        x, a, e, y, channels, positions, channel_stride, position_stride, float(eps),
        BIAS_FREE=bias_free, ACC_DTYPE=_accumulator_dtype(x), BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=num_warps,
    )
    return y


def modulated_layer_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, eps: float, bias_free: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, da, de) of ``modulated_layer_norm_forward`` for upstream gradient dy (statistics recomputed)."""
    channels, positions, channel_stride, position_stride = _validate(x, a)
    if dy.shape != x.shape:
        raise ValueError(f"dy shape {tuple(dy.shape)} differs from x shape {tuple(x.shape)}")
    dx = torch.empty_like(x)
    if dx.numel() == 0:
        return dx, torch.zeros_like(a), torch.zeros_like(a)
    dy = as_layout_of(dy, x)
    block_c, block_p, num_warps = _launch_config(channels, positions)
    grid = (triton.cdiv(positions, block_p), x.shape[0])
    partials = torch.empty((2, x.shape[0], grid[0], channels), dtype=a.dtype, device=x.device)
    _mln_bwd_kernel[grid](
        dy, x, a, dx, partials[0], partials[1], channels, positions, channel_stride, position_stride,
        float(eps), BIAS_FREE=bias_free, ACC_DTYPE=_accumulator_dtype(x), BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=num_warps,
    )
    # Two reductions: the custom op's outputs must not be views of one buffer.
    return dx, partials[0].sum(1), partials[1].sum(1)


def _compile_check_case(
    kernel: triton.JITFunction, dtype: str, channels_inner: bool, channels: int, positions: int
) -> dict:
    """AOT signature of ``kernel`` as the JIT specialises it for an input of one dtype and layout."""
    block_c, block_p, num_warps = _launch_config(channels, positions)
    unit_stride = "channel_stride" if channels_inner else "position_stride"
    constexprs = {unit_stride: 1, "BIAS_FREE": False, "ACC_DTYPE": tl.float32, "BLOCK_C": block_c,
                  "BLOCK_P": block_p}
    scalar_types = {"C": "i32", "P": "i32", "channel_stride": "i32", "position_stride": "i32", "eps": "fp32"}
    stats_pointers = ("a_ptr", "e_ptr", "da_partial_ptr", "de_partial_ptr")
    signature = {
        name: "constexpr" if name in constexprs
        else scalar_types.get(name, "*fp32" if name in stats_pointers else f"*{dtype}")
        for name in kernel.arg_names
    }
    layout = "channels-inner" if channels_inner else "planar"
    return {
        "name": f"{dtype} {layout} C={channels} tile={block_c}x{block_p} warps={num_warps}",
        "fn": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "options": {"num_warps": num_warps},
        # torch allocations are 16-byte aligned, so the JIT marks every pointer divisible by 16.
        "divisible_by_16": [name for name, kind in signature.items() if kind.startswith("*")],
    }


_SHIPPED_DTYPES = ("fp32", "fp16", "bf16")
# Full tiles of the shipped dtypes in both layouts, a 4-warp tile (few positions), and C = MAX_CHANNELS to
# back the advertised limit. Half-precision inputs still compute in fp32, so fp32 is the heaviest.
COMPILE_CHECK_CASES = [
    _compile_check_case(kernel, dtype, channels_inner, channels, positions)
    for kernel in (_mln_fwd_kernel, _mln_bwd_kernel)
    for channels, positions, dtypes in (
        (48, _TILE_ELEMENTS, _SHIPPED_DTYPES),
        (384, _TILE_ELEMENTS, _SHIPPED_DTYPES),
        (384, 4, ("fp32",)),
        (MAX_CHANNELS, _TILE_ELEMENTS, ("fp32",)),
    )
    for dtype in dtypes
    for channels_inner in (True, False)
]
