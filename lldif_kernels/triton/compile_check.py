"""Ahead-of-time compile every Triton kernel of this package for NVIDIA targets; no GPU needed.

Usage: ``python -m lldif_kernels.triton.compile_check [ARCH ...]`` (default: 90 80).

Every module here that defines ``COMPILE_CHECK_CASES`` is compiled, case by case, for each arch. A case is a
dict: ``name``, ``fn`` (a ``@triton.jit`` kernel), ``signature`` and ``constexprs`` as ``ASTSource`` takes
them, ``options`` for ``triton.compile`` (num_warps, ...) and optionally ``divisible_by_16``, the arguments
the JIT would specialise as multiples of 16. One line is printed per kernel, case and arch; the exit status
is 1 if any compile failed, used more shared memory than the arch has, or spilled registers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Per-block opt-in shared memory; Triton compiles past it and only the launch would fail.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def _cuobjdump() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for candidate in (bundled, Path("/usr/local/cuda/bin/cuobjdump")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise SystemExit(f"compile_check: no cuobjdump at {bundled} or /usr/local/cuda/bin/cuobjdump")


def _resource_usage(cuobjdump: str, cubin: bytes, workdir: str) -> tuple[int, int]:
    """(registers, spilled bytes) of the kernel in ``cubin``.

    ptxas puts spills in the stack frame (STACK), not in LOCAL; the driver's local size, which Triton reports
    as spills, is both, so both count here.
    """
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    command = [cuobjdump, "--dump-resource-usage", path]
    report = subprocess.run(command, capture_output=True, text=True, check=True)
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report.stdout))
    if usage.keys() != {"REG", "STACK", "LOCAL"}:
        raise RuntimeError(f"unexpected cuobjdump output:\n{report.stdout}")
    return int(usage["REG"]), int(usage["STACK"]) + int(usage["LOCAL"])


def _discover_cases() -> list[tuple[str, dict]]:
    package = importlib.import_module(__package__)
    cases = []
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{__package__}.{module_info.name}")
        cases += [(module_info.name, case) for case in getattr(module, "COMPILE_CHECK_CASES", ())]
    return cases


def _check(module_name: str, case: dict, arch: int, cuobjdump: str, workdir: str) -> bool:
    fn = case["fn"]
    label = f"sm_{arch} {module_name}.{fn.__name__} [{case['name']}]"
    aligned = case.get("divisible_by_16", ())
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=fn, signature=case["signature"], constexprs=case["constexprs"], attrs=attrs)
    start = time.perf_counter()
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=case.get("options", {}))
        registers, spilled = _resource_usage(cuobjdump, kernel.asm["cubin"], workdir)
    except Exception as error:
        # Triton's compile errors quote the kernel source first; the cause is at the end.
        message = " ".join(str(error).split())[-400:]
        seconds = time.perf_counter() - start
        print(f"FAIL {label} {seconds:.2f}s {type(error).__name__}: {message}", flush=True)
        return False
    seconds = time.perf_counter() - start
    shared = kernel.metadata.shared
    problems = []
    if shared > SHARED_MEMORY_LIMIT[arch]:
        problems.append(f"shared memory over {SHARED_MEMORY_LIMIT[arch]} B")
    if spilled:
        problems.append("register spill")
    verdict = "FAIL" if problems else "ok  "
    print(f"{verdict} {label} {seconds:.2f}s shared={shared}B regs={registers} spill={spilled}B"
          + "".join(f" ({problem})" for problem in problems), flush=True)
    return not problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lldif_kernels.triton.compile_check",
                                     description=__doc__.splitlines()[0])
    known = sorted(SHARED_MEMORY_LIMIT)
    # No argparse choices: Python < 3.12 checks an empty nargs="*" list against them and rejects it.
    parser.add_argument("archs", nargs="*", type=int, metavar="ARCH",
                        help=f"compute capability as an integer, one of {known} (default: 90 80)")
    archs = parser.parse_args(argv).archs or [90, 80]
    if unknown := set(archs) - set(known):
        parser.error(f"no shared memory limit known for arch {sorted(unknown)}; known: {known}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: TRITON_INTERPRET=1 swaps compilation for the interpreter; unset it and rerun.",
              file=sys.stderr)
        return 2
    cuobjdump = _cuobjdump()
    with tempfile.TemporaryDirectory(prefix="lldif_compile_check_") as workdir:
        # A fresh cache makes every compile real, so the timings and the failures are this code's own
        # (Triton reads TRITON_CACHE_DIR when it compiles, not when it is imported).
        os.environ["TRITON_CACHE_DIR"] = os.path.join(workdir, "triton_cache")
        cases = _discover_cases()
        start = time.perf_counter()
        results = [_check(module_name, case, arch, cuobjdump, workdir)
                   for arch in archs for module_name, case in cases]
    failures = results.count(False)
    print(f"{len(results)} compiled in {time.perf_counter() - start:.1f}s, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
