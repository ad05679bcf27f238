"""Turns a pytest-benchmark JSON file into the Markdown performance table of the README.

    python benchmarks/summarize.py results.json > results.md

One row per benchmark: per-call median, GB/s and its fraction of the same-run clone bandwidth, TFLOP/s,
peak memory and images/s where the benchmark records them, and the speed-up over the `eager` and `compile` providers of
the same group (same op, pass and shape).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict


def provider_of(bench: dict) -> str:
    return bench["extra_info"].get("provider") or re.search(r"-(\w+)\]$", bench["name"]).group(1)


def summarize(report: dict) -> str:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in report["benchmarks"]:
        groups[bench["group"]][provider_of(bench)] = bench
    machine = report.get("machine_info", {})
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} CPUs; "
        f"{report.get('datetime', '')}",
        "",
        "| group | provider | ms / call | GB/s | x clone bandwidth | TFLOP/s | x roofline | peak MB | images/s "
        "| vs eager | vs compile |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group, by_provider in groups.items():
        ms = {p: b["extra_info"].get("ms_per_call", b["stats"]["median"] * 1e3) for p, b in by_provider.items()}
        for provider, bench in by_provider.items():
            info = bench["extra_info"]
            # The model benchmarks call the plain-PyTorch provider `reference`; it is the eager baseline.
            eager = "eager" if "eager" in ms else "reference"
            ratios = [f"{ms[base] / ms[provider]:.2f}x" if base in ms else "-" for base in (eager, "compile")]
            lines.append(
                f"| {group} | {provider} | {ms[provider]:.3f} | {info.get('GB/s', '-')} | "
                f"{info.get('fraction_of_clone_bandwidth', '-')} | {info.get('TFLOP/s', '-')} | "
                f"{info.get('fraction_of_roofline', '-')} | {info.get('peak_MB', '-')} | "
                f"{info.get('images_per_s', '-')} | {ratios[0]} | {ratios[1]} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", help="pytest-benchmark --benchmark-json output")
    args = parser.parse_args()
    with open(args.json_file) as f:
        print(summarize(json.load(f)), end="")


if __name__ == "__main__":
    main()
