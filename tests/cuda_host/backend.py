"""Builds the host emulation of csrc/cuda and serves it to the dispatcher as the tests' ``cuda_emulated``
backend. Every call runs twice, with the block's threads in ascending order and in a seeded random order, and
the two results must agree bit for bit: the kernels promise repeatable results, so a difference is a race.

``LLDIF_CUDA_EMULATION``: ``plain`` (default, -O2), ``asan`` (AddressSanitizer; the Python process needs
libasan preloaded, see ``make test-cuda-asan``) or ``off`` (the backend's tests skip).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch.utils import cpp_extension

from lldif_kernels import dispatch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ENV_VAR = "LLDIF_CUDA_EMULATION"
FLAGS = {
    "plain": ["-O2", "-g0"],
    "asan": ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],  # -g: reports name file and line
}


def variant() -> str:
    """The variant the environment asks for: plain, asan or off."""
    chosen = os.environ.get(ENV_VAR, "plain")
    if chosen not in (*FLAGS, "off"):
        raise ValueError(f"{ENV_VAR} must be plain, asan or off, got {chosen!r}")
    return chosen


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(path)


@functools.cache
def build(name: str) -> ModuleType:
    """Compiles the emulator, csrc/cuda's glue and its .cu files with the host compiler (incremental, under
    build/cuda_host/<name>) and loads the result, once per process."""
    build_dir = ROOT / "build" / "cuda_host" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's builder hands .cu files to nvcc; a one-line translation unit gives each to the host compiler.
    units = []
    for kernel_source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        unit = build_dir / f"{kernel_source.stem}_cu.cpp"
        _write_if_changed(unit, f'#include "{kernel_source}"\n')
        units.append(unit)
    sources = [HERE / "cuda_host.cpp", HERE / "emulated_ops.cpp", HERE / "selftest.cpp",
               *sorted((ROOT / "csrc" / "cuda").glob("*_glue.cpp")), *units]
    flags = ["-DLLDIF_CUDA_HOST", "-Wno-unknown-pragmas", *FLAGS[name]]
    return cpp_extension.load(
        name=f"lldif_cuda_emulated_{name}", sources=[str(s) for s in sources], extra_cflags=flags,
        extra_ldflags=[f for f in FLAGS[name] if f.startswith("-fsanitize")],
        extra_include_paths=[str(HERE / "include")], build_directory=str(build_dir), with_cuda=False)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equal NaNs compare equal."""
    return t.detach().flatten().view(torch.uint8) if t.numel() else t.detach()


def _twice(op: torch._ops.OpOverloadPacket, emulator: ModuleType) -> Callable:
    """Calls ``op`` under two thread interleavings and raises if any output (returned or written into a
    mutable argument) differs in a bit."""
    schema = op.default._schema
    written = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    calls = 0

    def call(*args):
        nonlocal calls
        calls += 1
        emulator.set_schedule(0)
        first = op(*args)
        again = list(args)
        for i in written:
            again[i] = torch.empty_like(args[i])
        emulator.set_schedule(calls)
        try:
            second = op(*again)
        finally:
            emulator.set_schedule(0)
        pairs = list(zip(first if isinstance(first, tuple | list) else [first],
                         second if isinstance(second, tuple | list) else [second], strict=True))
        pairs += [(args[i], again[i]) for i in written]
        differing = [k for k, (a, b) in enumerate(pairs) if not torch.equal(_bits(a), _bits(b))]
        if differing:
            raise AssertionError(f"{schema.name}: outputs {differing} differ between two thread interleavings of "
                                 f"the emulated CUDA kernels (schedule seed {calls}): a race")
        return first

    return call


def serve(name: str) -> ModuleType:
    """Builds variant ``name`` and serves it as the dispatcher's ``cuda_emulated`` backend."""
    emulator = build(name)
    ops = torch.ops.lldif_cuda_emulated
    dispatch.serve_emulated_cuda(
        lambda op: (_twice(getattr(ops, f"{op}_fwd"), emulator), _twice(getattr(ops, f"{op}_bwd"), emulator)))
    return emulator


_KERNEL = re.compile(r"lldif_kernels::\(anonymous namespace\)::(\w+_kernel<[^()]*>)\(")


def kernel_coverage(emulator: ModuleType) -> tuple[list[str], list[str]]:
    """(ran, never ran): the kernel instantiations of csrc/cuda in the emulator's library, by whether this
    process launched them, read from the library's symbol table."""
    symbols = subprocess.run(["nm", "--defined-only", "-C", emulator.__file__], check=True, capture_output=True,
                             text=True).stdout
    names: dict[int, str] = {}
    for line in symbols.splitlines():
        address, _, name = line.split(" ", 2)
        match = _KERNEL.search(name)
        if match:
            names[int(address, 16)] = match.group(1)
    base = emulator.library_base()
    ran = {names[a - base] for a in emulator.launched_kernels() if a - base in names}
    return sorted(ran), sorted(set(names.values()) - ran)
