"""The one prepared GPU check: build in place, CUDA tests, benchmarks, Markdown + JSON summary into --out.

Runs with the machine's own python and torch (no venv, no network), under 8 minutes on an H200:
    make gpu-check OUT=/path/to/folder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def step(name: str, command: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run one step, teeing its output into the log; never raise, so later steps still run."""
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n===== {name}: {' '.join(command)}\n")
        out.flush()
        proc = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = round(time.perf_counter() - started, 1)
    print(f"[gpu-check] {name}: exit {proc.returncode} in {seconds} s", flush=True)
    return {"step": name, "exit_code": proc.returncode, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"LLDIF_BUILD_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4), "PYTHONPATH": str(ROOT)})
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    bench_json = out / "bench.json"
    steps = [
        step("build", [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"], log, env),
        step("cuda tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"], log, env),
        step(
            "benchmarks",
            [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "--benchmark-min-rounds=10",
             "--benchmark-max-time=0.25", "-p", "no:cacheprovider", f"--benchmark-json={bench_json}"],
            log,
            env,
        ),
    ]
    import torch  # after the build: only the summary needs it

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    summary = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "steps": steps,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = ""
    if bench_json.exists():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from summarize import summarize

        table = summarize(json.loads(bench_json.read_text()))
    lines = [f"# gpu-check on {device} (torch {torch.__version__})", "", "| step | exit | seconds |", "|---|---:|---:|"]
    lines += [f"| {s['step']} | {s['exit_code']} | {s['seconds']} |" for s in steps]
    (out / "summary.md").write_text("\n".join(lines) + "\n\n" + table)
    print((out / "summary.md").read_text())
    sys.exit(max(s["exit_code"] for s in steps))


if __name__ == "__main__":
    main()
