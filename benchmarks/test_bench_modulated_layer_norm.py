"""modulated_layer_norm at the DTNet shapes (B=8): eager DiffIR-style reference, its torch.compile, and ours.

Bytes per call, for N = B*C*H*W elements of s bytes (the (B, C) modulation is negligible):
  fwd      read x, write y                        = 2*N*s
  fwd+bwd  fwd, then read x, read dy, write dx    = 5*N*s
"""

from __future__ import annotations

import pytest
import torch
from bench_utils import DEVICE, PROVIDERS, bundle, clone_bytes_per_second, pass_call, provider_op, record

import lldif_kernels
from lldif_kernels import reference

SHAPES = [(8, 48, 112, 112), (8, 96, 56, 56), (8, 192, 28, 28), (8, 384, 14, 14)]
BYTES_PER_ELEMENT_MOVED = {"fwd": 2, "fwd+bwd": 5}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"C{s[1]}@{s[2]}")
def test_modulated_layer_norm(benchmark, shape, pass_, provider):
    gen = torch.Generator().manual_seed(0)
    batch, channels = shape[:2]
    x = torch.randn(shape, generator=gen).to(DEVICE)
    params = [torch.randn(batch, channels, generator=gen).to(DEVICE) for _ in range(2)]
    params += [torch.randn(channels, generator=gen).to(DEVICE) for _ in range(2)]
    op = provider_op(provider, reference.modulated_layer_norm, lldif_kernels.modulated_layer_norm)
    call = pass_call(op, (x, *params), pass_)
    benchmark.group = f"modulated_layer_norm {pass_} C{channels}@{shape[2]}"
    benchmark(bundle(call))
    record(
        benchmark,
        bytes_moved=BYTES_PER_ELEMENT_MOVED[pass_] * x.numel() * x.element_size(),
        clone_bandwidth=clone_bytes_per_second(x),
        formula="2*N*s (fwd), 5*N*s (fwd+bwd)",
    )
