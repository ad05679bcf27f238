"""Shared by the op benchmarks: device, providers, timing of a bundle of calls, and the clone baseline.

On CUDA each benchmarked call runs the op REPEAT times and then synchronises, so launch and sync costs
do not hide kernels of a few microseconds; `extra_info["repeat"]` says how many, and every derived
figure (GB/s, ratios) is per op call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch._dynamo.config
from pytest_benchmark.fixture import BenchmarkFixture
from torch.profiler import ProfilerActivity, profile
from torch.utils.benchmark import Timer

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
REPEAT = 20 if CUDA else 1
# Every shape and pass compiles the same reference function again; keep them all.
torch._dynamo.config.cache_size_limit = 64

ACCELERATOR_PROVIDERS = ("cuda", "triton") if CUDA else ("cpp",)
PROVIDERS = ("eager", "compile", *ACCELERATOR_PROVIDERS)


def bundle(fn: Callable[[], object]) -> Callable[[], None]:
    """REPEAT calls of fn, then wait for the device."""

    def run() -> None:
        for _ in range(REPEAT):
            fn()
        if CUDA:
            torch.cuda.synchronize()

    return run


def provider_op(provider: str, eager: Callable, fused: Callable) -> Callable:
    """What a provider times: the reference (`eager`), its torch.compile, or the fused op on that backend."""
    if provider == "eager":
        return eager
    if provider == "compile":
        return torch.compile(eager, dynamic=False)
    return functools.partial(fused, backend=provider)


def pass_call(
    op: Callable, inputs: Sequence[torch.Tensor], pass_: str, frozen: Sequence[int] = ()
) -> Callable[[], object]:
    """op on inputs as one timed call: `fwd` without autograd, or `fwd+bwd` with the gradients of every input
    but the `frozen` ones (for a random cotangent shaped like the op's output). Runs it once, so that
    compilation and first-touch stay outside the timing."""
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return op(*inputs)
    else:
        leaves = [t.requires_grad_(i not in frozen) for i, t in enumerate(inputs)]
        trained = [t for t in leaves if t.requires_grad]
        with torch.no_grad():
            grad_out = torch.randn_like(op(*leaves))

        def call():
            return torch.autograd.grad(op(*leaves), trained, grad_out)

    call()
    return call


@functools.cache
def matmul_flops_per_second(dtype: torch.dtype = torch.float32) -> float:
    """FLOP rate of a square 2048 matmul on this machine, measured once per dtype: the compute roofline."""
    a = torch.randn(2048, 2048, device=DEVICE).to(dtype)
    seconds = Timer("a @ a", globals={"a": a}).blocked_autorange(min_run_time=0.5).median
    return 2 * 2048**3 / seconds


@functools.cache
def _clone_bytes_per_second(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    x = torch.randn(shape, device=DEVICE).to(dtype)
    seconds = Timer("x.clone()", globals={"x": x}).blocked_autorange(min_run_time=0.5).median
    return 2 * x.numel() * x.element_size() / seconds


def clone_bytes_per_second(x: torch.Tensor) -> float:
    """Bandwidth of a clone() (read + write) of a tensor like x, measured once per shape and dtype on this
    machine: the yardstick for GB/s figures."""
    return _clone_bytes_per_second(tuple(x.shape), x.dtype)


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes allocated during one call of fn, over what was allocated before it.

    CUDA: the caching allocator's peak. CPU: allocations and frees as the profiler attributes them to ops,
    summed in time order; memory an op allocates and frees inside itself (a fused kernel's workspace) is not
    seen, which the op benchmarks state where it matters.
    """
    if CUDA:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def record(
    benchmark: BenchmarkFixture,
    *,
    bytes_moved: int,
    clone_bandwidth: float,
    formula: str,
    flops: int | None = None,
    flops_formula: str | None = None,
    peak_bytes: int | None = None,
    matmul_rate: float | None = None,
) -> None:
    """Attach per-call bandwidth, its ratio to the clone baseline, FLOP rate and peak memory to the result;
    with ``matmul_rate`` (FLOP/s), the roofline time max(bytes / clone bandwidth, flops / matmul_rate) too."""
    seconds = benchmark.stats.stats.median / REPEAT
    gbps = bytes_moved / seconds / 1e9
    benchmark.extra_info.update(
        {
            "repeat": REPEAT,
            "ms_per_call": seconds * 1e3,
            "GB/s": round(gbps, 2),
            "clone_GB/s": round(clone_bandwidth / 1e9, 2),
            "fraction_of_clone_bandwidth": round(gbps * 1e9 / clone_bandwidth, 3),
            "bytes_formula": formula,
        }
    )
    if flops is not None:
        benchmark.extra_info.update({"TFLOP/s": round(flops / seconds / 1e12, 4), "flops_formula": flops_formula})
    if peak_bytes is not None:
        benchmark.extra_info["peak_MB"] = round(peak_bytes / 2**20, 2)
    if matmul_rate is not None and flops is not None:
        roofline = max(bytes_moved / clone_bandwidth, flops / matmul_rate)
        benchmark.extra_info.update({"roofline_ms": round(roofline * 1e3, 4),
                                     "fraction_of_roofline": round(roofline / seconds, 3)})
