"""window_cross_attention at LLDif's three DLNet scales (B=8, d=32, one window per image): POSTER++-style eager
reference (bias materialised), scaled_dot_product_attention with the bias as a float mask, torch.compile of
the reference, FlexAttention with the bias as a score_mod (on CUDA), and ours.

As in LLDif, the landmark queries of scales 1 and 2 come from a frozen network, so fwd+bwd computes dq only
at scale 3 (ws 7). For E = W*heads*M*d elements per tensor of s bytes and M = ws² keys per query:
  FLOPs    fwd 4*E*M (q kᵀ and P v); fwd+bwd adds 6*E*M (dO vᵀ, Pᵀ dO, dSᵀ q), 8*E*M with dq (dS k).
           The fused backward's recomputation of q kᵀ is its own overhead and is not counted.
  bytes    fwd: read q, k, v, write out = 4*E*s; fwd+bwd adds read q, k, v, dO, out, write dk, dv (and dq)
           = 7*E*s (8*E*s)
Peak memory is that of one fwd+bwd call beyond its inputs (see bench_utils.peak_memory_bytes).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from bench_utils import (
    ACCELERATOR_PROVIDERS,
    CUDA,
    DEVICE,
    bundle,
    clone_bytes_per_second,
    pass_call,
    peak_memory_bytes,
    provider_op,
    record,
)

import lldif_kernels
from lldif_kernels import reference

# (heads, ws, whether q needs a gradient) of DLNet's scales 1-3; d = 32 at every scale.
SCALES = [(2, 28, False), (4, 14, False), (8, 7, True)]
BATCH, HEAD_DIM = 8, 32
WCA_PROVIDERS = ("eager", "sdpa", "compile", *(("flex",) if CUDA else ()), *ACCELERATOR_PROVIDERS)


def sdpa_attention(q, k, v, table, window_size):
    """The reference's math through scaled_dot_product_attention, the bias gathered into a float mask."""
    tokens, heads = window_size**2, table.shape[1]
    bias = table[reference.relative_position_index(window_size, table.device).reshape(-1)]
    bias = bias.reshape(tokens, tokens, heads).permute(2, 0, 1).to(k.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@functools.cache
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q, k, v, table, window_size):
    """FlexAttention with the bias computed from token coordinates in a score_mod, never materialised."""
    side = 2 * window_size - 1

    def bias(score, batch, head, q_idx, kv_idx):
        rows = q_idx // window_size - kv_idx // window_size + window_size - 1
        cols = q_idx % window_size - kv_idx % window_size + window_size - 1
        return score + table[rows * side + cols, head].to(score.dtype)

    return _flex_attention()(q, k, v, score_mod=bias)


def wca_op(provider):
    if provider == "sdpa":
        return sdpa_attention
    if provider == "flex":
        return flex_attention
    return provider_op(provider, reference.window_cross_attention, lldif_kernels.window_cross_attention)


@pytest.mark.parametrize("provider", WCA_PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("scale", SCALES, ids=lambda scale: f"h{scale[0]}@ws{scale[1]}")
def test_window_cross_attention(benchmark, scale, pass_, provider):
    heads, window_size, q_trained = scale
    tokens = window_size**2
    shape = (BATCH, heads, tokens, HEAD_DIM)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(3))
    table = (0.02 * torch.randn((2 * window_size - 1) ** 2, heads, generator=gen)).to(DEVICE)
    op = wca_op(provider)
    try:
        call = pass_call(lambda *t: op(*t, window_size), (q, k, v, table), pass_, frozen=() if q_trained else (0,))
    except Exception as error:  # FlexAttention's support differs between torch versions and devices
        if provider != "flex":
            raise
        pytest.skip(f"FlexAttention cannot run this: {type(error).__name__}: {error}")
    benchmark.group = f"window_cross_attention {pass_} h{heads}@ws{window_size}"
    benchmark(bundle(call))
    elements = q.numel()
    backward_flops = 8 if q_trained else 6
    backward_bytes = 8 if q_trained else 7
    record(
        benchmark,
        bytes_moved=(4 if pass_ == "fwd" else 4 + backward_bytes) * elements * q.element_size(),
        clone_bandwidth=clone_bytes_per_second(q),
        formula="4*E*s (fwd); + 7*E*s, 8*E*s with dq (fwd+bwd)",
        flops=(4 if pass_ == "fwd" else 4 + backward_flops) * elements * tokens,
        flops_formula="4*E*M (fwd); + 6*E*M, 8*E*M with dq (fwd+bwd)",
        peak_bytes=peak_memory_bytes(call) if pass_ == "fwd+bwd" else None,
    )
