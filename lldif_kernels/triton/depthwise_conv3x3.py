"""Restormer's 3x3 depth-wise convolution (padding 1), optionally fused with its feed-forward gate:
out = gelu(y[:, :C/2]) * y[:, C/2:] (exact erf GELU), y = conv(x) + bias never leaving registers.

Every program owns a BLOCK_C x BLOCK_H x BLOCK_W tile: BLOCK_C output channels (with the gate, channel pairs
(c, c + C/2), both halves in the same program) of a BLOCK_H x BLOCK_W block of pixels of one sample, on the
grid (pixel tiles, channel blocks, samples). The nine taps are shifted masked loads of x (the out-of-image ones
read 0), cache hits after the first; tiles are wide in W for planar x and BLOCK_C channels deep for channels-
inner x (8 in backward), so either way the loads run along contiguous memory.

Backward has no shifted loads of d_pre = dL/dy to lean on: with the gate, d_pre is computed from y, which is
recomputed from x. So a backward tile overlaps its neighbours by one pixel on every side: it computes d_pre on
the whole tile, owns only its (BLOCK_H - 2) x (BLOCK_W - 2) interior, and gets dx there by shifting d_pre inside
registers (``tl.gather``, separably: two column shifts, then two row shifts of three row sums). Each program
writes its interior's dweight and dbias sums to its own slot of a partials buffer that the launcher reduces in
a fixed order: bitwise repeatable, no atomics. Without the gate d_pre is dy, read the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lldif_kernels._layout import canonical, channels_inner

# CUDA caps grid axes 1 (channel blocks, one channel each at worst) and 2 (samples) at 2**16 - 1.
_MAX_GRID_YZ = 65535
# Elements of one tile and warps of a full tile: the gated backward holds about twice the forward's registers
# per element (186 at sm_90), so it gets 8 warps; at 4096 elements it spilled even with 16.
_TILE = 2048
_FORWARD_WARPS = 4
_BACKWARD_WARPS = 8
# Widest tile row: planar rows of up to 126 pixels (LLDif's 112, with the backward's overlap) in one tile.
_MAX_BLOCK_W = 128
# Channels-inner tiles: 16 adjacent channels (one 32-byte sector in half precision) of a 16-pixel-wide block;
# 8 in the backward, where 16 left 8 x 16 pixel blocks that lose a third of their pixels to the overlap, and
# the gated bf16 and float64 kernels spilled.
_INNER_BLOCK_C = 16
_INNER_BACKWARD_BLOCK_C = 8
_INNER_BLOCK_W = 16
# Slots per (sample, tile, channel) in the backward partials: the nine dweight taps, then dbias.
_SLOTS = tl.constexpr(10)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _tile(W, HALO: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's sample and its tile's output channels, image rows and image columns as broadcastable
    [BLOCK_C, 1, 1], [1, BLOCK_H, 1] and [1, 1, BLOCK_W] indices; with HALO = 1 the tile starts one pixel
    above and left of the (BLOCK_H - 2) x (BLOCK_W - 2) interior the program owns."""
    # B * C * H * W may pass 2**31, so the sample (the base of its pointers) is int64; offsets inside one
    # sample stay int32.
    sample = tl.program_id(2).to(tl.int64)
    tiles_w = tl.cdiv(W, BLOCK_W - 2 * HALO)
    first_row = (tl.program_id(0) // tiles_w) * (BLOCK_H - 2 * HALO) - HALO
    first_col = (tl.program_id(0) % tiles_w) * (BLOCK_W - 2 * HALO) - HALO
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = first_row + tl.arange(0, BLOCK_H)
    cols = first_col + tl.arange(0, BLOCK_W)
    return sample, channels[:, None, None], rows[None, :, None], cols[None, None, :]


@triton.jit
def _offsets(channels, rows, cols, C, H, W, CHANNELS_INNER: tl.constexpr):
    """In-sample offsets of (channel, row, column) in a (C, H, W) sample of either layout."""
    if CHANNELS_INNER:
        offsets = (rows * W + cols) * C + channels
    else:
        offsets = channels * (H * W) + rows * W + cols
    return offsets


@triton.jit
def _tap(x_ptr, offsets, rows, cols, mask, tap, C, H, W, CHANNELS_INNER: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """x[row + i - 1, col + j - 1] for tap = 3 i + j on the tile at ``offsets``; 0 outside the image and off
    ``mask``."""
    row_step = tap // 3 - 1
    col_step = tap % 3 - 1
    tap_rows = rows + row_step
    tap_cols = cols + col_step
    mask = mask & (tap_rows >= 0) & (tap_rows < H) & (tap_cols >= 0) & (tap_cols < W)
    # The shift is one scalar for the whole tile, not a per-element index computation.
    if CHANNELS_INNER:
        shift = (row_step * W + col_step) * C
    else:
        shift = row_step * W + col_step
    return tl.load(x_ptr + offsets + shift, mask=mask, other=0.0).to(ACC_DTYPE)


@triton.jit
def _conv3x3(
    x_ptr, w_ptr, b_ptr, offsets, channels, channel_mask, rows, cols, C, H, W,
    HAS_BIAS: tl.constexpr, CHANNELS_INNER: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """y = bias + the 3x3 taps of x, for ``channels`` (at ``offsets`` in x) on the rows x cols tile."""
    y = tl.zeros((BLOCK_C, BLOCK_H, BLOCK_W), dtype=ACC_DTYPE)
    if HAS_BIAS:
        y += tl.load(b_ptr + channels, mask=channel_mask, other=0.0).to(ACC_DTYPE)
    # A runtime loop: with tl.static_range the gated forward took 255 registers and spilled at sm_90.
    for tap in range(9):
        weight = tl.load(w_ptr + channels * 9 + tap, mask=channel_mask, other=0.0).to(ACC_DTYPE)
        y += weight * _tap(x_ptr, offsets, rows, cols, channel_mask, tap, C, H, W, CHANNELS_INNER, ACC_DTYPE)
    return y


@triton.jit
def _gelu_and_slope(g, ACC_DTYPE: tl.constexpr):
    """(gelu(g), gelu'(g)) = (g Phi(g), Phi(g) + g phi(g)), Phi and phi the normal CDF and density."""
    # Typed constants: a float literal is a float32 constant, too coarse for float64.
    sqrt_half = tl.full([], 0.7071067811865476, ACC_DTYPE)
    rsqrt_2pi = tl.full([], 0.3989422804014327, ACC_DTYPE)
    cdf = 0.5 * (1.0 + tl.erf(g * sqrt_half))
    pdf = rsqrt_2pi * tl.exp(-0.5 * g * g)
    return g * cdf, cdf + g * pdf


@triton.jit
def _shift(t, index, axis: tl.constexpr):
    """t moved along ``axis`` so that position p holds t[index[p]]: register tiles have no shifted loads."""
    return tl.gather(t, tl.broadcast_to(index, t.shape), axis)


@triton.jit
def _input_grads(
    d_pre, x_ptr, w_ptr, dx_ptr, partial_ptr, offsets, channels, channel_mask, owned, rows, cols, C, H, W,
    CHANNELS_INNER: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """dx of ``channels`` on the ``owned`` interior from d_pre on the whole tile (zero outside the image), and
    the interior's dweight and dbias sums into this program's partials slots."""
    local_rows = tl.arange(0, BLOCK_H)[None, :, None]
    local_cols = tl.arange(0, BLOCK_W)[None, None, :]
    # Clamped indices: only the tile's edge reads past it, and the edge is not owned.
    d_right = _shift(d_pre, tl.minimum(local_cols + 1, BLOCK_W - 1), 2)
    d_left = _shift(d_pre, tl.maximum(local_cols - 1, 0), 2)
    # dx[h, w] = sum_ij w[i, j] d_pre[h - i + 1, w - j + 1]: the row sums of kernel row i, shifted by 1 - i.
    dx = tl.zeros(d_pre.shape, dtype=ACC_DTYPE)
    for i in tl.static_range(3):
        w_left = tl.load(w_ptr + channels * 9 + 3 * i + 2, mask=channel_mask, other=0.0).to(ACC_DTYPE)
        w_centre = tl.load(w_ptr + channels * 9 + 3 * i + 1, mask=channel_mask, other=0.0).to(ACC_DTYPE)
        w_right = tl.load(w_ptr + channels * 9 + 3 * i, mask=channel_mask, other=0.0).to(ACC_DTYPE)
        row_sum = w_right * d_right + w_centre * d_pre + w_left * d_left
        if i == 0:
            dx += _shift(row_sum, tl.minimum(local_rows + 1, BLOCK_H - 1), 1)
        elif i == 1:
            dx += row_sum
        else:
            dx += _shift(row_sum, tl.maximum(local_rows - 1, 0), 1)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=owned)

    d_owned = tl.where(owned, d_pre, 0.0)
    partial_offsets = channels.reshape(channels.shape[0]) * _SLOTS
    channel_mask = channel_mask.reshape(channels.shape[0])
    tl.store(partial_ptr + partial_offsets + 9, tl.sum(tl.sum(d_owned, axis=2), axis=1), mask=channel_mask)
    for tap in range(9):
        x = _tap(x_ptr, offsets, rows, cols, owned, tap, C, H, W, CHANNELS_INNER, ACC_DTYPE)
        tl.store(partial_ptr + partial_offsets + tap, tl.sum(tl.sum(d_owned * x, axis=2), axis=1),
                 mask=channel_mask)


@triton.jit
def _out_channels(C, GATE: tl.constexpr):
    """Channels of the output: the gate halves them."""
    if GATE:
        out_channels = C // 2
    else:
        out_channels = C
    return out_channels


@triton.jit
def _half_offset(out_channels, H, W, CHANNELS_INNER: tl.constexpr):
    """Offset of channel c + out_channels from channel c in x: the gate's second half."""
    if CHANNELS_INNER:
        offset = out_channels
    else:
        offset = out_channels * H * W
    return offset


@triton.jit
def _dwc_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    C, H, W,
    HAS_BIAS: tl.constexpr, GATE: tl.constexpr, CHANNELS_INNER: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    sample, channels, rows, cols = _tile(W, 0, BLOCK_C, BLOCK_H, BLOCK_W)
    out_channels = _out_channels(C, GATE)
    x_ptr += sample * C * H * W
    out_ptr += sample * out_channels * H * W
    channel_mask = channels < out_channels
    offsets = _offsets(channels, rows, cols, C, H, W, CHANNELS_INNER)

    y = _conv3x3(x_ptr, w_ptr, b_ptr, offsets, channels, channel_mask, rows, cols, C, H, W, HAS_BIAS,
                 CHANNELS_INNER, ACC_DTYPE, BLOCK_C, BLOCK_H, BLOCK_W)
    if GATE:
        value = _conv3x3(x_ptr + _half_offset(out_channels, H, W, CHANNELS_INNER), w_ptr + out_channels * 9,
                         b_ptr + out_channels, offsets, channels, channel_mask, rows, cols, C, H, W, HAS_BIAS,
                         CHANNELS_INNER, ACC_DTYPE, BLOCK_C, BLOCK_H, BLOCK_W)
        y = _gelu_and_slope(y, ACC_DTYPE)[0] * value
    mask = channel_mask & (rows < H) & (cols < W)
    tl.store(out_ptr + _offsets(channels, rows, cols, out_channels, H, W, CHANNELS_INNER),
             y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dwc_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, dx_ptr, partial_ptr,
    C, H, W,
    HAS_BIAS: tl.constexpr, GATE: tl.constexpr, CHANNELS_INNER: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    sample, channels, rows, cols = _tile(W, 1, BLOCK_C, BLOCK_H, BLOCK_W)
    out_channels = _out_channels(C, GATE)
    x_ptr += sample * C * H * W
    dx_ptr += sample * C * H * W
    dy_ptr += sample * out_channels * H * W
    partial_ptr += (sample * tl.num_programs(0) + tl.program_id(0)) * C * _SLOTS
    channel_mask = channels < out_channels
    in_image = channel_mask & (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    local_rows = tl.arange(0, BLOCK_H)[None, :, None]
    local_cols = tl.arange(0, BLOCK_W)[None, None, :]
    owned = (in_image & (local_rows > 0) & (local_rows < BLOCK_H - 1) & (local_cols > 0)
             & (local_cols < BLOCK_W - 1))
    offsets = _offsets(channels, rows, cols, C, H, W, CHANNELS_INNER)

    # dy is 0 outside the image, so d_pre is too: the shifts in _input_grads see the convolution's zero padding.
    grad = tl.load(dy_ptr + _offsets(channels, rows, cols, out_channels, H, W, CHANNELS_INNER), mask=in_image,
                   other=0.0).to(ACC_DTYPE)
    if GATE:
        half = _half_offset(out_channels, H, W, CHANNELS_INNER)
        gate = _conv3x3(x_ptr, w_ptr, b_ptr, offsets, channels, channel_mask, rows, cols, C, H, W, HAS_BIAS,
                        CHANNELS_INNER, ACC_DTYPE, BLOCK_C, BLOCK_H, BLOCK_W)
        value = _conv3x3(x_ptr + half, w_ptr + out_channels * 9, b_ptr + out_channels, offsets, channels,
                         channel_mask, rows, cols, C, H, W, HAS_BIAS, CHANNELS_INNER, ACC_DTYPE, BLOCK_C, BLOCK_H,
                         BLOCK_W)
        gelu, slope = _gelu_and_slope(gate, ACC_DTYPE)
        _input_grads(grad * value * slope, x_ptr, w_ptr, dx_ptr, partial_ptr, offsets, channels, channel_mask,
                     owned, rows, cols, C, H, W, CHANNELS_INNER, ACC_DTYPE, BLOCK_H, BLOCK_W)
        _input_grads(grad * gelu, x_ptr + half, w_ptr + out_channels * 9, dx_ptr + half,
                     partial_ptr + out_channels * _SLOTS, offsets, channels, channel_mask, owned, rows, cols, C, H,
                     W, CHANNELS_INNER, ACC_DTYPE, BLOCK_H, BLOCK_W)
    else:
        _input_grads(grad, x_ptr, w_ptr, dx_ptr, partial_ptr, offsets, channels, channel_mask, owned, rows, cols,
                     C, H, W, CHANNELS_INNER, ACC_DTYPE, BLOCK_H, BLOCK_W)


def _launch_config(out_channels: int, height: int, width: int, inner: bool, backward: bool) -> tuple[int, ...]:
    """(BLOCK_C, BLOCK_H, BLOCK_W, num_warps) of one kernel for a problem; a function of the shape alone, so
    the backward's reduction order, hence its result, is too.

    Planar tiles take whole rows (up to _MAX_BLOCK_W), then rows, then channels while a plane is smaller
    than the tile; channels-inner tiles take their channels first. The backward's tiles include the one-pixel
    overlap, so they cover the image plus 2 in each direction.
    """
    overlap = 2 if backward else 0
    if inner:
        block_c = min(triton.next_power_of_2(out_channels), _INNER_BACKWARD_BLOCK_C if backward else _INNER_BLOCK_C)
        block_w = min(triton.next_power_of_2(width + overlap), _INNER_BLOCK_W)
        block_h = min(triton.next_power_of_2(height + overlap), max(_TILE // (block_c * block_w), 4))
    else:
        block_w = min(triton.next_power_of_2(width + overlap), _MAX_BLOCK_W)
        block_h = min(triton.next_power_of_2(height + overlap), _TILE // block_w)
        block_c = min(triton.next_power_of_2(out_channels), max(_TILE // (block_h * block_w), 1))
    num_warps = _BACKWARD_WARPS if backward and block_c * block_h * block_w >= _TILE else _FORWARD_WARPS
    return block_c, block_h, block_w, num_warps


def _grid(
    batch: int, out_channels: int, height: int, width: int, config: tuple[int, ...], backward: bool
) -> tuple[int, int, int]:
    """(pixel tiles, channel blocks, samples); backward tiles own only their interiors."""
    block_c, block_h, block_w, _ = config
    overlap = 2 if backward else 0
    tiles = triton.cdiv(height, block_h - overlap) * triton.cdiv(width, block_w - overlap)
    return tiles, triton.cdiv(out_channels, block_c), batch


def _accumulator_dtype(x: torch.Tensor) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def limit_reasons(batch: int, channels: int, height: int, width: int) -> list[str]:
    """Why these kernels cannot serve a (batch, channels, height, width) problem (empty when they can)."""
    reasons = []
    # Planar tiles of large images hold one channel, so grid axis 1 may need one program per channel.
    if channels > _MAX_GRID_YZ:
        reasons.append(f"C={channels} exceeds the CUDA grid limit of {_MAX_GRID_YZ} channel blocks")
    if batch > _MAX_GRID_YZ:
        reasons.append(f"batch {batch} exceeds the CUDA grid limit of {_MAX_GRID_YZ}")
    # Lanes past the image may wrap their int32 offsets; they are masked, never read or written.
    if channels * height * width >= 2**31:
        reasons.append(f"one sample of {channels} x {height} x {width} elements exceeds the kernels' int32 "
                       "offsets")
    return reasons


def _validate(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: bool
) -> tuple[bool, torch.Tensor]:
    """Check the arguments; return whether x is channels-inner and the weight as a contiguous (C, 9)."""
    if x.dim() != 4 or x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x must be a (B, C, H, W) float tensor, got {tuple(x.shape)} {x.dtype}")
    if canonical(x) is not x:
        raise ValueError(f"x must be contiguous or channels_last, got strides {x.stride()}")
    batch, channels, height, width = x.shape
    if gate and channels % 2:
        raise ValueError(f"gate needs an even number of channels, got C={channels}")
    for name, t, shape in (("weight", weight, (channels, 1, 3, 3)), ("bias", bias, (channels,))):
        if t is None:
            continue
        if t.shape != shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must be a {shape} {x.dtype} tensor on {x.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    reasons = limit_reasons(batch, channels, height, width)
    if reasons:
        raise ValueError("; ".join(reasons))
    return channels_inner(x), weight.reshape(channels, 9).contiguous()


def _new_like(x: torch.Tensor, channels: int, inner: bool) -> torch.Tensor:
    """An empty (B, channels, H, W) tensor in x's dtype and layout."""
    batch, _, height, width = x.shape
    memory_format = torch.channels_last if inner else torch.contiguous_format
    return torch.empty((batch, channels, height, width), dtype=x.dtype, device=x.device, memory_format=memory_format)


def depthwise_conv3x3_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              gate: bool) -> torch.Tensor:
    """y = depth-wise 3x3 conv of x (padding 1) + bias; with ``gate``, gelu(y[:, :C/2]) * y[:, C/2:]."""
    inner, weight = _validate(x, weight, bias, gate)
    batch, channels, height, width = x.shape
    out_channels = channels // 2 if gate else channels
    out = _new_like(x, out_channels, inner)
    if out.numel() == 0:
        return out
    config = _launch_config(out_channels, height, width, inner, backward=False)
    block_c, block_h, block_w, num_warps = config
    # Without a bias any tensor stands in for its pointer.
    _dwc_fwd_kernel[_grid(batch, out_channels, height, width, config, backward=False)](
        x, weight, weight if bias is None else bias.contiguous(), out, channels, height, width,
        HAS_BIAS=bias is not None, GATE=gate, CHANNELS_INNER=inner, ACC_DTYPE=_accumulator_dtype(x)[1],
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps,
    )
    return out


def depthwise_conv3x3_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of ``depthwise_conv3x3_forward`` for upstream gradient dy (y recomputed)."""
    inner, weight9 = _validate(x, weight, bias, gate)
    batch, channels, height, width = x.shape
    out_channels = channels // 2 if gate else channels
    if dy.shape != (batch, out_channels, height, width) or dy.device != x.device:
        raise ValueError(f"dy must be a {(batch, out_channels, height, width)} tensor on {x.device}, "
                         f"got {tuple(dy.shape)} on {dy.device}")
    dx = torch.empty_like(x)
    if dx.numel() == 0:
        return dx, torch.zeros_like(weight), torch.zeros((channels,), dtype=x.dtype, device=x.device)
    # Gradients often arrive as stride-0 expands or in another dtype; the kernel reads dy in out's layout.
    like = _new_like(x, out_channels, inner)
    if dy.dtype != x.dtype or dy.stride() != like.stride():
        dy = like.copy_(dy)
    acc_dtype, acc = _accumulator_dtype(x)
    config = _launch_config(out_channels, height, width, inner, backward=True)
    block_c, block_h, block_w, num_warps = config
    grid = _grid(batch, out_channels, height, width, config, backward=True)
    partials = torch.empty((batch, grid[0], channels, int(_SLOTS)), dtype=acc_dtype, device=x.device)
    # The bias reaches the gradients only through the gate's recomputed y.
    _dwc_bwd_kernel[grid](
        dy, x, weight9, weight9 if bias is None else bias.contiguous(), dx, partials, channels, height, width,
        HAS_BIAS=gate and bias is not None, GATE=gate, CHANNELS_INNER=inner, ACC_DTYPE=acc,
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps,
    )
    # Two reductions: the custom op's outputs must not be views of one buffer.
    dweight = partials[..., :9].sum((0, 1)).to(x.dtype).reshape(channels, 1, 3, 3)
    return dx, dweight, partials[..., 9].sum((0, 1)).to(x.dtype)


def _compile_check_case(
    kernel: triton.JITFunction, dtype: str, channels_inner: bool, gate: bool, channels: int, height: int, width: int
) -> dict:
    """AOT signature of ``kernel`` as the JIT specialises it for a (B, channels, height, width) input of one dtype
    and layout, with a bias where the kernel reads one (multiples of 16 are marked divisible)."""
    backward = kernel is _dwc_bwd_kernel
    config = _launch_config(channels // 2 if gate else channels, height, width, channels_inner, backward)
    block_c, block_h, block_w, num_warps = config
    acc_dtype = "fp64" if dtype == "fp64" else "fp32"
    constexprs = {"HAS_BIAS": gate or not backward, "GATE": gate, "CHANNELS_INNER": channels_inner,
                  "ACC_DTYPE": getattr(tl, "float64" if dtype == "fp64" else "float32"),
                  "BLOCK_C": block_c, "BLOCK_H": block_h, "BLOCK_W": block_w}
    integers = {"C": channels, "H": height, "W": width}
    signature = {
        name: "constexpr" if name in constexprs
        else "i32" if name in integers
        else f"*{acc_dtype}" if name == "partial_ptr"
        else f"*{dtype}"
        for name in kernel.arg_names
    }
    layout = "channels-inner" if channels_inner else "planar"
    pass_name = "bwd" if backward else "fwd"
    return {
        "name": f"{pass_name} {dtype} {layout} gate={gate} C={channels} {height}x{width} "
                f"tile={block_c}x{block_h}x{block_w} warps={num_warps}",
        "fn": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "options": {"num_warps": num_warps},
        # torch allocations are 16-byte aligned, so the JIT marks every pointer divisible by 16.
        "divisible_by_16": [name for name, kind in signature.items()
                            if kind.startswith("*") or (kind == "i32" and integers[name] % 16 == 0)],
    }


# The largest LLDif image in every shipped dtype, then float32 (half precision changes only loads and stores)
# at a channel count and image size that are not multiples of 16, at the smallest image (planar tiles of 8
# channels), and at the 64 x 64 images; float64 once, the register-heaviest (gated backward).
_CHECKED = (
    [((96, 112, 112), dtype, gate) for dtype in ("fp32", "fp16", "bf16") for gate in (False, True)]
    + [(shape, "fp32", gate) for shape in ((340, 28, 28), (384, 14, 14), (84, 64, 64)) for gate in (False, True)]
    + [((170, 56, 56), "fp64", True)]
)
COMPILE_CHECK_CASES = [
    _compile_check_case(kernel, dtype, channels_inner, gate, *shape)
    for kernel in (_dwc_fwd_kernel, _dwc_bwd_kernel)
    for shape, dtype, gate in _CHECKED
    for channels_inner in (False, True)
]
