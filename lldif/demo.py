"""`lldif demo`: the whole method on synthetic expression faces in minutes on a CPU.

LA-CLIP -> stage 1 -> stage 2 of the tiny preset and a ResNet-18-style baseline, trained with one recipe for the same
number of optimizer steps on the same low-light training faces, then evaluated on normal and low-light test faces; a
report compares them, per seed. Each run lives in OUT/runs/seed<S>/<name>, the detected landmarks in OUT/landmarks: a
finished run is kept, an interrupted one resumed, so the demo itself can be resumed (and seeds run apart, into one
OUT, are reported together by a last run of the command with all of them).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .argtypes import positive_int
from .data.images import write_atomic
from .data.landmark_cache import load_landmarks
from .evaluate import LOW_LIGHT, NORMAL, evaluate_run, markdown_table, new_figure, write_figure
from .run import Run
from .train import LANDMARK_SOURCES, TrainSettings, train_or_resume

LLDIF, BASELINE = "LLDif-tiny", "baseline"
CURVES_FILE = "curves.png"


@dataclass(frozen=True)
class DemoRecipe:
    """The demo's data and budget. Both models see the same faces for the same number of optimizer steps: the
    baseline trains for as many epochs as LLDif's three runs together. One optimiser recipe serves both (the paper's
    lr suits 200 epochs, not a few)."""

    train_faces: int = 2800     # measured: more faces seen fewer times generalise better at the same steps
    test_faces: int = 350
    la_clip_epochs: int = 1
    stage1_epochs: int = 1      # the teacher prior guides the LLformer to 100% in one epoch of 2800 faces
    stage2_epochs: int = 4      # the inference path trains here, so most of the budget goes to it (measured)
    batch_size: int = 16
    lr: float = 3e-4            # measured: 1e-3 left LLDif-tiny at chance on the darkened faces
    lr_gamma: float = 0.95
    weight_decay: float = 0.0   # POSTER++'s effective value; Adam with L2 1e-4 stalls both models here (measured)
    warmup_epochs: int = 0
    lowlight: str = "paper"
    landmarks: str = "dlib68"   # found in each darkened face, as a user's detector would; "dataset": the exact points
    seeds: tuple[int, ...] = (0,)

    @property
    def baseline_epochs(self) -> int:
        return self.la_clip_epochs + self.stage1_epochs + self.stage2_epochs

    @property
    def steps_per_epoch(self) -> int:
        return self.train_faces // self.batch_size

    def settings(self, seed: int, **fields: Any) -> TrainSettings:
        return TrainSettings(data=f"synthetic:{self.train_faces}", test_data=f"synthetic:{self.test_faces}",
                             config="tiny", batch_size=self.batch_size, lr=self.lr, lr_gamma=self.lr_gamma,
                             weight_decay=self.weight_decay, warmup_epochs=self.warmup_epochs,
                             lowlight=self.lowlight, seed=seed, workers=0, **fields)


# `short` is `make demo` (under 10 minutes on 2 CPU cores); `long` about an hour per seed.
BUDGETS = {
    "short": DemoRecipe(),
    "long": DemoRecipe(train_faces=5600, test_faces=700, stage2_epochs=8, seeds=(0, 1)),
}


@dataclass
class SeedRuns:
    """The four runs of one seed."""

    la_clip: Run
    stage1: Run
    stage2: Run
    baseline: Run

    def lldif(self) -> tuple[Run, Run, Run]:
        return self.la_clip, self.stage1, self.stage2


def _metric_rows(run: Run) -> list[dict[str, str]]:
    with run.metrics_file.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _training_record(runs: tuple[Run, ...]) -> tuple[float, float]:
    """(seconds over every epoch of the runs, mean training images/s of the last run), from their metrics.csv."""
    rows = [_metric_rows(run) for run in runs]
    seconds = sum(float(row["seconds"]) for run_rows in rows for row in run_rows)
    return seconds, sum(float(row["images_per_s"]) for row in rows[-1]) / len(rows[-1])


def _train(recipe: DemoRecipe, seed: int, out: Path, device: str | None, progress: bool) -> SeedRuns:
    cache = str(out / "landmarks")

    def run(name: str, **fields: Any) -> Run:
        return train_or_resume(recipe.settings(seed, **fields), out / "runs" / f"seed{seed}" / name, device=device,
                               progress=progress)

    la_clip = run("la-clip", stage="la-clip", epochs=recipe.la_clip_epochs)
    stage1 = run("stage1", stage="1", epochs=recipe.stage1_epochs, init=str(la_clip.path),
                 landmarks=recipe.landmarks, landmark_cache=cache)
    stage2 = run("stage2", stage="2", epochs=recipe.stage2_epochs, init=str(stage1.path),
                 landmarks=recipe.landmarks, landmark_cache=cache)
    baseline = run("baseline", model="baseline", epochs=recipe.baseline_epochs)
    return SeedRuns(la_clip, stage1, stage2, baseline)


def plot_curves(recipe: DemoRecipe, runs: dict[int, SeedRuns], path: Path) -> None:
    """Writes every run's test accuracy after each epoch against the optimizer steps taken so far (LLDif's runs one
    after the other), one line style per seed."""
    figure = new_figure(8.0, 4.5)
    axes = figure.add_subplot()
    steps, stage2_start = recipe.steps_per_epoch, recipe.la_clip_epochs + recipe.stage1_epochs
    styles = ("-", "--", ":", "-.")
    for index, (seed, seed_runs) in enumerate(runs.items()):
        curves = ((seed_runs.la_clip, 0, "test_accuracy", "LA-CLIP label head", "tab:gray"),
                  (seed_runs.stage1, recipe.la_clip_epochs, "test_accuracy", "stage 1, teacher prior (sees the label)",
                   "tab:green"),
                  (seed_runs.stage1, recipe.la_clip_epochs, "test_accuracy_mean_prior", "stage 1, mean prior",
                   "tab:olive"),
                  (seed_runs.stage2, stage2_start, "test_accuracy", "LLDif-tiny (stage 2, inference)", "tab:blue"),
                  (seed_runs.baseline, 0, "test_accuracy", "baseline", "tab:red"))
        for run, first_epoch, column, label, colour in curves:
            rows = _metric_rows(run)
            axes.plot([steps * (first_epoch + int(row["epoch"])) for row in rows],
                      [100 * float(row[column]) for row in rows], styles[index % len(styles)], marker="o",
                      color=colour, label=f"{label}, seed {seed}")
    axes.axhline(100 / 7, color="black", linewidth=0.8, linestyle=":", label="chance")
    axes.set_xlabel("optimizer steps")
    axes.set_ylabel("test accuracy after the epoch (%), darkened faces")
    axes.set_ylim(0, 100)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    write_figure(figure, path)


def _landmark_note(recipe: DemoRecipe, out: Path) -> str:
    """How often the detector found the landmarks in the faces LLDif saw, per landmark file of the demo and split
    (a synthetic face's key starts with its split)."""
    if recipe.landmarks == "dataset":
        return "LLDif reads the generator's exact landmarks (an oracle no user has); the baseline reads the pixels."
    counts = []
    for file in sorted((out / "landmarks").glob("*.npz")):
        table = load_landmarks(file)
        for split in ("train", "test"):
            found = [bool(hit) for path, hit in zip(table.paths, table.found, strict=True) if path.startswith(split)]
            if found:
                counts.append(f"{sum(found)} of {len(found)} {split} faces in `{file.stem}`")
    return (f"LLDif's landmarks are found by the `{recipe.landmarks}` detector in each face as the model sees it "
            f"(darkened for training and the low-light test; the mean face where the detector finds none): "
            f"{'; '.join(counts)}. The baseline reads the pixels only.")


def _spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{100 * mean:.1f}%" + (f" ({100 * min(values):.1f}-{100 * max(values):.1f})" if len(values) > 1 else "")


def _report(recipe: DemoRecipe, results: dict[tuple[str, int], dict[str, Any]], evaluation_seconds: float,
            out: Path, report_dir: Path) -> str:
    rows = []
    accuracies = {name: {NORMAL: [], LOW_LIGHT: []} for name in (LLDIF, BASELINE)}
    for (name, seed), result in results.items():
        conditions = result["metrics"]["conditions"]
        dark = conditions[LOW_LIGHT]
        for condition, values in accuracies[name].items():
            values.append(conditions[condition]["accuracy"])
        rows.append((name, seed, *(f"{100 * conditions[c]['accuracy']:.1f}%" for c in (NORMAL, LOW_LIGHT)),
                     f"{dark['true_class_confidence']:.3f}", f"{100 * dark['top_class_share']:.0f}%",
                     f"{result['images_per_s']:.1f}", f"{result['seconds'] / 60:.1f}"))
    if len(recipe.seeds) > 1:
        rows += [(name, "mean (range)", _spread(values[NORMAL]), _spread(values[LOW_LIGHT]), "", "", "", "")
                 for name, values in accuracies.items()]
    mean = {name: sum(values[LOW_LIGHT]) / len(values[LOW_LIGHT]) for name, values in accuracies.items()}
    verdict = ("LLDif-tiny beats" if mean[LLDIF] > mean[BASELINE] else "LLDif-tiny does not beat") + \
        f" the baseline on the low-light test faces ({100 * mean[LLDIF]:.1f}% vs {100 * mean[BASELINE]:.1f}%" + \
        (f", mean of {len(recipe.seeds)} seeds" if len(recipe.seeds) > 1 else "") + "). Chance is 14.3%."
    steps = recipe.steps_per_epoch
    first = recipe.seeds[0]
    parts = [
        "# lldif demo: LLDif-tiny against a ResNet-18-style baseline on synthetic low-light faces\n",
        f"{recipe.train_faces} synthetic training faces darkened on the fly (`{recipe.lowlight}` preset, seeded "
        f"per face), {recipe.test_faces} test faces shown as they are (normal) and darkened (low-light); 7 classes. "
        f"Both models: Adam, lr {recipe.lr} x {recipe.lr_gamma} per epoch, weight decay {recipe.weight_decay}, "
        f"batch {recipe.batch_size}, seeds {', '.join(map(str, recipe.seeds))}. **Step-matched**: LLDif trains "
        f"LA-CLIP for {recipe.la_clip_epochs} epoch(s), stage 1 for {recipe.stage1_epochs} and stage 2 for "
        f"{recipe.stage2_epochs} ({recipe.baseline_epochs * steps} optimizer steps in all, {steps} per epoch); the "
        f"baseline trains for {recipe.baseline_epochs} epochs on the same faces, the same number of steps. Each "
        "model is evaluated at its best epoch by test accuracy (stage 1: teacher-guided).\n",
        _landmark_note(recipe, out) + "\n",
        f"Training took {sum(r['seconds'] for r in results.values()) / 60:.1f} min (every epoch of every run, "
        f"validation included), the evaluation {evaluation_seconds / 60:.1f} min.\n",
        markdown_table(("model", "seed", "normal accuracy", "low-light accuracy", "low-light true-class confidence",
                        "largest class share of the low-light predictions", "training images/s (last stage)",
                        "training minutes (all stages)"), rows),
        f"{verdict}\n",
        f"![test accuracy after each epoch against optimizer steps]({CURVES_FILE})\n",
    ]
    for name in (LLDIF, BASELINE):
        figures = report_dir / name
        shutil.rmtree(figures, ignore_errors=True)
        shutil.copytree(results[name, first]["evaluation"], figures)
        parts += [f"## {name} (seed {first})\n", f"Full evaluation: [{name}/report.md]({name}/report.md).\n",
                  f"![t-SNE of the fused features]({name}/tsne.png)\n",
                  f"![confusion matrix, low-light]({name}/confusion_{LOW_LIGHT}.png)\n",
                  f"![mean true-class confidence]({name}/confidence.png)\n"]
    return "\n".join(parts)


def run_demo(out: str | Path = "runs/demo", report_dir: str | Path | None = None, recipe: DemoRecipe | None = None,
             device: str | None = None, progress: bool = True) -> Path:
    """Trains and evaluates both models for every seed of the recipe, writes the comparison into `report_dir`
    (default `out`); returns the report's path."""
    recipe = recipe or BUDGETS["short"]
    out = Path(out)
    report_dir = Path(report_dir) if report_dir is not None else out
    runs = {seed: _train(recipe, seed, out, device, progress) for seed in recipe.seeds}
    results, started = {}, time.perf_counter()
    for seed, seed_runs in runs.items():
        for name, run, parts in ((LLDIF, seed_runs.stage2, seed_runs.lldif()),
                                 (BASELINE, seed_runs.baseline, (seed_runs.baseline,))):
            seconds, images_per_s = _training_record(parts)
            results[name, seed] = {"metrics": evaluate_run(run, device=device, progress=progress),
                                   "seconds": seconds, "evaluation": run.evaluation_dir,
                                   "images_per_s": images_per_s}
    evaluation_seconds = time.perf_counter() - started
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(recipe, runs, report_dir / CURVES_FILE)
    report = _report(recipe, results, evaluation_seconds, out, report_dir).encode("utf-8")
    path = report_dir / "report.md"
    write_atomic(path, lambda file: file.write(report))
    return path


def add_demo_command(commands: argparse._SubParsersAction) -> None:
    """Registers `lldif demo`."""
    parser = commands.add_parser(
        "demo", help="train and evaluate LLDif-tiny and a baseline CNN on synthetic low-light faces (minutes)",
        description="LA-CLIP, stage 1 and stage 2 of LLDif-tiny plus a ResNet-18-style baseline with as many "
                    "optimizer steps on the same synthetic expression faces, darkened on the fly; both evaluated on "
                    "normal and low-light test faces. Writes the runs to OUT/runs and a comparison report (with "
                    "the figures) to REPORT_DIR/report.md. --budget short (default) takes under 10 minutes on 2 CPU "
                    "cores, --budget long about an hour per seed; an interrupted demo resumes.")
    parser.add_argument("--out", default="runs/demo", help="folder for the runs (default runs/demo)")
    parser.add_argument("--report-dir", help="folder for report.md and its figures (default: --out)")
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="short",
                        help="the recipe: short (default; " + _describe(BUDGETS["short"]) + ") or long ("
                             + _describe(BUDGETS["long"]) + "); the options below change single fields")
    parser.add_argument("--train-faces", type=positive_int)
    parser.add_argument("--test-faces", type=positive_int)
    parser.add_argument("--la-clip-epochs", type=positive_int)
    parser.add_argument("--stage1-epochs", type=positive_int)
    parser.add_argument("--stage2-epochs", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--seeds", type=int, nargs="+", help="one demo per seed, reported side by side")
    parser.add_argument("--landmarks", choices=LANDMARK_SOURCES,
                        help="LLDif's landmarks: found by a detector in the darkened faces (default dlib68), or "
                             "`dataset`: the generator's exact points (an oracle)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> None:
        names = ("train_faces", "test_faces", "la_clip_epochs", "stage1_epochs", "stage2_epochs", "batch_size",
                 "landmarks")
        fields = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        if args.seeds is not None:
            fields["seeds"] = tuple(args.seeds)
        recipe = dataclasses.replace(BUDGETS[args.budget], **fields)
        report = run_demo(args.out, args.report_dir, recipe, args.device, progress=not args.quiet)
        print(report.read_text(encoding="utf-8").split("\n## ")[0])
        print(f"report: {report}")

    parser.set_defaults(run=run)


def _describe(recipe: DemoRecipe) -> str:
    return (f"{recipe.train_faces} faces, epochs LA-CLIP {recipe.la_clip_epochs}, stage 1 {recipe.stage1_epochs}, "
            f"stage 2 {recipe.stage2_epochs}, seeds {', '.join(map(str, recipe.seeds))}")
