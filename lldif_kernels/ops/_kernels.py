"""What the op modules share: a backend's kernels by the op's name, the accumulation dtype, tensor checks."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from .. import dispatch


def kernels(op: str, backend: str) -> tuple[Callable, Callable]:
    """(forward, backward) kernels of ``op`` on a fused backend, found by the names every op uses:
    ``lldif_native::<op>_fwd`` / ``_bwd`` for cpp and cuda (the dispatcher routes by device), and
    ``<op>_forward`` / ``<op>_backward`` in ``lldif_kernels.triton.<op>``, imported on first use."""
    if backend == "triton":
        module = importlib.import_module(f"lldif_kernels.triton.{op}")
        return getattr(module, f"{op}_forward"), getattr(module, f"{op}_backward")
    if backend == dispatch.EMULATED_CUDA:
        return dispatch.emulated_cuda_kernels(op)
    native = torch.ops.lldif_native
    return getattr(native, f"{op}_fwd"), getattr(native, f"{op}_bwd")


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for every input dtype but float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_tensor(name: str, t: object, like: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
    """A floating-point tensor, on the device of ``like = (its name, tensor)`` when given; else raises
    naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if like is not None and t.device != like[1].device:
        raise ValueError(f"{name} is on {t.device} but {like[0]} is on {like[1].device}")
    return t


def triton_limit_reasons(op: str, backend: str, *shape: int) -> list[str]:
    """Why ``op``'s Triton kernels cannot serve a shape (the module's ``limit_reasons(*shape)``); [] for the other
    backends, and when triton is missing (the dispatcher already says so)."""
    if backend != "triton":
        return []
    try:
        module = importlib.import_module(f"lldif_kernels.triton.{op}")
    except ImportError:
        return []
    return module.limit_reasons(*shape)


def kernel_limit_reasons(op: str, backend: str, dim: int, cuda_max_dim: int, *shape: int) -> list[str]:
    """Why ``op``'s kernels on ``backend`` cannot serve a shape, beyond the dispatcher's availability, device
    and dtype checks: the CUDA kernels' head-dimension limit, or the Triton module's ``limit_reasons(*shape)``."""
    if backend in ("cuda", dispatch.EMULATED_CUDA) and dim > cuda_max_dim:
        return [f"d={dim} channels per head exceeds the CUDA kernels' limit of {cuda_max_dim}"]
    return triton_limit_reasons(op, backend, *shape)
