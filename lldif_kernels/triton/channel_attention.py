"""Transposed channel attention (Restormer MDTA core): out = softmax_j(tau * q̂ k̂ᵀ) v, over channels.

Per (sample, head) pair, q, k, v are d x N (d <= 128 channels, N positions) and the attention matrix is only
d x d, but only B * heads pairs exist, so every pass splits N across programs:

1. ``_cha_gram_kernel``, grid (splits, pairs): each program accumulates a partial d x d product over its
   range of positions (q kᵀ and the squared norms forward, dO vᵀ backward) and stores it to a buffer.
2. ``_cha_fwd_softmax_kernel`` / ``_cha_bwd_coef_kernel``, one program per pair: sums the partials in split
   order (deterministic, no atomics) and does the d x d math, writing the saved statistics and the
   coefficient matrices of pass 3 (P forward; M, Mᵀ, Pᵀ and the norm corrections backward).
3. ``_cha_fwd_out_kernel`` / ``_cha_bwd_grad_kernel``, grid (tiles, pairs): every position tile is a product
   of those coefficients with input tiles: out = P v forward; dq = M k - diag(rho/nq²) q, dk = Mᵀ q -
   diag(kappa/nk²) k and dv = Pᵀ dO backward, written straight into the dq, dk, dv given (three tensors, or
   three views of one packed gradient).

q, k and v may be strided views of a packed qkv (position stride 1); they are read in place. Everything is
computed in float32 (float64 for float64 inputs); half-precision tiles are widened before ``tl.dot``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Channels of one head: pass 3 keeps three BLOCK_D x BLOCK_N accumulators in registers; the launch sizes are
# compile-checked without spills up to here.
MAX_DIM = 128
# F.normalize's clamp on a norm; a clamped row takes no gradient through its norm.
NORM_EPS = 1e-12
# CUDA caps grid axis 1 (the pairs) at 2**16 - 1.
_MAX_PAIRS = 65535
# Splits of N for pass 1: about four waves on a 132-SM H200, yet at least this many positions per split.
_TARGET_PROGRAMS = 4 * 132
_MIN_SPLIT_POSITIONS = 256
# ieee: float32 FMA products, accurate to float32 (tf32 tensor cores would not be); float64 ignores it.
_DOT_PRECISION = "ieee"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _pair_offset(pair, heads, stride_batch, stride_head):
    """int64 offset of the (sample, head) ``pair``'s first element: B * 3C * N may pass 2**31."""
    sample = (pair // heads).to(tl.int64)
    head = (pair % heads).to(tl.int64)
    return sample * stride_batch + head * stride_head


@triton.jit
def _norm(squares, ACC_DTYPE: tl.constexpr):
    """Correctly rounded sqrt: tl.sqrt is the approximate one for float32, and sqrt_rn is float32 only."""
    if ACC_DTYPE == tl.float32:
        return tl.sqrt_rn(squares)
    else:
        return tl.sqrt(squares)


@triton.jit
def _clamped_norm(squares, EPS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """F.normalize's clamp_min(norm, eps), which keeps a NaN norm NaN (tl.maximum would return eps). EPS as a
    typed constant: a float argument would be float32 even for float64 inputs."""
    norm = _norm(squares, ACC_DTYPE)
    return tl.where(norm < EPS, tl.full(norm.shape, EPS, ACC_DTYPE), norm)


@triton.jit
def _attention(cosine, temperature, rows, cols, D):
    """softmax_j(temperature * cosine), rows and columns past D zero (and out of every row's softmax)."""
    scores = tl.where((cols < D)[None, :], temperature * cosine, float("-inf"))
    exps = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    probs = exps / tl.sum(exps, axis=1)[:, None]
    return tl.where((rows < D)[:, None] & (cols < D)[None, :], probs, 0.0)


@triton.jit
def _cha_gram_kernel(
    a_ptr, b_ptr, gram_partial_ptr, sumsq_partial_ptr,
    heads, D, N, chunk,
    a_stride_batch, a_stride_head, a_stride_dim, b_stride_batch, b_stride_head, b_stride_dim,
    SUM_SQUARES: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial a bᵀ (and, with SUM_SQUARES, the rows' squared norms) over positions [split * chunk, + chunk)."""
    split = tl.program_id(0)
    pair = tl.program_id(1)
    rows = tl.arange(0, BLOCK_D)
    row_mask = rows < D
    # Row offsets in int64: d * stride_dim alone may pass 2**31 for exotic strides.
    a_rows = _pair_offset(pair, heads, a_stride_batch, a_stride_head) + rows.to(tl.int64) * a_stride_dim
    b_rows = _pair_offset(pair, heads, b_stride_batch, b_stride_head) + rows.to(tl.int64) * b_stride_dim

    gram = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC_DTYPE)
    # Squares accumulate elementwise and are reduced once after the loop: no cross-lane shuffles per step
    # (ptxas answered those with a stack frame on sm_80).
    a_squares = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC_DTYPE)
    b_squares = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC_DTYPE)
    start = split * chunk
    for offset in range(0, chunk, BLOCK_N):
        positions = start + offset + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (positions < N)[None, :]
        a = tl.load(a_ptr + (a_rows[:, None] + positions[None, :]), mask=mask, other=0.0).to(ACC_DTYPE)
        b = tl.load(b_ptr + (b_rows[:, None] + positions[None, :]), mask=mask, other=0.0).to(ACC_DTYPE)
        gram = tl.dot(a, tl.trans(b), gram, input_precision=DOT_PRECISION)
        if SUM_SQUARES:
            a_squares += a * a
            b_squares += b * b

    partial = pair.to(tl.int64) * tl.num_programs(0) + split
    cols = tl.arange(0, BLOCK_D)
    gram_offsets = partial * D * D + rows[:, None] * D + cols[None, :]
    tl.store(gram_partial_ptr + gram_offsets, gram, mask=row_mask[:, None] & (cols < D)[None, :])
    if SUM_SQUARES:
        tl.store(sumsq_partial_ptr + (2 * partial * D + rows), tl.sum(a_squares, axis=1), mask=row_mask)
        tl.store(sumsq_partial_ptr + ((2 * partial + 1) * D + rows), tl.sum(b_squares, axis=1), mask=row_mask)


@triton.jit
def _cha_fwd_softmax_kernel(
    gram_partial_ptr, sumsq_partial_ptr, temperature_ptr, cosine_ptr, q_norm_ptr, k_norm_ptr, probs_ptr,
    heads, D, splits,
    EPS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Cosine, clamped norms and P = softmax(tau * cosine) of one pair from its pass-1 partials, BLOCK_R rows
    at a time. The splits are summed in a fixed order, so every output depends only on the shape."""
    pair = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    k_squares = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
    for split in range(0, splits):
        partial = pair * splits + split
        k_squares += tl.load(sumsq_partial_ptr + ((2 * partial + 1) * D + cols), mask=col_mask, other=0.0)
    k_norm = _clamped_norm(k_squares, EPS, ACC_DTYPE)
    tl.store(k_norm_ptr + (pair * D + cols), k_norm, mask=col_mask)
    temperature = tl.load(temperature_ptr + pair % heads)

    # Unrolled: ptxas gave a runtime loop around the row reductions a stack frame.
    for row_start in tl.static_range(0, BLOCK_D, BLOCK_R):
        rows = row_start + tl.arange(0, BLOCK_R)
        row_mask = rows < D
        mask = row_mask[:, None] & col_mask[None, :]
        block = rows[:, None] * D + cols[None, :]
        gram = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC_DTYPE)
        q_squares = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
        for split in range(0, splits):
            partial = pair * splits + split
            gram += tl.load(gram_partial_ptr + (partial * D * D + block), mask=mask, other=0.0)
            q_squares += tl.load(sumsq_partial_ptr + (2 * partial * D + rows), mask=row_mask, other=0.0)
        q_norm = _clamped_norm(q_squares, EPS, ACC_DTYPE)
        cosine = gram / (q_norm[:, None] * k_norm[None, :])
        tl.store(cosine_ptr + (pair * D * D + block), cosine, mask=mask)
        tl.store(q_norm_ptr + (pair * D + rows), q_norm, mask=row_mask)
        probs = _attention(cosine, temperature, rows, cols, D)
        tl.store(probs_ptr + (pair * D * D + block), probs, mask=mask)


@triton.jit
def _cha_fwd_out_kernel(
    probs_ptr, v_ptr, out_ptr,
    heads, D, N, stride_batch, stride_head, stride_dim,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = P v for one tile of positions of one pair, BLOCK_K channels of v at a time."""
    pair = tl.program_id(1)
    rows = tl.arange(0, BLOCK_D)
    row_mask = rows < D
    positions = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    position_mask = positions < N
    v_base = _pair_offset(pair, heads, stride_batch, stride_head)
    probs_ptr += pair.to(tl.int64) * D * D
    out = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC_DTYPE)
    # K chunks keep the float32 FMA dot's operands in registers at d = 128, and skip the padding past D.
    for k_start in range(0, D, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        v_rows = v_base + ks.to(tl.int64) * stride_dim
        v = tl.load(v_ptr + (v_rows[:, None] + positions[None, :]), mask=k_mask[:, None] & position_mask[None, :],
                    other=0.0).to(ACC_DTYPE)
        probs = tl.load(probs_ptr + (rows[:, None] * D + ks[None, :]), mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)
        out = tl.dot(probs, v, out, input_precision=DOT_PRECISION)
    out_rows = (pair.to(tl.int64) * D + rows) * N
    tl.store(out_ptr + (out_rows[:, None] + positions[None, :]), out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & position_mask[None, :])


@triton.jit
def _cha_bwd_coef_kernel(
    dprobs_partial_ptr, cosine_ptr, q_norm_ptr, k_norm_ptr, temperature_ptr, coef_ptr, correction_ptr,
    dtemperature_ptr,
    heads, D, splits,
    EPS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dtemperature and the pass-3 coefficients [M, Mᵀ, Pᵀ] and [rho/nq², kappa/nk²] of one pair, BLOCK_R rows at
    a time (the column sums kappa and dtemperature accumulate over the row blocks in order)."""
    pair = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    k_norm = tl.load(k_norm_ptr + (pair * D + cols), mask=col_mask, other=1.0)
    temperature = tl.load(temperature_ptr + pair % heads)
    eps = tl.full((BLOCK_D,), EPS, ACC_DTYPE)
    kappa = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
    dtemperature = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
    coef_ptr += pair * 3 * D * D
    correction_ptr += pair * 2 * D

    # Unrolled: ptxas gave a runtime loop around the row reductions a stack frame.
    for row_start in tl.static_range(0, BLOCK_D, BLOCK_R):
        rows = row_start + tl.arange(0, BLOCK_R)
        row_mask = rows < D
        mask = row_mask[:, None] & col_mask[None, :]
        block = rows[:, None] * D + cols[None, :]
        block_transposed = cols[None, :] * D + rows[:, None]
        dprobs = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC_DTYPE)
        for split in range(0, splits):
            dprobs += tl.load(dprobs_partial_ptr + ((pair * splits + split) * D * D + block), mask=mask, other=0.0)
        cosine = tl.load(cosine_ptr + (pair * D * D + block), mask=mask, other=0.0)
        q_norm = tl.load(q_norm_ptr + (pair * D + rows), mask=row_mask, other=1.0)

        probs = _attention(cosine, temperature, rows, cols, D)
        dscores = probs * (dprobs - tl.sum(probs * dprobs, axis=1)[:, None])
        dtemperature += tl.sum(dscores * cosine, axis=0)
        dcosine = temperature * dscores
        coef = dcosine / (q_norm[:, None] * k_norm[None, :])
        tl.store(coef_ptr + block, coef, mask=mask)
        tl.store(coef_ptr + D * D + block_transposed, coef, mask=mask)
        tl.store(coef_ptr + 2 * D * D + block_transposed, probs, mask=mask)
        dcosine_cosine = dcosine * cosine
        kappa += tl.sum(dcosine_cosine, axis=0)
        # A norm clamped at EPS (F.normalize's clamp_min) passes no gradient through itself.
        rho = tl.where(q_norm > tl.full((BLOCK_R,), EPS, ACC_DTYPE), tl.sum(dcosine_cosine, axis=1), 0.0)
        tl.store(correction_ptr + rows, rho / (q_norm * q_norm), mask=row_mask)

    kappa = tl.where(k_norm > eps, kappa, 0.0)
    tl.store(correction_ptr + D + cols, kappa / (k_norm * k_norm), mask=col_mask)
    tl.store(dtemperature_ptr + pair, tl.sum(dtemperature, axis=0))


@triton.jit
def _cha_bwd_grad_kernel(
    coef_ptr, correction_ptr, q_ptr, k_ptr, dout_ptr, dq_ptr, dk_ptr, dv_ptr,
    heads, D, N, stride_batch, stride_head, stride_dim,
    dout_stride_batch, dout_stride_head, dout_stride_dim, grad_stride_batch, grad_stride_head, grad_stride_dim,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dq = M k - diag(rho/nq²) q, dk = Mᵀ q - diag(kappa/nk²) k, dv = Pᵀ dO for one tile of positions of one pair."""
    pair = tl.program_id(1)
    rows = tl.arange(0, BLOCK_D)
    row_mask = rows < D
    positions = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    position_mask = positions < N
    in_base = _pair_offset(pair, heads, stride_batch, stride_head)
    dout_base = _pair_offset(pair, heads, dout_stride_batch, dout_stride_head)
    coef_ptr += pair.to(tl.int64) * 3 * D * D
    correction_ptr += pair.to(tl.int64) * 2 * D

    dq = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC_DTYPE)
    dk = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC_DTYPE)
    dv = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC_DTYPE)
    # K chunks keep the float32 FMA dot's operands in registers at d = 128, and skip the padding past D.
    for k_start in range(0, D, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        mask = k_mask[:, None] & position_mask[None, :]
        in_offsets = (in_base + ks.to(tl.int64) * stride_dim)[:, None] + positions[None, :]
        dout_offsets = (dout_base + ks.to(tl.int64) * dout_stride_dim)[:, None] + positions[None, :]
        q = tl.load(q_ptr + in_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        k = tl.load(k_ptr + in_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        dout = tl.load(dout_ptr + dout_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        coef_mask = row_mask[:, None] & k_mask[None, :]
        block = rows[:, None] * D + ks[None, :]
        dq = tl.dot(tl.load(coef_ptr + block, mask=coef_mask, other=0.0), k, dq, input_precision=DOT_PRECISION)
        dk = tl.dot(tl.load(coef_ptr + D * D + block, mask=coef_mask, other=0.0), q, dk,
                    input_precision=DOT_PRECISION)
        dv = tl.dot(tl.load(coef_ptr + 2 * D * D + block, mask=coef_mask, other=0.0), dout, dv,
                    input_precision=DOT_PRECISION)

    mask = row_mask[:, None] & position_mask[None, :]
    in_offsets = (in_base + rows.to(tl.int64) * stride_dim)[:, None] + positions[None, :]
    q = tl.load(q_ptr + in_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    dq -= tl.load(correction_ptr + rows, mask=row_mask, other=0.0)[:, None] * q
    k = tl.load(k_ptr + in_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    dk -= tl.load(correction_ptr + D + rows, mask=row_mask, other=0.0)[:, None] * k

    grad_base = _pair_offset(pair, heads, grad_stride_batch, grad_stride_head)
    out_offsets = (grad_base + rows.to(tl.int64) * grad_stride_dim)[:, None] + positions[None, :]
    tl.store(dq_ptr + out_offsets, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptr + out_offsets, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + out_offsets, dv.to(dv_ptr.dtype.element_ty), mask=mask)


class _Config(NamedTuple):
    """Block sizes and warps of one problem shape (and accumulation dtype)."""

    block_d: int  # channels padded to a power of two, at least 16 (tl.dot's minimum)
    gram_block_n: int  # positions per pass-1 step (the K of its dot)
    gram_warps: int
    block_n: int  # positions per pass-3 tile
    block_k: int  # channels per pass-3 dot step
    tile_warps: int
    tile_stages: int  # software pipelining of pass 3; deeper made ptxas spill long-lived offsets
    block_r: int  # rows per step of the per-pair kernels
    pair_warps: int


def _launch_config(dim: int, fp64: bool) -> _Config:
    """Sizes that compile without register spills on sm_80 and sm_90 up to d = MAX_DIM, float64 included.

    float32 ``tl.dot`` at ``input_precision="ieee"`` runs on FMA units and holds a thread's whole slice of both
    operands in registers, so the dots stay small: K of 16 or 32 in pass 1, K chunks of 16 channels in pass 3.
    """
    block_d = max(triton.next_power_of_2(dim), 16)
    wide = block_d > 64
    return _Config(
        block_d,
        gram_block_n=16 if wide else 32, gram_warps=16 if wide else 8 if block_d > 32 else 4,
        block_n=32 if wide else 64, block_k=16, tile_warps=8 if block_d > 32 else 4, tile_stages=1,
        block_r=8 if wide and fp64 else 16, pair_warps=8,
    )


def _splits(pairs: int, positions: int, block_n: int) -> tuple[int, int]:
    """(splits, chunk): pass 1 cuts N into ``splits`` ranges of ``chunk`` positions (a BLOCK_N multiple).

    A function of the shape alone, so the order of the fixed-order reduction, hence the result, is too.
    """
    splits = max(1, min(triton.cdiv(positions, _MIN_SPLIT_POSITIONS), triton.cdiv(_TARGET_PROGRAMS, pairs)))
    chunk = triton.cdiv(triton.cdiv(positions, splits), block_n) * block_n
    return triton.cdiv(positions, chunk), chunk


def _accumulator(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def limit_reasons(batch: int, heads: int, dim: int, positions: int) -> list[str]:
    """Why these kernels cannot serve a (batch, heads, dim, positions) problem (empty when they can)."""
    reasons = []
    if dim > MAX_DIM:
        reasons.append(f"d={dim} channels per head exceeds the Triton kernels' limit of {MAX_DIM}")
    if batch * heads > _MAX_PAIRS:
        reasons.append(f"batch x heads = {batch * heads} exceeds the CUDA grid limit of {_MAX_PAIRS}")
    return reasons


def _validate(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
    """Check the inputs; return q, k, v with equal strides and position stride 1, and the accumulation dtype."""
    if q.dim() != 4 or q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q must be a (B, heads, d, N) float tensor, got {tuple(q.shape)} {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} must match q's {tuple(q.shape)} {q.dtype} on {q.device}, "
                             f"got {tuple(x.shape)} {x.dtype} on {x.device}")
    acc_dtype, _ = _accumulator(q.dtype)
    if temperature.shape != (q.shape[1],) or temperature.dtype != acc_dtype or temperature.device != q.device:
        raise ValueError(f"temperature must be a ({q.shape[1]},) {acc_dtype} tensor on {q.device}, "
                         f"got {tuple(temperature.shape)} {temperature.dtype} on {temperature.device}")
    reasons = limit_reasons(*q.shape)
    if reasons:
        raise ValueError("; ".join(reasons))
    if not (q.stride(3) == 1 and k.stride() == q.stride() and v.stride() == q.stride()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v, acc_dtype


def _saved(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, name: str):
    if t.shape != shape or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be a {shape} {dtype} tensor on {device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    return t.contiguous()


def channel_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, cosine, q_norm, k_norm) of out = softmax_j(tau * q̂ k̂ᵀ) v per (sample, head); see module docstring."""
    q, k, v, acc_dtype = _validate(q, k, v, temperature)
    batch, heads, dim, positions = q.shape
    out = torch.empty((batch, heads, dim, positions), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        # N = 0: every row is zero, so its norm is clamped to NORM_EPS and its cosines are 0.
        norms = (torch.full((batch, heads, dim), NORM_EPS, dtype=acc_dtype, device=q.device) for _ in range(2))
        return out, torch.zeros((batch, heads, dim, dim), dtype=acc_dtype, device=q.device), *norms
    cosine = torch.empty((batch, heads, dim, dim), dtype=acc_dtype, device=q.device)
    q_norm = torch.empty((batch, heads, dim), dtype=acc_dtype, device=q.device)
    k_norm = torch.empty((batch, heads, dim), dtype=acc_dtype, device=q.device)

    pairs = batch * heads
    acc = _accumulator(q.dtype)[1]
    config = _launch_config(dim, acc == tl.float64)
    splits, chunk = _splits(pairs, positions, config.gram_block_n)
    gram_partial = torch.empty((pairs, splits, dim, dim), dtype=acc_dtype, device=q.device)
    sumsq_partial = torch.empty((pairs, splits, 2, dim), dtype=acc_dtype, device=q.device)
    probs = torch.empty((pairs, dim, dim), dtype=acc_dtype, device=q.device)
    strides = q.stride()[:3]
    _cha_gram_kernel[(splits, pairs)](
        q, k, gram_partial, sumsq_partial, heads, dim, positions, chunk, *strides, *strides,
        SUM_SQUARES=True, ACC_DTYPE=acc, DOT_PRECISION=_DOT_PRECISION, BLOCK_D=config.block_d,
        BLOCK_N=config.gram_block_n, num_warps=config.gram_warps,
    )
    _cha_fwd_softmax_kernel[(pairs,)](
        gram_partial, sumsq_partial, temperature, cosine, q_norm, k_norm, probs, heads, dim, splits,
        EPS=NORM_EPS, ACC_DTYPE=acc, BLOCK_D=config.block_d, BLOCK_R=config.block_r, num_warps=config.pair_warps,
    )
    _cha_fwd_out_kernel[(triton.cdiv(positions, config.block_n), pairs)](
        probs, v, out, heads, dim, positions, *strides,
        ACC_DTYPE=acc, DOT_PRECISION=_DOT_PRECISION, BLOCK_D=config.block_d, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, num_warps=config.tile_warps, num_stages=config.tile_stages,
    )
    return out, cosine, q_norm, k_norm


def channel_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    cosine: torch.Tensor,
    q_norm: torch.Tensor,
    k_norm: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> torch.Tensor:
    """Writes dq, dk, dv (q's shape and dtype, shared strides, position stride 1) and returns dtemperature
    (B, heads) per pair."""
    q, k, v, acc_dtype = _validate(q, k, v, temperature)
    batch, heads, dim, positions = q.shape
    cosine = _saved(cosine, (batch, heads, dim, dim), acc_dtype, q.device, "cosine")
    q_norm = _saved(q_norm, (batch, heads, dim), acc_dtype, q.device, "q_norm")
    k_norm = _saved(k_norm, (batch, heads, dim), acc_dtype, q.device, "k_norm")
    if dout.shape != q.shape or dout.device != q.device:
        raise ValueError(f"dout must be a {tuple(q.shape)} tensor on {q.device}, "
                         f"got {tuple(dout.shape)} on {dout.device}")
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        if grad.shape != q.shape or grad.dtype != q.dtype or grad.device != q.device:
            raise ValueError(f"{name} must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, "
                             f"got {tuple(grad.shape)} {grad.dtype} on {grad.device}")
        if grad.stride() != dq.stride() or dq.stride(3) != 1:
            raise ValueError(f"dq, dk and dv must share strides with position stride 1, got {dq.stride()}, "
                             f"{dk.stride()}, {dv.stride()}")
    if q.numel() == 0:
        # N = 0: dP = 0, so dS = 0 and so is dtemperature.
        return torch.zeros((batch, heads), dtype=acc_dtype, device=q.device)
    # Gradients often arrive as stride-0 expands; the kernels want position stride 1 and q's dtype.
    dout = dout.to(q.dtype)
    if dout.stride(3) != 1:
        dout = dout.contiguous()

    pairs = batch * heads
    acc = _accumulator(q.dtype)[1]
    config = _launch_config(dim, acc == tl.float64)
    splits, chunk = _splits(pairs, positions, config.gram_block_n)
    dprobs_partial = torch.empty((pairs, splits, dim, dim), dtype=acc_dtype, device=q.device)
    coef = torch.empty((pairs, 3, dim, dim), dtype=acc_dtype, device=q.device)
    correction = torch.empty((pairs, 2, dim), dtype=acc_dtype, device=q.device)
    dtemperature = torch.empty((batch, heads), dtype=acc_dtype, device=q.device)
    strides = q.stride()[:3]
    dout_strides = dout.stride()[:3]
    # The sum-of-squares buffer is unused without SUM_SQUARES; any tensor stands in for it.
    _cha_gram_kernel[(splits, pairs)](
        dout, v, dprobs_partial, dprobs_partial, heads, dim, positions, chunk, *dout_strides, *strides,
        SUM_SQUARES=False, ACC_DTYPE=acc, DOT_PRECISION=_DOT_PRECISION, BLOCK_D=config.block_d,
        BLOCK_N=config.gram_block_n, num_warps=config.gram_warps,
    )
    _cha_bwd_coef_kernel[(pairs,)](
        dprobs_partial, cosine, q_norm, k_norm, temperature, coef, correction, dtemperature, heads, dim, splits,
        EPS=NORM_EPS, ACC_DTYPE=acc, BLOCK_D=config.block_d, BLOCK_R=config.block_r, num_warps=config.pair_warps,
    )
    _cha_bwd_grad_kernel[(triton.cdiv(positions, config.block_n), pairs)](
        coef, correction, q, k, dout, dq, dk, dv, heads, dim, positions, *strides, *dout_strides,
        *dq.stride()[:3],
        ACC_DTYPE=acc, DOT_PRECISION=_DOT_PRECISION, BLOCK_D=config.block_d, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, num_warps=config.tile_warps, num_stages=config.tile_stages,
    )
    return dtemperature


def _compile_check_case(
    kernel: triton.JITFunction, dtype: str, batch: int, heads: int, dim: int, positions: int, backward: bool
) -> dict:
    """AOT signature of ``kernel`` as the JIT specialises it for q, k, v viewed from a packed contiguous
    (B, 3 * heads * dim, N) qkv and a contiguous dout (integer arguments equal to 1 become constexprs,
    multiples of 16 are marked divisible)."""
    config = _launch_config(dim, dtype == "fp64")
    splits, chunk = _splits(batch * heads, positions, config.gram_block_n)
    qkv_strides = (3 * heads * dim * positions, dim * positions, positions)
    dout_strides = (heads * dim * positions, dim * positions, positions)
    grad_strides = qkv_strides  # the packed op's gradient; the unpacked op's match dout_strides
    a_strides, b_strides = (dout_strides, qkv_strides) if backward else (qkv_strides, qkv_strides)
    integers = {
        "heads": heads, "D": dim, "N": positions, "chunk": chunk, "splits": splits,
        **dict(zip(("stride_batch", "stride_head", "stride_dim"), qkv_strides, strict=True)),
        **dict(zip(("dout_stride_batch", "dout_stride_head", "dout_stride_dim"), dout_strides, strict=True)),
        **dict(zip(("grad_stride_batch", "grad_stride_head", "grad_stride_dim"), grad_strides, strict=True)),
        **dict(zip(("a_stride_batch", "a_stride_head", "a_stride_dim"), a_strides, strict=True)),
        **dict(zip(("b_stride_batch", "b_stride_head", "b_stride_dim"), b_strides, strict=True)),
    }
    acc_dtype = "fp64" if dtype == "fp64" else "fp32"
    constexprs = {"SUM_SQUARES": not backward, "ACC_DTYPE": getattr(tl, "float64" if dtype == "fp64" else "float32"),
                  "DOT_PRECISION": _DOT_PRECISION, "EPS": NORM_EPS, "BLOCK_D": config.block_d,
                  "BLOCK_N": config.gram_block_n if kernel is _cha_gram_kernel else config.block_n,
                  "BLOCK_K": config.block_k, "BLOCK_R": config.block_r}
    constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
    constexprs.update({name: 1 for name in kernel.arg_names if integers.get(name) == 1})
    input_pointers = ("a_ptr", "b_ptr", "q_ptr", "k_ptr", "v_ptr", "dout_ptr", "out_ptr", "dq_ptr", "dk_ptr",
                      "dv_ptr")
    signature = {
        name: "constexpr" if name in constexprs
        else ("i32" if integers[name] < 2**31 else "i64") if name in integers
        else f"*{dtype}" if name in input_pointers
        else f"*{acc_dtype}"
        for name in kernel.arg_names
    }
    options = {}
    if kernel is _cha_gram_kernel:
        warps, tile = config.gram_warps, f"{config.block_d}x{config.gram_block_n}"
    elif kernel in (_cha_fwd_softmax_kernel, _cha_bwd_coef_kernel):
        warps, tile = config.pair_warps, f"{config.block_r}x{config.block_d}"
    else:
        warps, tile = config.tile_warps, f"{config.block_d}x{config.block_n}/{config.block_k}"
        options["num_stages"] = config.tile_stages
    pass_name = "bwd" if backward else "fwd"
    return {
        "name": f"{pass_name} {dtype} B={batch} heads={heads} d={dim} N={positions} tile={tile} warps={warps}",
        "fn": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "options": {"num_warps": warps, **options},
        # torch allocations are 16-byte aligned, so the JIT marks every pointer divisible by 16.
        "divisible_by_16": [name for name, kind in signature.items()
                            if kind.startswith("*") or (kind in ("i32", "i64") and integers[name] % 16 == 0)],
    }


# The LLDif shapes (B, heads, d, N) at d = 48, the largest head, d = MAX_DIM, at the largest N and at one
# with N % 16 != 0, and the smallest tile, d = 16. Every shape in float32; the other dtypes change only loads
# and stores (half) or take their own path (float64), so they are checked at the extremes of d.
_LLDIF_SHAPES = ((8, 1, 48, 12544), (8, 2, 48, 3136), (8, 4, 48, 784), (8, 8, 48, 196))
_EXTREME_SHAPES = ((8, 1, MAX_DIM, 12544), (8, 8, MAX_DIM, 196), (8, 4, 16, 784))
_CHECKED = (
    [(shape, "fp32") for shape in _LLDIF_SHAPES + _EXTREME_SHAPES]
    + [(shape, "bf16") for shape in _LLDIF_SHAPES]
    + [(shape, dtype) for shape in (_LLDIF_SHAPES[0], *_EXTREME_SHAPES[:2]) for dtype in ("fp16", "fp64")]
)
COMPILE_CHECK_CASES = [
    _compile_check_case(kernel, dtype, *shape, backward)
    for backward, kernels in ((False, (_cha_gram_kernel, _cha_fwd_softmax_kernel, _cha_fwd_out_kernel)),
                              (True, (_cha_gram_kernel, _cha_bwd_coef_kernel, _cha_bwd_grad_kernel)))
    for kernel in kernels
    for shape, dtype in _CHECKED
]
