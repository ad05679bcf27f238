"""Window cross-attention with a relative-position bias: out = softmax_j(scale * q kᵀ + B) v per (window, head).

B[i, j] = table[idx(i, j), head] with idx(i, j) = (r_i - r_j + ws - 1)(2ws - 1) + (c_i - c_j + ws - 1) for
token i = r_i * ws + c_i is gathered from the table inside the kernels, never materialised (at ws = 28 the M x M
bias would be six times the size of q, k, v and out together). A window holds M = ws² <= 1024 tokens, so one
program holds a query or key tile and streams the other side of the window past it, flash-attention style:

1. ``_wca_fwd_kernel``, grid (window x head, query tiles): online softmax over the key tiles; writes out and
   lse = log sum_j exp(s_ij).
2. ``_wca_bwd_delta_kernel``: D_i = sum_c dout_ic out_ic, once per row instead of once per key tile.
3. ``_wca_bwd_dkdv_kernel``, grid (window x head, key tiles): recomputes P = exp(s - lse) for every query
   tile and accumulates dv = Pᵀ dout and dk = scale dSᵀ q with dS = P (dout vᵀ - D). It also reduces dS onto
   the bias bins (below).
4. ``_wca_bwd_dq_kernel``, grid (query window x head, query tiles), only when dq is wanted: dq = scale dS k,
   summed over the windows that share the query in window order, so no program writes another's rows.
5. ``_wca_bwd_table_kernel``, grid (row offsets, heads): sums the per-pair bin partials of pass 3 into dtable
   in a fixed order.

Tiles are whole image rows of the window, each padded to BLOCK_C = next_power_of_2(ws) columns. That makes the
bias bins of a (query row r_i, key row r_j) block depend on one row offset r_i - r_j and on the column offset
c_i - c_j alone, so the block's bin sums are its diagonal sums. Pass 3 takes them with ``tl.gather`` along the
key axis (row c_i of the block shifted by c_i, an O(1) move per element; a one-hot product would cost
O(ws) per element and hold a ws³ one-hot operand) and stores them per (window, head, key row, query row):
every such slot is written by exactly one program, so there are no atomics, and pass 5 sums the slots of
each row offset over windows and key rows in an order fixed by the shape. dtable is bitwise repeatable.

q, k and v are read in place through their own (window, head, token) strides; channel stride 1. q may hold
fewer windows than k and v: window w reads query window w // (W / Wq). Everything is computed in float32
(float64 for float64 inputs); half-precision tiles are widened before ``tl.dot``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Channels of one head: the key-tile backward keeps k, v, dk and dv tiles in registers; the launch sizes are
# compile-checked without spills up to here (LLDif's d). At d = 64 the key-tile backward spilled on sm_90
# with every tile the windows allow; the CUDA C++ kernels serve up to 128 channels.
MAX_DIM = 32
# Tiles are whole rows of a window padded to 32 columns at most.
MAX_WINDOW_SIZE = 32
# Grid axis 0 (window x head) is capped at 2**31 - 1; the tiles of a window, on axis 1, are at most 32.
_MAX_PAIRS = 2**31 - 1
# ieee: float32 FMA products, accurate to float32 (tf32 tensor cores would not be); float64 ignores it.
_DOT_PRECISION = "ieee"
# Rows of D per program of pass 2, and elements of the pass-5 accumulator.
_DELTA_ROWS = 64
_TABLE_TILE_ELEMENTS = 4096
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _tile_tokens(tile, S, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Image rows, columns, token indices and validity of tile ``tile`` of a window: ROWS whole rows, each
    padded to BLOCK_C columns."""
    local = tl.arange(0, ROWS * BLOCK_C)
    rows = tile * ROWS + local // BLOCK_C
    cols = local % BLOCK_C
    return rows, cols, rows * S + cols, (rows < S) & (cols < S)


