"""Chooses the backend of each op call, outside autograd, and says why a backend declines.

Backends: ``reference`` (plain PyTorch), ``cpp`` (C++ CPU extension), ``cuda`` (C++/CUDA extension) and
``triton``. The choice, in order of precedence: the call's ``backend=`` argument, the innermost
``use_backend(...)``, the ``LLDIF_BACKEND`` environment variable, else automatic. A backend that was asked
for and cannot serve the inputs raises :class:`BackendNotSupportedError` listing its reasons; the
automatic choice takes the first backend of :data:`AUTO_ORDER` that can, ending at ``reference``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence

import torch

from . import _extension

BACKENDS = ("reference", "cpp", "cuda", "triton")
ENV_VAR = "LLDIF_BACKEND"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# The CUDA C++ kernels join the CUDA order only for shapes that `make gpu-check` has measured correct
# and faster on a GPU; none is recorded yet, so they run only when asked for.
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")}

OpReasons = Callable[[str], list[str]]
KernelsOf = Callable[[str], tuple[Callable, Callable]]

# Tests only: tests/cuda_host compiles csrc/cuda for the host and serves those kernels on CPU tensors under
# this name (serve_emulated_cuda). It is not one of BACKENDS, so explain() and users never see it.
EMULATED_CUDA = "cuda_emulated"
_emulated_cuda: KernelsOf | None = None

_selected: str | None = None  # by use_backend


class BackendNotSupportedError(RuntimeError):
    """A backend that was asked for explicitly cannot serve the given inputs."""


def serve_emulated_cuda(kernels: KernelsOf | None) -> None:
    """Tests only: backend ``cuda_emulated`` runs ``kernels(op) -> (forward, backward)`` on CPU tensors, the
    host emulation of the CUDA kernels; None withdraws it."""
    global _emulated_cuda
    _emulated_cuda = kernels


def emulated_cuda_kernels(op: str) -> tuple[Callable, Callable]:
    """(forward, backward) of ``op`` in the host emulation of the CUDA kernels, when tests serve it."""
    if _emulated_cuda is None:
        raise BackendNotSupportedError(f"{op}: backend {EMULATED_CUDA!r} is served only by the tests")
    return _emulated_cuda(op)


def _checked_name(name: str | None, what: str) -> str | None:
    if name is not None and name not in BACKENDS and name != EMULATED_CUDA:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


class use_backend:
    """Select the backend of every op: for the rest of the program, or inside a ``with`` block.

    ``use_backend(None)`` returns to the environment variable / automatic choice.
    """

    def __init__(self, name: str | None) -> None:
        global _selected
        self._previous = _selected
        _selected = _checked_name(name, "backend")

    def __enter__(self) -> use_backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _selected
        _selected = self._previous


def requested_backend() -> str | None:
    """The backend selected by ``use_backend`` or ``LLDIF_BACKEND``, if any."""
    return _selected or _checked_name(os.environ.get(ENV_VAR) or None, ENV_VAR)


_TRITON_MISSING = None if importlib.util.find_spec("triton") else "triton is not installed"
# Triton reads it when its kernels are first imported, so a later change would not take effect.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def not_supported_reasons(
    backend: str, device: torch.device, dtypes: Sequence[torch.dtype], op_reasons: OpReasons | None = None
) -> list[str]:
    """Why ``backend`` cannot serve tensors of these dtypes on ``device`` (empty when it can)."""
    if backend == "reference":
        return []
    reasons = []
    unavailable = {
        "cpp": _extension.CPP_UNAVAILABLE,
        "cuda": _extension.CUDA_UNAVAILABLE,
        "triton": _TRITON_MISSING,
        EMULATED_CUDA: None if _emulated_cuda else "the host emulation of the CUDA kernels is test "
                                                   "infrastructure: only the tests serve it (tests/cuda_host)",
    }[backend]
    if unavailable:
        reasons.append(unavailable)
    if backend in ("cpp", EMULATED_CUDA) and device.type != "cpu":
        reasons.append(f"the {backend} backend serves CPU tensors, these are on {device}")
    if backend == "cuda" and device.type != "cuda":
        reasons.append(f"the cuda backend serves CUDA tensors, these are on {device}")
    if backend == "triton" and device.type == "cpu" and not _TRITON_INTERPRET:
        reasons.append("triton runs CPU tensors only under TRITON_INTERPRET=1 (set before lldif_kernels is imported)")
    if backend == "triton" and device.type not in ("cpu", "cuda"):
        reasons.append(f"triton serves CUDA tensors, these are on {device}")
    bad_dtypes = sorted({str(dtype) for dtype in dtypes if dtype not in DTYPES})
    if bad_dtypes:
        reasons.append(f"dtype {', '.join(bad_dtypes)} is not one of float32, float16, bfloat16, float64")
    if op_reasons is not None:
        reasons.extend(op_reasons(backend))
    return reasons


def _device_and_dtypes(tensors: Sequence[torch.Tensor | None]) -> tuple[torch.device, list[torch.dtype]]:
    present = [t for t in tensors if t is not None]
    return present[0].device, [t.dtype for t in present]


def explain(
    tensors: Sequence[torch.Tensor | None] | None = None, op_reasons: OpReasons | None = None
) -> dict[str, list[str]]:
    """Every backend with its reasons for declining these inputs (empty list: it can serve them); without
    inputs, for float32 tensors on this process's default device (CUDA when there is one): what this
    installation can run."""
    if tensors is None:
        device, dtypes = torch.device("cuda" if torch.cuda.is_available() else "cpu"), [torch.float32]
    else:
        device, dtypes = _device_and_dtypes(tensors)
    return {backend: not_supported_reasons(backend, device, dtypes, op_reasons) for backend in BACKENDS}


def select(
    op: str,
    backend: str | None,
    tensors: Sequence[torch.Tensor | None],
    op_reasons: OpReasons | None = None,
) -> str:
    """The backend that runs ``op`` on ``tensors``: the requested one, else the first that can."""
    name = _checked_name(backend, "backend") or requested_backend()
    device, dtypes = _device_and_dtypes(tensors)
    if name is not None:
        reasons = not_supported_reasons(name, device, dtypes, op_reasons)
        if reasons:
            raise BackendNotSupportedError(f"{op}: backend {name!r} cannot serve these inputs: " + "; ".join(reasons))
        return name
    for candidate in AUTO_ORDER.get(device.type, ()):
        if not not_supported_reasons(candidate, device, dtypes, op_reasons):
            return candidate
    return "reference"


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run float32 ops on ``device`` in this process."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    return [b for b in BACKENDS if not not_supported_reasons(b, device, [torch.float32])]
