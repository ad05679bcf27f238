"""NVTX ranges around the ops (`lldif::<op>:fwd|bwd`), no-ops where CUDA is absent."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# torch.cuda.nvtx raises on CPU-only builds, and a range costs a call even when nobody records it.
_ENABLED = torch.cuda.is_available()


@contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """Mark the enclosed work as ``name`` in Nsight Systems timelines."""
    if not _ENABLED:
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