@triton.jit
def _load_tile(ptr, window, head, stride_window, stride_head, stride_token, tokens, valid, D,
               ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (tokens, BLOCK_D) tile of one (window, head), zero past D and at invalid tokens. int64 offsets: W x
    heads x M x d may pass 2**31, and so may a token times a packed tensor's token stride."""
    channels = tl.arange(0, BLOCK_D)
    base = window.to(tl.int64) * stride_window + head.to(tl.int64) * stride_head
    offsets = base + tokens.to(tl.int64)[:, None] * stride_token + channels[None, :]
    mask = valid[:, None] & (channels < D)[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)


@triton.jit
def _contiguous_offsets(pair, tokens, S, D, BLOCK_D: tl.constexpr):
    """Offsets of a tile in a contiguous (W, heads, M, d) tensor, and of its rows in a (W, heads, M) one."""
    rows = pair.to(tl.int64) * S * S + tokens
    return rows[:, None] * D + tl.arange(0, BLOCK_D)[None, :], rows


@triton.jit
def _scale(scale, scale_residual, ACC_DTYPE: tl.constexpr):
    """The softmax scale in ACC_DTYPE: float arguments arrive as float32, so float64 adds back the residual."""
    return tl.cast(scale, ACC_DTYPE) + tl.cast(scale_residual, ACC_DTYPE)


@triton.jit
def _logits(q, k, table_ptr, head, heads, scale, q_rows, q_cols, q_valid, k_rows, k_cols, k_valid, S,
            DOT_PRECISION: tl.constexpr):
    """s = scale q kᵀ + table[idx, head]; -inf at padding, so padded keys leave every softmax."""
    dots = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    bins = (q_rows[:, None] - k_rows[None, :] + S - 1) * (2 * S - 1) + (q_cols[:, None] - k_cols[None, :] + S - 1)
    valid = q_valid[:, None] & k_valid[None, :]
    bias = tl.load(table_ptr + (bins * heads + head), mask=valid, other=float("-inf"))
    return scale * dots + bias


@triton.jit
def _diagonal_sums(ds, S, ROWS_Q: tl.constexpr, ROWS_K: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_E: tl.constexpr):
    """(ROWS_Q, ROWS_K, BLOCK_E) sums of ds over each (query row, key row) block's diagonals: slot e holds
    column offset c_i - c_j = e - (S - 1), the table column of those entries; slots past 2S - 2 are 0.

    Row c_i of a block is gathered at key column c_j = c_i + S - 1 - e, which lines up each diagonal in one
    column, then the block's rows are summed.
    """
    q_cols = tl.arange(0, ROWS_Q * BLOCK_C) % BLOCK_C
    slots = tl.arange(0, ROWS_K * BLOCK_E)
    k_cols = q_cols[:, None] + (S - 1) - (slots % BLOCK_E)[None, :]
    inside = (k_cols >= 0) & (k_cols < S)
    index = (slots // BLOCK_E)[None, :] * BLOCK_C + tl.where(inside, k_cols, 0)
    shifted = tl.where(inside, tl.gather(ds, index, 1), 0.0)
    return tl.sum(tl.reshape(shifted, (ROWS_Q, BLOCK_C, ROWS_K, BLOCK_E)), axis=1)


@triton.jit
def _wca_fwd_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, out_ptr, lse_ptr,
    heads, windows_per_query, S, D, scale, scale_residual,
    q_stride_window, q_stride_head, q_stride_token, k_stride_window, k_stride_head, k_stride_token,
    v_stride_window, v_stride_head, v_stride_token,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_Q: tl.constexpr,
    ROWS_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out and lse of one query tile of one (window, head): online softmax over the window's key tiles."""
    pair = tl.program_id(0)
    window = pair // heads
    head = pair % heads
    q_rows, q_cols, q_tokens, q_valid = _tile_tokens(tl.program_id(1), S, ROWS_Q, BLOCK_C)
    q = _load_tile(q_ptr, window // windows_per_query, head, q_stride_window, q_stride_head, q_stride_token,
                   q_tokens, q_valid, D, ACC_DTYPE, BLOCK_D)
    scale = _scale(scale, scale_residual, ACC_DTYPE)

    row_max = tl.full((ROWS_Q * BLOCK_C,), float("-inf"), ACC_DTYPE)
    row_sum = tl.zeros((ROWS_Q * BLOCK_C,), ACC_DTYPE)
    acc = tl.zeros((ROWS_Q * BLOCK_C, BLOCK_D), ACC_DTYPE)
    for k_tile in range(0, tl.cdiv(S, ROWS_K)):
        k_rows, k_cols, k_tokens, k_valid = _tile_tokens(k_tile, S, ROWS_K, BLOCK_C)
        k = _load_tile(k_ptr, window, head, k_stride_window, k_stride_head, k_stride_token, k_tokens, k_valid, D,
                       ACC_DTYPE, BLOCK_D)
        v = _load_tile(v_ptr, window, head, v_stride_window, v_stride_head, v_stride_token, k_tokens, k_valid, D,
                       ACC_DTYPE, BLOCK_D)
        s = _logits(q, k, table_ptr, head, heads, scale, q_rows, q_cols, q_valid, k_rows, k_cols, k_valid, S,
                    DOT_PRECISION)
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        # A row with no finite logit yet subtracts 0, not -inf, so exp(-inf - -inf) never makes a NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(row_max - shift)
        p = tl.exp(s - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        row_max = new_max

    nonempty = row_sum > 0
    row_sum = tl.where(nonempty, row_sum, 1.0)
    out = acc / row_sum[:, None]
    lse = tl.where(nonempty, row_max + tl.log(row_sum), float("inf"))
    out_offsets, lse_offsets = _contiguous_offsets(pair, q_tokens, S, D, BLOCK_D)
    mask = q_valid[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + lse_offsets, lse, mask=q_valid)


@triton.jit
def _wca_bwd_delta_kernel(
    dout_ptr, out_ptr, delta_ptr, rows, D,
    ACC_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """D_i = sum_c dout_ic out_ic for BLOCK_ROWS rows of the contiguous (W x heads x M, d) dout and out."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    channels = tl.arange(0, BLOCK_D)
    mask = (row < rows)[:, None] & (channels < D)[None, :]
    offsets = row[:, None] * D + channels[None, :]
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    out = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(delta_ptr + row, tl.sum(dout * out, axis=1), mask=row < rows)


@triton.jit
def _wca_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, bins_partial_ptr,
    heads, windows_per_query, S, D, scale, scale_residual,
    q_stride_window, q_stride_head, q_stride_token, k_stride_window, k_stride_head, k_stride_token,
    v_stride_window, v_stride_head, v_stride_token,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_Q: tl.constexpr,
    ROWS_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dk, dv of one key tile of one (window, head) over all query tiles, and the diagonal sums of every
    (query row, key row) block of dS into bins_partial (W, heads, key row, query row, 2S - 1)."""
    pair = tl.program_id(0)
    window = pair // heads
    head = pair % heads
    q_window = window // windows_per_query
    k_rows, k_cols, k_tokens, k_valid = _tile_tokens(tl.program_id(1), S, ROWS_K, BLOCK_C)
    k = _load_tile(k_ptr, window, head, k_stride_window, k_stride_head, k_stride_token, k_tokens, k_valid, D,
                   ACC_DTYPE, BLOCK_D)
    v = _load_tile(v_ptr, window, head, v_stride_window, v_stride_head, v_stride_token, k_tokens, k_valid, D,
                   ACC_DTYPE, BLOCK_D)
    scale = _scale(scale, scale_residual, ACC_DTYPE)
    # Diagonal-sum slots: [query row, key row, column offset] of this program's key rows.
    slot_q_rows = tl.arange(0, ROWS_Q)[:, None, None]
    slot_k_rows = (tl.program_id(1) * ROWS_K + tl.arange(0, ROWS_K))[None, :, None]
    slot_columns = tl.arange(0, BLOCK_E)[None, None, :]
    slot_base = (pair.to(tl.int64) * S + slot_k_rows) * S
    slot_mask = (slot_k_rows < S) & (slot_columns < 2 * S - 1)

    dk = tl.zeros((ROWS_K * BLOCK_C, BLOCK_D), ACC_DTYPE)
    dv = tl.zeros((ROWS_K * BLOCK_C, BLOCK_D), ACC_DTYPE)
    for q_tile in range(0, tl.cdiv(S, ROWS_Q)):
        q_rows, q_cols, q_tokens, q_valid = _tile_tokens(q_tile, S, ROWS_Q, BLOCK_C)
        q = _load_tile(q_ptr, q_window, head, q_stride_window, q_stride_head, q_stride_token, q_tokens, q_valid,
                       D, ACC_DTYPE, BLOCK_D)
        dout_offsets, row_offsets = _contiguous_offsets(pair, q_tokens, S, D, BLOCK_D)
        mask = q_valid[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :]
        dout = tl.load(dout_ptr + dout_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        # lse = +inf (a row without a finite logit) makes P = 0 there, as does s = -inf at padding.
        lse = tl.load(lse_ptr + row_offsets, mask=q_valid, other=float("inf"))
        delta = tl.load(delta_ptr + row_offsets, mask=q_valid, other=0.0)
        s = _logits(q, k, table_ptr, head, heads, scale, q_rows, q_cols, q_valid, k_rows, k_cols, k_valid, S,
                    DOT_PRECISION)
        p = tl.exp(s - lse[:, None])
        dv = tl.dot(tl.trans(p), dout, dv, input_precision=DOT_PRECISION)
        dp = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds), q, dk, input_precision=DOT_PRECISION)
        sums = _diagonal_sums(ds, S, ROWS_Q, ROWS_K, BLOCK_C, BLOCK_E)
        slot_rows = q_tile * ROWS_Q + slot_q_rows
        tl.store(bins_partial_ptr + ((slot_base + slot_rows) * (2 * S - 1) + slot_columns), sums,
                 mask=slot_mask & (slot_rows < S))

    out_offsets, _ = _contiguous_offsets(pair, k_tokens, S, D, BLOCK_D)
    mask = k_valid[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :]
    tl.store(dk_ptr + out_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + out_offsets, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wca_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    heads, windows_per_query, S, D, scale, scale_residual,
    q_stride_window, q_stride_head, q_stride_token, k_stride_window, k_stride_head, k_stride_token,
    v_stride_window, v_stride_head, v_stride_token,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_Q: tl.constexpr,
    ROWS_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq of one query tile of one (query window, head): scale dS k over the key tiles of every window that
    reads this query, in window order."""
    q_pair = tl.program_id(0)
    q_window = q_pair // heads
    head = q_pair % heads
    q_rows, q_cols, q_tokens, q_valid = _tile_tokens(tl.program_id(1), S, ROWS_Q, BLOCK_C)
    q = _load_tile(q_ptr, q_window, head, q_stride_window, q_stride_head, q_stride_token, q_tokens, q_valid, D,
                   ACC_DTYPE, BLOCK_D)
    scale = _scale(scale, scale_residual, ACC_DTYPE)
    mask = q_valid[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :]

    dq = tl.zeros((ROWS_Q * BLOCK_C, BLOCK_D), ACC_DTYPE)
    for offset in range(0, windows_per_query):
        window = q_window * windows_per_query + offset
        pair = window * heads + head
        dout_offsets, row_offsets = _contiguous_offsets(pair, q_tokens, S, D, BLOCK_D)
        dout = tl.load(dout_ptr + dout_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        lse = tl.load(lse_ptr + row_offsets, mask=q_valid, other=float("inf"))
        delta = tl.load(delta_ptr + row_offsets, mask=q_valid, other=0.0)
        for k_tile in range(0, tl.cdiv(S, ROWS_K)):
            k_rows, k_cols, k_tokens, k_valid = _tile_tokens(k_tile, S, ROWS_K, BLOCK_C)
            k = _load_tile(k_ptr, window, head, k_stride_window, k_stride_head, k_stride_token, k_tokens, k_valid,
                           D, ACC_DTYPE, BLOCK_D)
            v = _load_tile(v_ptr, window, head, v_stride_window, v_stride_head, v_stride_token, k_tokens, k_valid,
                           D, ACC_DTYPE, BLOCK_D)
            s = _logits(q, k, table_ptr, head, heads, scale, q_rows, q_cols, q_valid, k_rows, k_cols, k_valid, S,
                        DOT_PRECISION)
            p = tl.exp(s - lse[:, None])
            dp = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)
            dq = tl.dot(p * (dp - delta[:, None]), k, dq, input_precision=DOT_PRECISION)

    dq_offsets, _ = _contiguous_offsets(q_pair, q_tokens, S, D, BLOCK_D)
    tl.store(dq_ptr + dq_offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wca_bwd_table_kernel(
    bins_partial_ptr, dtable_ptr, windows, heads, S,
    BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Row offset r_i - r_j = program_id(0) - (S - 1) of dtable for one head: the sum of bins_partial over
    windows and key rows r_j (query row r_j + offset), accumulated elementwise and reduced once at the end,
    so the order of every addition is fixed by the shape."""
    row_offset = tl.program_id(0) - (S - 1)
    head = tl.program_id(1)
    k_rows = tl.arange(0, BLOCK_R)[None, :, None]
    q_rows = k_rows + row_offset
    columns = tl.arange(0, BLOCK_E)[None, None, :]
    mask = (k_rows < S) & (q_rows >= 0) & (q_rows < S) & (columns < 2 * S - 1)
    block = (k_rows * S + q_rows) * (2 * S - 1) + columns
    acc = tl.zeros((BLOCK_W, BLOCK_R, BLOCK_E), bins_partial_ptr.dtype.element_ty)
    for window_start in range(0, windows, BLOCK_W):
        window = window_start + tl.arange(0, BLOCK_W)[:, None, None]
        pair = window.to(tl.int64) * heads + head
        acc += tl.load(bins_partial_ptr + (pair * S * S * (2 * S - 1) + block), mask=mask & (window < windows),
                       other=0.0)
    sums = tl.sum(tl.sum(acc, axis=1), axis=0)
    bins = tl.program_id(0) * (2 * S - 1) + tl.arange(0, BLOCK_E)
    tl.store(dtable_ptr + (bins * heads + head), sums, mask=tl.arange(0, BLOCK_E) < 2 * S - 1)


class _Tiles(NamedTuple):
    """Window rows per query and per key tile, and warps, of one kernel."""

    rows_q: int
    rows_k: int
    warps: int


class _Config(NamedTuple):
    """Tile shapes and warps of one problem shape (and accumulation dtype)."""

    block_c: int  # columns of a window row, padded to a power of two
    block_d: int  # channels padded to a power of two, at least 16 (tl.dot's minimum)
    block_e: int  # diagonal-sum slots of a (query row, key row) block: 2 block_c >= 2ws - 1
    fwd: _Tiles
    dkdv: _Tiles
    dq: _Tiles


def _launch_config(window_size: int, dim: int) -> _Config:
    """Sizes that compile without register spills on sm_80 and sm_90 up to d = MAX_DIM, float64 included.

    float32 ``tl.dot`` at ``input_precision="ieee"`` runs on FMA units and holds a thread's whole slice of both
    operands in registers, so tiles hold 64 (query) by 32 (key) tokens at 8 warps (64 x 64 spilled), and
    32 x 32 in the key-tile backward, where the k, v, dk and dv tiles fill the registers. A tile never holds
    fewer than 16 tokens (tl.dot's minimum) or more rows than the window (no all-padding rows).
    """
    block_c = triton.next_power_of_2(window_size)

    def tiles(tokens_q: int, tokens_k: int) -> _Tiles:
        rows_q, rows_k = (max(min(tokens // block_c, block_c), 16 // block_c, 1) for tokens in (tokens_q, tokens_k))
        return _Tiles(rows_q, rows_k, 8)

    return _Config(block_c, max(triton.next_power_of_2(dim), 16), 2 * block_c, fwd=tiles(64, 32),
                   dkdv=tiles(32, 32), dq=tiles(64, 32))


def _accumulator(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _scale_arguments(scale: float) -> tuple[float, float]:
    """(scale as float32, what float32 rounding dropped): the kernels add both back in float64."""
    rounded = torch.tensor(scale, dtype=torch.float32).item()
    return rounded, scale - rounded


def limit_reasons(windows: int, heads: int, tokens: int, dim: int) -> list[str]:
    """Why these kernels cannot serve a (windows, heads, tokens, dim) problem (empty when they can)."""
    reasons = []
    if dim > MAX_DIM:
        reasons.append(f"d={dim} channels per head exceeds the Triton kernels' limit of {MAX_DIM}")
    if tokens > MAX_WINDOW_SIZE**2:
        reasons.append(f"M={tokens} tokens per window exceeds the Triton kernels' limit of {MAX_WINDOW_SIZE}²")
    if windows * heads > _MAX_PAIRS:
        reasons.append(f"windows x heads = {windows * heads} exceeds the CUDA grid limit of {_MAX_PAIRS}")
    return reasons


def _validate(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, window_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
    """Check the inputs; return q, k, v with channel stride 1, a contiguous table and the accumulation dtype."""
    if k.dim() != 4 or k.dtype not in _SUPPORTED_DTYPES or k.shape[2] != window_size**2:
        raise ValueError(f"k must be a (W, heads, {window_size}², d) float tensor, got {tuple(k.shape)} {k.dtype}")
    windows, heads, tokens, dim = k.shape
    if v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"v must match k's {tuple(k.shape)} {k.dtype} on {k.device}, "
                         f"got {tuple(v.shape)} {v.dtype} on {v.device}")
    if (q.dim() != 4 or q.shape[1:] != k.shape[1:] or q.dtype != k.dtype or q.device != k.device
            or (q.shape[0] == 0) != (windows == 0) or (windows and windows % q.shape[0])):
        raise ValueError(f"q must be a (Wq, {heads}, {tokens}, {dim}) {k.dtype} tensor on {k.device} with Wq "
                         f"dividing {windows}, got {tuple(q.shape)} {q.dtype} on {q.device}")
    acc_dtype, _ = _accumulator(k.dtype)
    rows = (2 * window_size - 1) ** 2
    if table.shape != (rows, heads) or table.dtype != acc_dtype or table.device != k.device:
        raise ValueError(f"table must be a ({rows}, {heads}) {acc_dtype} tensor on {k.device}, "
                         f"got {tuple(table.shape)} {table.dtype} on {table.device}")
    reasons = limit_reasons(windows, heads, tokens, dim)
    if reasons:
        raise ValueError("; ".join(reasons))
    q, k, v = (x if x.stride(3) == 1 else x.contiguous() for x in (q, k, v))
    return q, k, v, table.contiguous(), acc_dtype


def _saved(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, name: str):
    if t.shape != shape or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be a {shape} {dtype} tensor on {device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    return t.contiguous()


def _problem_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int, scale: float):
    """The integer, scale and stride arguments every attention kernel takes, in its order."""
    windows, heads, _, dim = k.shape
    return (heads, windows // q.shape[0], window_size, dim, *_scale_arguments(scale),
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3])


def window_cross_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, window_size: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of out = softmax_j(scale q kᵀ + bias) v per (window, head); see the module docstring."""
    q, k, v, table, acc_dtype = _validate(q, k, v, table, window_size)
    windows, heads, tokens, dim = k.shape
    out = torch.empty((windows, heads, tokens, dim), dtype=k.dtype, device=k.device)
    lse = torch.empty((windows, heads, tokens), dtype=acc_dtype, device=k.device)
    if windows == 0:
        return out, lse
    config = _launch_config(window_size, dim)
    tiles = config.fwd
    _wca_fwd_kernel[(windows * heads, triton.cdiv(window_size, tiles.rows_q))](
        q, k, v, table, out, lse, *_problem_arguments(q, k, v, window_size, scale),
        ACC_DTYPE=_accumulator(k.dtype)[1], DOT_PRECISION=_DOT_PRECISION, BLOCK_C=config.block_c,
        ROWS_Q=tiles.rows_q, ROWS_K=tiles.rows_k, BLOCK_D=config.block_d, num_warps=tiles.warps, num_stages=1,
    )
    return out, lse


def window_cross_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    window_size: int,
    scale: float,
    need_dq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dtable); dq is an empty (0,) tensor unless ``need_dq``. Bitwise repeatable."""
    q, k, v, table, acc_dtype = _validate(q, k, v, table, window_size)
    windows, heads, tokens, dim = k.shape
    out = _saved(out, tuple(k.shape), k.dtype, k.device, "out")
    lse = _saved(lse, (windows, heads, tokens), acc_dtype, k.device, "lse")
    if dout.shape != k.shape or dout.device != k.device:
        raise ValueError(f"dout must be a {tuple(k.shape)} tensor on {k.device}, "
                         f"got {tuple(dout.shape)} on {dout.device}")
    # Gradients often arrive as stride-0 expands; the kernels want dout contiguous and in k's dtype.
    dout = dout.to(k.dtype).contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if need_dq else q.new_empty(0)
    dk = torch.empty((windows, heads, tokens, dim), dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    dtable = torch.empty_like(table)
    if windows == 0:
        return dq, dk, dv, dtable.zero_()

    acc = _accumulator(k.dtype)[1]
    config = _launch_config(window_size, dim)
    delta = torch.empty((windows, heads, tokens), dtype=acc_dtype, device=k.device)
    rows = windows * heads * tokens
    _wca_bwd_delta_kernel[(triton.cdiv(rows, _DELTA_ROWS),)](
        dout, out, delta, rows, dim, ACC_DTYPE=acc, BLOCK_ROWS=_DELTA_ROWS, BLOCK_D=config.block_d,
    )
    # Every slot is written by pass 3: (window, head, key row, query row, column offset).
    bins_partial = torch.empty((windows, heads, window_size, window_size, 2 * window_size - 1), dtype=acc_dtype,
                               device=k.device)
    arguments = _problem_arguments(q, k, v, window_size, scale)
    tiles = config.dkdv
    _wca_bwd_dkdv_kernel[(windows * heads, triton.cdiv(window_size, tiles.rows_k))](
        q, k, v, table, dout, lse, delta, dk, dv, bins_partial, *arguments,
        ACC_DTYPE=acc, DOT_PRECISION=_DOT_PRECISION, BLOCK_C=config.block_c, ROWS_Q=tiles.rows_q,
        ROWS_K=tiles.rows_k, BLOCK_D=config.block_d, BLOCK_E=config.block_e, num_warps=tiles.warps, num_stages=1,
    )
    if need_dq:
        tiles = config.dq
        _wca_bwd_dq_kernel[(q.shape[0] * heads, triton.cdiv(window_size, tiles.rows_q))](
            q, k, v, table, dout, lse, delta, dq, *arguments,
            ACC_DTYPE=acc, DOT_PRECISION=_DOT_PRECISION, BLOCK_C=config.block_c, ROWS_Q=tiles.rows_q,
            ROWS_K=tiles.rows_k, BLOCK_D=config.block_d, num_warps=tiles.warps, num_stages=1,
        )
    block_w, block_r, block_e = _table_blocks(window_size)
    _wca_bwd_table_kernel[(2 * window_size - 1, heads)](
        bins_partial, dtable, windows, heads, window_size, BLOCK_W=block_w, BLOCK_R=block_r, BLOCK_E=block_e,
    )
    return dq, dk, dv, dtable


def _table_blocks(window_size: int) -> tuple[int, int, int]:
    """(BLOCK_W, BLOCK_R, BLOCK_E) of pass 5: all key rows and column offsets of one row offset, and as many
    windows as fit _TABLE_TILE_ELEMENTS."""
    block_r, block_e = triton.next_power_of_2(window_size), triton.next_power_of_2(2 * window_size - 1)
    return max(1, _TABLE_TILE_ELEMENTS // (block_r * block_e)), block_r, block_e


def _compile_check_case(
    kernel: triton.JITFunction, dtype: str, windows: int, heads: int, window_size: int, dim: int
) -> dict:
    """AOT signature of ``kernel`` as the JIT specialises it for a contiguous q (one window per image, as in
    LLDif), k and v viewed from a packed contiguous (W, M, 2, heads, d) kv, and contiguous dout (integer
    arguments equal to 1 become constexprs, multiples of 16 are marked divisible)."""
    config = _launch_config(window_size, dim)
    tokens = window_size**2
    q_strides = (heads * tokens * dim, tokens * dim, dim)
    kv_strides = (tokens * 2 * heads * dim, dim, 2 * heads * dim)
    integers = {
        "heads": heads, "windows_per_query": 1, "S": window_size, "D": dim, "windows": windows,
        "rows": windows * heads * tokens,
        **dict(zip(("q_stride_window", "q_stride_head", "q_stride_token"), q_strides, strict=True)),
        **{f"{name}_stride_{axis}": stride for name in ("k", "v")
           for axis, stride in zip(("window", "head", "token"), kv_strides, strict=True)},
    }
    acc_dtype = "fp64" if dtype == "fp64" else "fp32"
    tiles = {_wca_fwd_kernel: config.fwd, _wca_bwd_dkdv_kernel: config.dkdv, _wca_bwd_dq_kernel: config.dq}.get(
        kernel, _Tiles(1, 1, 4))
    block_w, block_r, block_e = _table_blocks(window_size)
    constexprs = {"ACC_DTYPE": getattr(tl, "float64" if dtype == "fp64" else "float32"),
                  "DOT_PRECISION": _DOT_PRECISION, "BLOCK_C": config.block_c, "ROWS_Q": tiles.rows_q,
                  "ROWS_K": tiles.rows_k, "BLOCK_D": config.block_d, "BLOCK_ROWS": _DELTA_ROWS,
                  "BLOCK_W": block_w, "BLOCK_R": block_r,
                  "BLOCK_E": block_e if kernel is _wca_bwd_table_kernel else config.block_e}
    constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
    constexprs.update({name: 1 for name in kernel.arg_names if integers.get(name) == 1})
    input_pointers = ("q_ptr", "k_ptr", "v_ptr", "dout_ptr", "out_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
    signature = {
        name: "constexpr" if name in constexprs
        else ("i32" if integers[name] < 2**31 else "i64") if name in integers
        else "fp32" if name.startswith("scale")
        else f"*{dtype}" if name in input_pointers
        else f"*{acc_dtype}"
        for name in kernel.arg_names
    }
    if kernel in (_wca_fwd_kernel, _wca_bwd_dkdv_kernel, _wca_bwd_dq_kernel):
        options = {"num_warps": tiles.warps, "num_stages": 1}
        tile = f" tile={tiles.rows_q * config.block_c}x{tiles.rows_k * config.block_c}x{config.block_d}"
    else:
        options, tile = {"num_warps": 4}, ""
    return {
        "name": f"{dtype} W={windows} heads={heads} ws={window_size} d={dim}{tile} warps={options['num_warps']}",
        "fn": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "options": options,
        # torch allocations are 16-byte aligned, so the JIT marks every pointer divisible by 16.
        "divisible_by_16": [name for name, kind in signature.items()
                            if kind.startswith("*") or (kind in ("i32", "i64") and integers[name] % 16 == 0)],
    }


# The LLDif shapes (W, heads, ws, d) at B = 8, the largest window and ws = 1. Every shape in float32;
# bfloat16 at the LLDif shapes; float16 and float64 (which takes its own path) at the extremes.
_LLDIF_SHAPES = ((8, 2, 28, 32), (8, 4, 14, 32), (8, 8, 7, 32))
_EXTREME_SHAPES = ((8, 2, MAX_WINDOW_SIZE, MAX_DIM), (8, 1, 1, 8))
_CHECKED = (
    [(shape, "fp32") for shape in _LLDIF_SHAPES + _EXTREME_SHAPES]
    + [(shape, "bf16") for shape in _LLDIF_SHAPES]
    + [(shape, dtype) for shape in (_LLDIF_SHAPES[0], *_EXTREME_SHAPES) for dtype in ("fp16", "fp64")]
)
COMPILE_CHECK_CASES = [
    _compile_check_case(kernel, dtype, *shape)
    for kernel in (_wca_fwd_kernel, _wca_bwd_delta_kernel, _wca_bwd_dkdv_kernel, _wca_bwd_dq_kernel,
                   _wca_bwd_table_kernel)
    for shape, dtype in _CHECKED
]
