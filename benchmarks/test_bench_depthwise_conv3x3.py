"""depthwise_conv3x3 at LLDif's DTNet shapes: the feed-forward's gated convolution (C = 2 * hidden channels)
and the attention's qkv convolution (C = 3 * dim), eager (F.conv2d, then F.gelu(first half) * second half),
its torch.compile, and ours.

For N = B*C*H*W input elements of s bytes (gated: N/2 output elements):
  bytes    gated:   fwd read x, write out = 1.5*N*s; fwd+bwd adds read x, dy, write dx = 4*N*s
           ungated: fwd 2*N*s; fwd+bwd 5*N*s
  FLOPs    18*N per 3x3 stencil (9 multiply-adds per element); fwd one stencil, fwd+bwd four (forward,
           the backward's recomputation when gated, dx and dweight; ungated three); GELU's few FLOPs left out
The roofline is max(bytes at the same-run clone bandwidth, FLOPs at the measured matmul rate).
"""

from __future__ import annotations

import pytest
import torch
from bench_utils import (
    DEVICE,
    PROVIDERS,
    bundle,
    clone_bytes_per_second,
    matmul_flops_per_second,
    pass_call,
    peak_memory_bytes,
    provider_op,
    record,
)

import lldif_kernels
from lldif_kernels import reference

# (B, C, side, gate): the tiny preset's stage-2 step (B=16; dims 16/32/64 at 64/32/16 px, ffn_expansion 2.66)
# and the base preset's levels (B=8; dims 48/96/192/384 at 112/56/28/14 px).
SHAPES = [
    (16, 84, 64, True), (16, 170, 32, True), (16, 340, 16, True), (16, 48, 64, False),
    (8, 254, 112, True), (8, 510, 56, True), (8, 1020, 28, True), (8, 144, 112, False),
]
BYTES_PER_ELEMENT = {(True, "fwd"): 1.5, (True, "fwd+bwd"): 4, (False, "fwd"): 2, (False, "fwd+bwd"): 5}
STENCILS = {(True, "fwd"): 1, (True, "fwd+bwd"): 4, (False, "fwd"): 1, (False, "fwd+bwd"): 3}


def shape_id(shape: tuple) -> str:
    batch, channels, side, gate = shape
    return f"{'gated' if gate else 'qkv'}-B{batch}-C{channels}@{side}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_depthwise_conv3x3(benchmark, shape, pass_, provider):
    batch, channels, side, gate = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, side, side, generator=gen).to(DEVICE)
    weight = (torch.randn(channels, 1, 3, 3, generator=gen) / 3).to(DEVICE)
    op = provider_op(provider, reference.depthwise_conv3x3, lldif_kernels.depthwise_conv3x3)
    call = pass_call(lambda x, w: op(x, w, None, gate), (x, weight), pass_)
    benchmark.group = f"depthwise_conv3x3 {pass_} {shape_id(shape)}"
    benchmark(bundle(call))
    record(
        benchmark,
        bytes_moved=int(BYTES_PER_ELEMENT[gate, pass_] * x.numel() * x.element_size()),
        clone_bandwidth=clone_bytes_per_second(x),
        formula="gated 1.5*N*s (fwd), 4*N*s (fwd+bwd); ungated 2*N*s, 5*N*s",
        flops=18 * STENCILS[gate, pass_] * x.numel(),
        flops_formula="18*N per stencil: gated 1 (fwd), 4 (fwd+bwd); ungated 1, 3",
        peak_bytes=peak_memory_bytes(call) if pass_ == "fwd+bwd" else None,
        matmul_rate=matmul_flops_per_second(x.dtype),
    )
