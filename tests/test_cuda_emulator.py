"""The host emulation of the CUDA execution model (tests/cuda_host) against kernels with known answers, and its
launch and misuse checks; the op kernels themselves run on it in the op test files (backend cuda-emulated)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cuda_host import backend

import lldif_kernels
from lldif_kernels import dispatch, reference


@pytest.fixture(scope="module")
def emulator():
    if backend.variant() == "off":
        pytest.skip(f"{backend.ENV_VAR}=off")
    return backend.build(backend.variant())


def test_the_emulated_backend_is_for_the_tests_only(monkeypatch):
    assert dispatch.EMULATED_CUDA not in dispatch.explain() and dispatch.EMULATED_CUDA not in dispatch.BACKENDS
    monkeypatch.setattr(dispatch, "_emulated_cuda", None)
    x, scale = torch.randn(1, 4, 2, 2), torch.ones(1, 4)
    with pytest.raises(dispatch.BackendNotSupportedError, match="only the tests serve it"):
        lldif_kernels.modulated_layer_norm(x, scale, scale, backend=dispatch.EMULATED_CUDA)
    reasons = dispatch.not_supported_reasons(dispatch.EMULATED_CUDA, torch.device("meta"), [torch.float32])
    assert "the cuda_emulated backend serves CPU tensors, these are on meta" in reasons


def test_warp_shuffles_follow_cuda_semantics(emulator):
    out = emulator.shuffles()
    for thread in range(64):
        lane = thread % 32
        xor, down, indexed, up, xor_in_segments = out[5 * thread:5 * thread + 5]
        assert xor == (lane ^ 3) * 10
        assert down == (lane + 5 if lane + 5 < 32 else lane)
        assert indexed == lane // 8 * 8 + 7
        assert up == (lane - 2 if lane % 16 >= 2 else lane)
        assert xor_in_segments == (lane ^ 8 if lane & 8 else lane)


def test_ballot(emulator):
    expected = [sum(1 << lane for lane in range(32) if (warp * 32 + lane) % 3 == 0) for warp in range(2)]
    assert emulator.ballot() == [expected[thread // 32] for thread in range(64)]


@pytest.mark.parametrize("block", [32, 256, 1024])
def test_barriers_hold_across_the_block(emulator, block):
    values = [float(i % 7) for i in range(3 * block)]
    sums, error = emulator.block_sums(values, block)
    assert error == "" and sums == [sum(values[i * block:(i + 1) * block]) for i in range(3)]


def test_dynamic_shared_memory_is_shared_by_the_block(emulator):
    out, error = emulator.dynamic_shared(96)
    assert error == "" and out[:96] == [(t + 1) % 96 for t in range(96)]


def test_schedules_expose_a_race(emulator):
    """Thread t reads thread t+1's shared slot with no barrier between: in ascending order it gets the previous
    launch's value (only thread 63 sees this launch's, from thread 0); another order gives another pattern."""
    def from_this_launch(values):
        return [v // 1000 == max(x // 1000 for x in values) for v in values]

    in_order = emulator.racy()[:64]
    emulator.set_schedule(7)
    try:
        shuffled = emulator.racy()[:64]
    finally:
        emulator.set_schedule(0)
    assert from_this_launch(in_order) == [False] * 63 + [True]
    assert from_this_launch(shuffled) != from_this_launch(in_order)


@pytest.mark.parametrize(("case", "message"), [
    ("divergent_barrier", "__syncthreads is reached by 16 threads while 48 have exited"),
    ("exited_barrier", "__syncthreads is reached by 63 threads while 1 have exited"),
    ("outside_mask", "called by a lane outside its mask"),
    ("exited_lane", "for lane 5, which has exited"),
    ("block_1025", "has 1025 threads"),
    ("grid_y_65536", "grid.y = 65536 exceeds 65535"),
    ("dynamic_49k", "50176 bytes of dynamic shared memory exceed the kernel's limit of 49152"),
    ("optin_exceeded", "exceed the device's opt-in limit of 232448"),
])
def test_misuse_and_invalid_launches_are_errors_naming_the_kernel(emulator, case, message):
    error = emulator.launch_error(case)
    assert message in error
    assert case.startswith("optin") or "kernel " in error


def test_opt_in_shared_memory_allows_larger_launches(emulator):
    assert emulator.launch_error("optin_granted") == ""


@pytest.mark.parametrize("optin", [1024, 3 * 1024])
def test_window_attention_backward_with_little_shared_memory(emulator, optin):
    """A device with less opt-in shared memory than the warps' dtable bins need (169 rows x 4 warps x 4 bytes at
    ws = 7) makes the backward keep them in global memory; with 1 KB the table column is not staged either."""
    if dispatch.not_supported_reasons(dispatch.EMULATED_CUDA, torch.device("cpu"), [torch.float32]):
        backend.serve(backend.variant())
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 49, 16, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    table = torch.randn(169, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 2, 49, 16, generator=generator, dtype=torch.float64)
    inputs = (q, k, v, table)
    want = torch.autograd.grad(reference.window_cross_attention(*inputs, 7), inputs, grad)
    device_optin = emulator.shared_memory_optin()
    emulator.set_shared_memory_optin(optin)
    try:
        out = lldif_kernels.window_cross_attention(*inputs, 7, backend=dispatch.EMULATED_CUDA)
        got = torch.autograd.grad(out, inputs, grad)
    finally:
        emulator.set_shared_memory_optin(device_optin)
    for name, g, w in zip(("dq", "dk", "dv", "dtable"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize(("where", "report"), [
    ("shared", "global-buffer-overflow"),  # a __shared__ array is a static in the host build
    ("dynamic_shared", "heap-buffer-overflow"),
    ("global", "heap-buffer-overflow"),
])
def test_asan_build_reports_out_of_bounds_accesses(where, report):
    """In the AddressSanitizer build (make test-cuda-asan) a kernel reading or writing one element past a shared
    array, the dynamic shared memory or a buffer ends the process with ASan's report."""
    if backend.variant() != "asan":
        pytest.skip(f"needs the AddressSanitizer build ({backend.ENV_VAR}=asan, make test-cuda-asan)")
    tests = Path(__file__).parent
    script = f"import sys; sys.path.insert(0, {str(tests)!r}); from cuda_host import backend; " \
             f"backend.build('asan').overflow({where!r})"
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ,
                           timeout=600)
    assert child.returncode != 0 and f"AddressSanitizer: {report}" in child.stderr, child.stderr[-2000:]
