"""`lldif ablate`: the paper's Table 5 — stage 2 trained from one stage-1 run with each part of the diffusion prior
switched off in turn, every variant evaluated the same way, one table out."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .argtypes import positive_int
from .data.images import write_atomic
from .data.lowlight import LOWLIGHT_CHOICES
from .evaluate import evaluate_run, markdown_table
from .run import Run, write_json
from .train import TrainSettings, train_or_resume

# (folder, what Table 5 calls it, the config fields it changes)
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("full", "LLDif (CE + KL)", {}),
    ("ce-only", "CE only (no prior loss)", {"loss.prior_loss": "none"}),
    ("no-inserted-noise", "no inserted noise (chain starts from N(0, I))", {"prior.insert_noise": False}),
    ("no-diffusion", "no diffusion (PNET_S2's prior used directly)", {"prior.use_diffusion": False}),
)


VARIANT_FOLDERS = tuple(folder for folder, _, _ in VARIANTS)


def run_ablation(stage1: str | Path, out: str | Path, settings: TrainSettings, *, device: str | None = None,
                 progress: bool = True, variants: tuple[str, ...] = VARIANT_FOLDERS) -> dict[str, Any]:
    """Trains and evaluates each of `variants` (all of Table 5's by default) from the stage-1 run `stage1` with
    `settings` (stage 2, `init` and `overrides` are set here); writes OUT/ablation.json and OUT/ablation.md and
    returns the table's numbers."""
    unknown = sorted(set(variants) - set(VARIANT_FOLDERS))
    if unknown or not variants:
        raise ValueError(f"variants must be some of {', '.join(VARIANT_FOLDERS)}, got {', '.join(variants) or 'none'}")
    out = Path(out)
    Run(stage1).record()
    rows, results = [], {}
    for folder, name, overrides in (variant for variant in VARIANTS if variant[0] in variants):
        variant = dataclasses.replace(settings, stage="2", init=str(stage1), overrides=dict(overrides))
        run = train_or_resume(variant, out / folder, device=device, progress=progress)
        conditions = evaluate_run(run, device=device, progress=progress)["conditions"]
        results[folder] = {"name": name, "overrides": overrides,
                           **{condition: values["accuracy"] for condition, values in conditions.items()}}
        rows.append((name, *(f"{100 * values['accuracy']:.2f}%" for values in conditions.values())))
    headers = ("variant", *(f"{condition} accuracy" for condition in conditions))
    table = markdown_table(headers, rows)
    left_out = [name for folder, name, _ in VARIANTS if folder not in variants]
    note = f" Not run here: {', '.join(left_out)}." if left_out else ""
    report = (f"# Ablation of the diffusion prior (Table 5)\n\nStage 2 from `{stage1}`, {settings.epochs} epochs "
              f"each on `{settings.data}` (low-light preset `{settings.lowlight}`, seed {settings.seed}); every "
              f"variant's own evaluation is in its folder.{note}\n\n{table}").encode()
    write_json(out / "ablation.json", {"stage1": str(stage1), "settings": settings.to_dict(), "variants": results})
    write_atomic(out / "ablation.md", lambda file: file.write(report))
    return results


def add_ablate_command(commands: argparse._SubParsersAction) -> None:
    """Registers `lldif ablate`."""
    defaults = TrainSettings(data="")
    parser = commands.add_parser(
        "ablate", help="Table 5: stage 2 with and without each part of the diffusion prior, one table",
        description="Trains stage 2 from one stage-1 run four times -- the full model, CE only, no inserted noise, "
                    "no diffusion -- into OUT/<variant>, evaluates each on normal and low-light test images, and "
                    "writes OUT/ablation.md and OUT/ablation.json. Finished variants are kept and interrupted ones "
                    "resumed when the command is run again.")
    parser.add_argument("stage1", metavar="STAGE1_RUN", help="the stage-1 run folder every variant starts from")
    parser.add_argument("--data", help="training data spec (default: the stage-1 run's)")
    parser.add_argument("--test-data", help="test data spec (default: the stage-1 run's)")
    parser.add_argument("--out", required=True, help="folder for the variants' runs and the table")
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=positive_int, help="default: the stage-1 run's")
    parser.add_argument("--lr", type=float, help="default: the stage-1 run's")
    parser.add_argument("--lowlight", choices=LOWLIGHT_CHOICES, help="default: the stage-1 run's")
    parser.add_argument("--seed", type=int, help="default: the stage-1 run's")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--variants", type=lambda text: tuple(text.split(",")), default=VARIANT_FOLDERS,
                        metavar="NAME,...", help=f"which of {','.join(VARIANT_FOLDERS)} to run (default: all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> None:
        base = TrainSettings.from_dict(Run(args.stage1).settings)
        changes = {name: getattr(args, name) for name in ("data", "test_data", "batch_size", "lr", "lowlight", "seed")
                   if getattr(args, name) is not None}
        settings = dataclasses.replace(base, epochs=args.epochs, **changes)
        run_ablation(args.stage1, args.out, settings, device=args.device, progress=not args.quiet,
                     variants=args.variants)
        print((Path(args.out) / "ablation.md").read_text(encoding="utf-8"))

    parser.set_defaults(run=run)
