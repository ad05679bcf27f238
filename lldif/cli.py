"""The `lldif` command: each subcommand is registered by the module that implements it."""

from __future__ import annotations

import argparse

from .data.landmarks import add_landmarks_command
from .data.lowlight import add_make_lowlight_command
from .data.synthetic import add_synth_command


def _add_demo_command(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="run the fused ops with every backend and compare with the reference")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    def run(args: argparse.Namespace) -> None:
        from .demo import run_demo

        run_demo(args.device)

    demo.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="lldif", description="LLDif on fused Triton and C++/CUDA kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_command(commands)
    add_make_lowlight_command(commands)
    add_landmarks_command(commands)
    add_synth_command(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
