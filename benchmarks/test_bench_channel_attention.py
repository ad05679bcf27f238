"""channel_attention at LLDif's DTNet shapes (B=8, d=48): eager Restormer-style reference, its torch.compile,
and ours.

For E = B*heads*d*N elements per tensor of s bytes, and d channels per head:
  FLOPs    fwd 4*E*d (the Gram q kᵀ and P v, 2 per multiply-add); fwd+bwd 12*E*d (backward adds dO vᵀ,
           M k, Mᵀ q and Pᵀ dO); the O(E) normalisation and O(d²) softmax terms are left out
  bytes    fwd: read q, k, v, write out = 4*E*s; fwd+bwd: fwd, then read dO, v (pass 1), q, k, dO (pass 2),
           write dq, dk, dv = 12*E*s
Peak memory is that of one fwd+bwd call beyond its inputs (see bench_utils.peak_memory_bytes); the fused
kernels' own workspace, the d x d partial sums per split of N, is under 1 MB at these shapes and is not in it.
"""

from __future__ import annotations

import pytest
import torch
from bench_utils import (
    DEVICE,
    PROVIDERS,
    bundle,
    clone_bytes_per_second,
    pass_call,
    peak_memory_bytes,
    provider_op,
    record,
)

import lldif_kernels
from lldif_kernels import reference

# (heads, H = W) of LLDif's levels 1-4; d = 48 at every level.
LEVELS = [(1, 112), (2, 56), (4, 28), (8, 14)]
BATCH, HEAD_DIM = 8, 48
BYTES_PER_ELEMENT_MOVED = {"fwd": 4, "fwd+bwd": 12}
FLOPS_PER_ELEMENT_PER_D = {"fwd": 4, "fwd+bwd": 12}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("level", LEVELS, ids=lambda level: f"h{level[0]}@{level[1]}")
def test_channel_attention(benchmark, level, pass_, provider):
    heads, side = level
    shape = (BATCH, heads, HEAD_DIM, side * side)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(3))
    temperature = torch.ones(heads, 1, 1, device=DEVICE)
    op = provider_op(provider, reference.channel_attention, lldif_kernels.channel_attention)
    call = pass_call(op, (q, k, v, temperature), pass_)
    benchmark.group = f"channel_attention {pass_} h{heads}@{side}"
    benchmark(bundle(call))
    elements = q.numel()
    record(
        benchmark,
        bytes_moved=BYTES_PER_ELEMENT_MOVED[pass_] * elements * q.element_size(),
        clone_bandwidth=clone_bytes_per_second(q),
        formula="4*E*s (fwd), 12*E*s (fwd+bwd)",
        flops=FLOPS_PER_ELEMENT_PER_D[pass_] * elements * HEAD_DIM,
        flops_formula="4*E*d (fwd), 12*E*d (fwd+bwd)",
        peak_bytes=peak_memory_bytes(call) if pass_ == "fwd+bwd" else None,
    )
