"""Shared by the op tests: which backends run where, and the FlashAttention tolerance rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from lldif_kernels import dispatch

BASE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def backend_params() -> list:
    """(backend, device) pairs: CPU ones always (skipped when unavailable; the CUDA kernels run on CPU tensors
    under the host emulation of tests/cuda_host), CUDA ones marked `cuda`."""
    cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    return [
        pytest.param("cpp", "cpu", id="cpp"),
        pytest.param("triton", "cpu", id="triton-interpreter"),
        pytest.param(dispatch.EMULATED_CUDA, "cpu", id="cuda-emulated"),
        pytest.param("cuda", "cuda", id="cuda", marks=cuda),
        pytest.param("triton", "cuda", id="triton-cuda", marks=cuda),
    ]


def skip_unless_serves(backend: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    reasons = dispatch.not_supported_reasons(backend, torch.device(device), [dtype])
    if reasons:
        pytest.skip(f"{backend} on {device}: " + "; ".join(reasons))


def assert_within_tolerance(
    name: str, out: torch.Tensor, exact: torch.Tensor, eager: torch.Tensor, term_scale: float = 0.0
) -> None:
    """FlashAttention's rule: error vs the float64 result <= 2x the eager same-dtype error + atol.

    atol is relative to the largest exact value, or to ``term_scale`` when the result is a difference of
    larger terms (the kernel's rounding is relative to those, not to what is left after they cancel).
    Elements where eager broke down (inf or nan) count only eager's error elsewhere.
    """
    assert out.shape == exact.shape and out.dtype == eager.dtype, (name, out.shape, out.dtype, eager.dtype)
    scale = max(exact.abs().max().clamp(min=1).item() if exact.numel() else 1.0, term_scale)
    atol = BASE_ATOL[out.dtype] * scale
    error = (out.double() - exact).abs().max().item() if exact.numel() else 0.0
    eager_errors = (eager.double() - exact).abs()
    eager_errors = eager_errors[eager_errors.isfinite()]
    eager_error = eager_errors.max().item() if eager_errors.numel() else 0.0
    assert error <= 2 * eager_error + atol, f"{name}: error {error:.3g} > 2 * eager {eager_error:.3g} + {atol:.3g}"



def assert_compiled_gradients_match(step: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
    """``torch.compile(step, fullgraph=True)`` traces without a graph break and gives eager's gradients."""
    compiled = torch.compile(step, fullgraph=True)
    eager_grads = torch.autograd.grad(step(*inputs), inputs)
    compiled_grads = torch.autograd.grad(compiled(*inputs), inputs)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)
