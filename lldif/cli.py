"""The `lldif` command: each subcommand is registered by the module that implements it."""

from __future__ import annotations

import argparse
import os
import pickle

from .ablate import add_ablate_command
from .convert import add_convert_command
from .data.landmarks import add_landmarks_command
from .data.lowlight import add_make_lowlight_command
from .data.synthetic import add_synth_command
from .demo import add_demo_command
from .evaluate import add_evaluate_command, add_sweep_steps_command
from .predict import add_predict_command
from .train import add_train_command


def _add_kernels_command(commands: argparse._SubParsersAction) -> None:
    kernels = commands.add_parser("kernels", help="run the fused ops with every backend and compare with the reference")
    kernels.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    def run(args: argparse.Namespace) -> None:
        from .kernels_check import run_kernels_check

        run_kernels_check(args.device)

    kernels.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="lldif", description="LLDif on fused Triton and C++/CUDA kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_command(commands)
    _add_kernels_command(commands)
    add_make_lowlight_command(commands)
    add_landmarks_command(commands)
    add_synth_command(commands)
    add_train_command(commands)
    add_predict_command(commands)
    add_evaluate_command(commands)
    add_sweep_steps_command(commands)
    add_ablate_command(commands)
    add_convert_command(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Runs a subcommand. A bad argument, a missing file or an unusable run folder ends with one line on stderr and
    exit status 2 (LLDIF_DEBUG=1 shows the traceback instead)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, pickle.UnpicklingError) as error:
        if os.environ.get("LLDIF_DEBUG"):
            raise
        parser.exit(2, f"lldif {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"lldif {args.command}: interrupted\n")


if __name__ == "__main__":
    main()
