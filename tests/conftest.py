"""Test set-up: Triton kernels run on CPU tensors through the interpreter when there is no GPU, and the CUDA
kernels through the host emulation of tests/cuda_host when a collected test asks for that backend."""

import os

import pytest
import torch

# Triton reads this when a kernel module is first imported, so it must precede every lldif_kernels import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_EMULATOR = pytest.StashKey()


def pytest_collection_finish(session) -> None:
    """Builds and serves the emulation when a selected test runs on it (after -m / -k deselection, so that
    `pytest -m cuda` on a GPU machine does not build it)."""
    from cuda_host import backend

    from lldif_kernels import dispatch

    wanted = any(getattr(item, "callspec", None) and item.callspec.params.get("backend") == dispatch.EMULATED_CUDA
                 for item in session.items)
    if wanted and backend.variant() != "off":
        session.config.stash[_EMULATOR] = backend.serve(backend.variant())


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Which of csrc/cuda's kernel instantiations the emulated tests ran."""
    from cuda_host import backend

    emulator = config.stash.get(_EMULATOR, None)
    if emulator is None or not emulator.launch_count():
        return
    ran, missed = backend.kernel_coverage(emulator)
    listed = config.getoption("verbose") > 0
    terminalreporter.write_line(f"CUDA kernels run on the host emulation: {len(ran)} of {len(ran) + len(missed)} "
                                f"instantiations ({emulator.launch_count()} launches)"
                                + ("" if listed or not missed else "; -v lists the others"))
    for name in missed if listed else ():
        terminalreporter.write_line(f"  not run: {name}")
