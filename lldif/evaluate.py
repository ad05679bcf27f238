"""Evaluation of a trained run: accuracy, confusion and confidence under normal and low-light images, how the
predictions spread over the classes and (LLDif) how close the inference prior is to the teacher's, t-SNE of the
features, a readable report, and accuracy against the number of reverse diffusion steps (the paper's Fig. 5-8).

    RUN_DIR/evaluation/metrics.json              every number, with the data, preset, checkpoint and model kind
    RUN_DIR/evaluation/report.md                 tables and the figures below, for reading
    RUN_DIR/evaluation/confusion_<condition>.png row-normalised confusion matrix, counts annotated
    RUN_DIR/evaluation/confidence.png            per-class mean true-class confidence, normal vs low-light
    RUN_DIR/evaluation/tsne.png                  t-SNE of the fused features, one panel per condition
    RUN_DIR/evaluation/sweep_steps.{json,png}    what `sweep-steps` writes
"""

from __future__ import annotations

import argparse
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .argtypes import positive_int
from .data.images import write_atomic
from .data.labels import EXPRESSIONS
from .data.landmarks import detector_for
from .data.loader import FaceBatch, FaceDataModule, FaceSource, open_dataset
from .data.lowlight import LOWLIGHT_CHOICES, LowLight
from .run import Run, choose_device, write_json

NORMAL, LOW_LIGHT, GIVEN = "normal", "low-light", "given"
METRICS_FILE, REPORT_FILE, SWEEP_FILE = "metrics.json", "report.md", "sweep_steps.json"
TSNE_POINTS = 2000


def _is_diffusion_model(model: nn.Module) -> bool:
    from .models.lldif import LLDif

    return isinstance(model, LLDif)


def _conditions(settings: dict[str, Any], lowlight: str | None) -> tuple[str, dict[str, LowLight | None]]:
    """The preset (or "none") and condition name -> the darkening it applies (None: the images as given)."""
    if lowlight is None:
        lowlight = "paper" if settings["lowlight"] == "none" else settings["lowlight"]
    if lowlight not in LOWLIGHT_CHOICES:
        raise ValueError(f"lowlight must be one of {', '.join(LOWLIGHT_CHOICES)}, got {lowlight!r}")
    if lowlight == "none":
        return lowlight, {GIVEN: None}
    return lowlight, {NORMAL: None, LOW_LIGHT: LowLight(lowlight, seed=settings["seed"])}


def _test_source(record: dict[str, Any], settings: dict[str, Any], data: str | None, progress: bool) -> FaceSource:
    """The test split of `data` (default: the run's test data, else its data) without unreadable images; notes the
    spec and how many images were left out in `record`."""
    spec = data if data is not None else settings.get("test_data") or settings["data"]
    source = open_dataset(spec, "test")
    if hasattr(source, "drop_unreadable"):
        source.drop_unreadable(progress=progress)
    if len(source) == 0:
        raise ValueError(f"data {spec!r} has no test images")
    record.update(data=spec, skipped_images=len(getattr(source, "skipped", [])))
    return source


def _batches(run: Run, model: nn.Module, source: FaceSource, darken: LowLight | None, batch_size: int
             ) -> Iterable[FaceBatch]:
    """Test batches of `source` as the run's model reads them: darkened by `darken`, with the landmarks the run
    trained with (found by its detector in these images, when it used one)."""
    settings = run.settings
    # The source serves as both splits; only its test batches (no augmentation, dataset order) are used.
    module = FaceDataModule(source, source, image_size=model.config.image_size, batch_size=batch_size,
                            lowlight=darken, check_images=False, progress=False,
                            detect_landmarks=detector_for(settings.get("landmarks", "dataset"), model.landmark_points),
                            landmark_cache=settings.get("landmark_cache") or run.path / "landmarks")
    return module.test_dataloader()


@torch.no_grad()
def _infer(model: nn.Module, batches: Iterable[FaceBatch], device: torch.device, seed: int,
           steps: Sequence[int | None] = (None,), features: bool = False, desc: str = "", progress: bool = False
           ) -> tuple[torch.Tensor, dict[int | None, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """Labels (N,), softmax probabilities (N, K) for each step count, and with `features` the fused features
    (N, D) of the first step count and, for LLDif, the cosine (N,) of the inference prior Z-hat it used to the
    frozen teacher's Z of the image and its true label. Each step count samples with its own generator seeded
    with `seed`, so its results equal a pass with that step count alone."""
    diffusion = _is_diffusion_model(model)
    generators = {k: torch.Generator(device).manual_seed(seed) for k in steps}
    labels, probabilities, vectors, cosines = [], {k: [] for k in steps}, [], []
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=False):
        images, landmarks = batch.image.to(device), batch.landmarks.to(device)
        labels.append(batch.label)
        for index, k in enumerate(steps):
            first = features and index == 0
            if diffusion:
                # The inference path (`LLDif.forward`) with its prior Z-hat kept: the same generator draws.
                prior = model.inference_prior(images, generator=generators[k], steps=k)
                outputs = model.prior_logits(images, landmarks, prior, features=first)
                if first:
                    teacher = model.teacher_prior(images, batch.label.to(device))
                    cosines.append(F.cosine_similarity(prior.float(), teacher.float(), dim=-1).cpu())
            else:
                outputs = model(images, landmarks, features=first)
            if first:
                vectors.append(outputs.float().cpu())
                outputs = model.classify(outputs)
            probabilities[k].append(outputs.float().softmax(dim=-1).cpu())
    return (torch.cat(labels), {k: torch.cat(p) for k, p in probabilities.items()},
            torch.cat(vectors) if features else None, torch.cat(cosines) if cosines else None)


def _mean_or_none(values: torch.Tensor) -> float | None:
    return values.mean().item() if values.numel() else None


def prediction_spread(counts: torch.Tensor) -> tuple[float, float]:
    """How the predictions spread over the classes, from the (K,) number of predictions of each class: the largest
    share one class takes, and the entropy of the predicted classes over log K (0: one class for every image, 1:
    every class equally often)."""
    shares = counts.double() / max(float(counts.sum()), 1.0)
    entropy = -(shares * shares.clamp(min=1e-12).log()).sum() / math.log(len(shares))
    return float(shares.max()), abs(float(entropy))


def condition_metrics(labels: torch.Tensor, probabilities: torch.Tensor) -> dict[str, Any]:
    """Accuracy, confusion counts (rows = true class), mean confidences and the spread of the predictions
    (`prediction_spread`) of (N,) labels and (N, K) probabilities."""
    num_classes = len(EXPRESSIONS)
    if labels.dim() != 1 or tuple(probabilities.shape) != (labels.shape[0], num_classes):
        raise ValueError(f"probabilities must be (N, {num_classes}) for N = {labels.shape[0]} labels, "
                         f"got {tuple(probabilities.shape)}")
    confidence, predictions = probabilities.max(dim=1)
    true_confidence = probabilities.gather(1, labels[:, None]).squeeze(1)
    correct = (predictions == labels).float()
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    per_class = {name: labels == index for index, name in enumerate(EXPRESSIONS)}
    predicted = torch.bincount(predictions, minlength=num_classes)
    top_class_share, prediction_entropy = prediction_spread(predicted)
    return {
        "images": labels.numel(),
        "accuracy": correct.mean().item(),
        "confidence": confidence.mean().item(),
        "true_class_confidence": true_confidence.mean().item(),
        "confusion": confusion.view(num_classes, num_classes).tolist(),
        "per_class_images": {name: int(mask.sum()) for name, mask in per_class.items()},
        "per_class_accuracy": {name: _mean_or_none(correct[mask]) for name, mask in per_class.items()},
        "per_class_confidence": {name: _mean_or_none(confidence[mask]) for name, mask in per_class.items()},
        "per_class_true_class_confidence": {name: _mean_or_none(true_confidence[mask])
                                            for name, mask in per_class.items()},
        "predicted_per_class": dict(zip(EXPRESSIONS, predicted.tolist(), strict=True)),
        "top_class_share": top_class_share,
        "prediction_entropy": prediction_entropy,
    }


def _prepare(run: Run, lowlight: str | None, checkpoint: str, device: str | None, batch_size: int | None
             ) -> tuple[dict[str, Any], nn.Module, torch.device, dict[str, Any], dict[str, LowLight | None], int]:
    """The run's settings, the model on its device, the record every output starts with, the conditions and the
    batch size."""
    settings = run.settings
    if batch_size is None:
        batch_size = settings["batch_size"]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    preset, conditions = _conditions(settings, lowlight)
    device = choose_device(device)
    model = run.load_model(checkpoint, map_location=device)
    record = {
        "run": str(run.path.resolve()), "model": settings["model"],
        # Run.load_model falls back to `last` when `best` was never written.
        "checkpoint": checkpoint if run.checkpoint(checkpoint).is_dir() else "last",
        "lowlight": preset, "seed": settings["seed"], "device": str(device),
    }
    return settings, model, device, record, conditions, batch_size


def write_figure(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    write_atomic(path, lambda file: file.write(buffer.getvalue()))


def new_figure(width: float, height: float) -> Any:
    # A bare Figure renders with Agg and leaves pyplot's global state (and any display backend) alone; matplotlib
    # is imported here so that `lldif --help` does not pay for it.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_confusion(confusion: Sequence[Sequence[int]], title: str, path: Path) -> None:
    """Writes a confusion matrix as a PNG: colours normalised per true class (row), counts annotated."""
    counts = np.asarray(confusion, dtype=np.int64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure = new_figure(6.5, 5.5)
    axes = figure.add_subplot()
    shown = axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(shown, ax=axes, label="fraction of the true class")
    for (row, column), count in np.ndenumerate(counts):
        axes.text(column, row, str(count), ha="center", va="center",
                  color="white" if rates[row, column] > 0.5 else "black", fontsize=9)
    ticks = range(len(EXPRESSIONS))
    axes.set_xticks(ticks, EXPRESSIONS, rotation=45, ha="right")
    axes.set_yticks(ticks, EXPRESSIONS)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    write_figure(figure, path)


def plot_confidence(conditions: dict[str, dict[str, Any]], path: Path) -> None:
    """Writes per-class bars of the mean true-class confidence, one bar per condition, plus the overall mean."""
    groups = [*EXPRESSIONS, "overall"]
    figure = new_figure(9.0, 4.0)
    axes = figure.add_subplot()
    width = 0.8 / len(conditions)
    for offset, (name, metrics) in enumerate(conditions.items()):
        values = [metrics["per_class_true_class_confidence"][c] for c in EXPRESSIONS]
        values.append(metrics["true_class_confidence"])
        positions = np.arange(len(groups)) + (offset - (len(conditions) - 1) / 2) * width
        axes.bar(positions, [np.nan if v is None else v for v in values], width, label=name)
    axes.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel("mean probability of the true class")
    axes.legend()
    write_figure(figure, path)


def plot_tsne(features: dict[str, torch.Tensor], labels: torch.Tensor, path: Path, seed: int = 0) -> None:
    """Writes a t-SNE of each condition's features, one panel per condition, coloured by true class."""
    from sklearn.manifold import TSNE

    count = labels.numel()
    chosen = np.arange(count)
    if count > TSNE_POINTS:
        chosen = np.sort(np.random.default_rng(seed).choice(count, TSNE_POINTS, replace=False))
    shown_labels = labels.numpy()[chosen]
    figure = new_figure(5.0 * len(features), 5.0)
    for panel, (name, vectors) in enumerate(features.items(), start=1):
        axes = figure.add_subplot(1, len(features), panel)
        axes.set_title(name)
        axes.set_xticks([])
        axes.set_yticks([])
        if len(chosen) < 3:
            axes.text(0.5, 0.5, "too few images for t-SNE", ha="center", va="center", transform=axes.transAxes)
            continue
        # t-SNE needs a perplexity below the number of points; 30 is sklearn's default for larger sets.
        tsne = TSNE(perplexity=min(30.0, len(chosen) - 1.0), random_state=seed, init="pca")
        points = tsne.fit_transform(vectors.numpy()[chosen])
        for index, expression in enumerate(EXPRESSIONS):
            mask = shown_labels == index
            axes.scatter(points[mask, 0], points[mask, 1], s=8, color=f"C{index}", label=expression)
    handles, names = figure.axes[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, names, loc="lower center", ncol=len(EXPRESSIONS), markerscale=2)
    write_figure(figure, path)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; floats get four decimals, None shows as `-`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines.extend("| " + " | ".join(_cell(value) for value in row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def metrics_table(metrics: dict[str, Any]) -> str:
    """The Markdown table of `evaluate_run`'s metrics: images, accuracy and mean confidences per condition."""
    rows = [(name, values["images"], _percent(values["accuracy"]), values["confidence"],
             values["true_class_confidence"]) for name, values in metrics["conditions"].items()]
    return markdown_table(("condition", "images", "accuracy", "mean confidence", "mean true-class confidence"),
                          rows)


def _report(metrics: dict[str, Any], figures: dict[str, str]) -> str:
    conditions = metrics["conditions"]
    per_class = markdown_table(
        ("class", *(f"{name} accuracy" for name in conditions), "images"),
        [(expression, *(_percent(values["per_class_accuracy"][expression]) for values in conditions.values()),
          next(iter(conditions.values()))["per_class_images"][expression]) for expression in EXPRESSIONS])
    predictions = markdown_table(
        ("condition", *EXPRESSIONS, "top-class share", "entropy"),
        [(name, *values["predicted_per_class"].values(), values["top_class_share"], values["prediction_entropy"])
         for name, values in conditions.items()])
    cosines = {name: values["prior_cosine"] for name, values in conditions.items() if "prior_cosine" in values}
    darkening = "; images used as given" if metrics["lowlight"] == "none" else \
        f"; low-light images darkened on the fly with preset `{metrics['lowlight']}`, seed {metrics['seed']}"
    parts = [
        f"# Evaluation of {Path(metrics['run']).name} ({metrics['model']})\n",
        f"Checkpoint `{metrics['checkpoint']}`, test split of `{metrics['data']}`{darkening}; "
        f"evaluated on {metrics['device']}"
        + (f"; {metrics['skipped_images']} unreadable images left out" if metrics["skipped_images"] else "") + ".\n",
        "## Accuracy and confidence\n",
        "Confidence is the mean largest softmax probability; true-class confidence the mean probability of the "
        "correct class.\n",
        metrics_table(metrics),
        "## Per-class accuracy\n",
        per_class,
        "## Predictions\n",
        "How often each class is predicted; top-class share is the largest share of the predictions one class takes, "
        "entropy that of the predicted classes over log K (0: one class for every image, 1: all equally often).\n",
        predictions,
        *(["Mean cosine of the inference prior Z-hat to the frozen teacher's Z (true label): "
           + ", ".join(f"{name} {value:.4f}" for name, value in cosines.items()) + ".\n"] if cosines else []),
        "## Figures\n",
        *(f"![{caption}]({name})\n" for name, caption in figures.items()),
    ]
    return "\n".join(parts)


def evaluate_run(run: Run, data: str | None = None, lowlight: str | None = None, *, checkpoint: str = "best",
                 device: str | None = None, batch_size: int | None = None, out_dir: str | Path | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Evaluates a run's model on normal and low-light test images and writes metrics, figures and a report."""
    settings, model, device, metrics, conditions, batch_size = _prepare(run, lowlight, checkpoint, device, batch_size)
    source = _test_source(metrics, settings, data, progress)
    out = Path(out_dir) if out_dir is not None else run.evaluation_dir
    metrics["conditions"], features = {}, {}
    for name, darken in conditions.items():
        labels, probabilities, features[name], cosines = _infer(
            model, _batches(run, model, source, darken, batch_size), device, metrics["seed"], features=True, desc=name,
            progress=progress)
        metrics["conditions"][name] = condition_metrics(labels, probabilities[None])
        if cosines is not None:
            metrics["conditions"][name]["prior_cosine"] = cosines.mean().item()
    metrics["classes"] = list(EXPRESSIONS)
    write_json(out / METRICS_FILE, metrics)

    figures = {}
    for name, values in metrics["conditions"].items():
        figures[f"confusion_{name}.png"] = f"confusion matrix, {name}"
        plot_confusion(values["confusion"], f"{Path(metrics['run']).name}: {name}", out / f"confusion_{name}.png")
    figures["confidence.png"] = "mean true-class confidence per class"
    plot_confidence(metrics["conditions"], out / "confidence.png")
    figures["tsne.png"] = "t-SNE of the fused features"
    plot_tsne(features, labels, out / "tsne.png", seed=metrics["seed"])
    report = _report(metrics, figures).encode("utf-8")
    write_atomic(out / REPORT_FILE, lambda file: file.write(report))
    return metrics


def _check_steps(steps: Sequence[int] | None, total: int) -> list[int]:
    if steps is None:
        return list(range(1, total + 1))
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence) or not steps or any(
            isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total for k in steps):
        raise ValueError(f"steps must be a non-empty list of integers in 1..{total} (prior.steps), got {steps!r}")
    return sorted(set(steps))


def plot_sweep(sweep: dict[str, Any], path: Path) -> None:
    """Writes accuracy against the number of reverse diffusion steps, one line per condition."""
    figure = new_figure(6.0, 4.0)
    axes = figure.add_subplot()
    for name, accuracies in sweep["accuracy"].items():
        axes.plot(sweep["steps"], [100 * a for a in accuracies], marker="o", label=name)
    axes.set_xticks(sweep["steps"])
    axes.set_xlabel("reverse diffusion steps")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(Path(sweep["run"]).name)
    axes.legend()
    write_figure(figure, path)


def sweep_steps(run: Run, data: str | None = None, lowlight: str | None = None, steps: Sequence[int] | None = None,
                *, checkpoint: str = "best", device: str | None = None, batch_size: int | None = None,
                out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Measures an LLDif run's accuracy against the number of reverse diffusion steps and writes it with a plot."""
    settings, model, device, sweep, conditions, batch_size = _prepare(run, lowlight, checkpoint, device, batch_size)
    if not _is_diffusion_model(model):
        raise ValueError(f"{run.path} holds a {sweep['model']} model, which has no diffusion; sweep-steps needs an "
                         "LLDif run")
    prior = model.config.prior
    if not prior.use_diffusion:
        raise ValueError(f"{run.path} was trained with prior.use_diffusion off, so it has no diffusion; "
                         "sweep-steps needs an LLDif run with diffusion")
    sweep["steps"] = _check_steps(steps, prior.steps)
    source = _test_source(sweep, settings, data, progress)
    sweep["accuracy"] = {}
    for name, darken in conditions.items():
        labels, probabilities, _, _ = _infer(model, _batches(run, model, source, darken, batch_size),
                                             device, sweep["seed"], steps=sweep["steps"], desc=name,
                                             progress=progress)
        sweep["accuracy"][name] = [condition_metrics(labels, p)["accuracy"] for p in probabilities.values()]
    out = Path(out_dir) if out_dir is not None else run.evaluation_dir
    write_json(out / SWEEP_FILE, sweep)
    plot_sweep(sweep, out / "sweep_steps.png")
    return sweep


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `lldif train`")
    parser.add_argument("--data", metavar="SPEC", default=None,
                        help="data spec whose test split to use (default: the run's test data, else its data)")
    parser.add_argument("--lowlight", choices=LOWLIGHT_CHOICES, default=None,
                        help="preset that darkens the low-light condition (default: the run's, or paper when it "
                             "trained without darkening); none evaluates the images only as given")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="default best")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                        help="default: the run's batch size")
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder (default: RUN_DIR/evaluation)")


def add_evaluate_command(commands: argparse._SubParsersAction) -> None:
    """Registers `lldif evaluate RUN_DIR [--data] [--lowlight] [--checkpoint] [--device] [--batch-size] [--out]`."""
    parser = commands.add_parser(
        "evaluate", help="accuracy, confusion, confidence and t-SNE of a run on normal and low-light test images",
        description="Evaluates a run's model on the test images as given (normal) and darkened on the fly "
                    "(low-light, repeatable with the run's seed), and writes metrics.json, confusion_<condition>.png, "
                    "confidence.png, tsne.png and report.md (which shows them all) into RUN_DIR/evaluation.")
    _add_common_options(parser)

    def run(args: argparse.Namespace) -> None:
        metrics = evaluate_run(Run(args.run_dir), args.data, args.lowlight, checkpoint=args.checkpoint,
                               device=args.device, batch_size=args.batch_size, out_dir=args.out)
        print(metrics_table(metrics), end="")
        out = Path(args.out) if args.out is not None else Run(args.run_dir).evaluation_dir
        print(f"report: {out / REPORT_FILE}")

    parser.set_defaults(run=run)


def _step_list(text: str) -> list[int]:
    """An argparse type for a comma-separated list of positive integers."""
    return [positive_int(item) for item in text.split(",")]


def add_sweep_steps_command(commands: argparse._SubParsersAction) -> None:
    """Registers `lldif sweep-steps RUN_DIR [--steps 1,2,4] [evaluate's options]`."""
    parser = commands.add_parser(
        "sweep-steps", help="accuracy of an LLDif run against the number of reverse diffusion steps",
        description="Measures an LLDif run's accuracy on normal and low-light test images for each number of "
                    "reverse diffusion steps (the paper's Fig. 7/8) and writes sweep_steps.json and "
                    "sweep_steps.png into RUN_DIR/evaluation.")
    _add_common_options(parser)
    parser.add_argument("--steps", type=_step_list, default=None, metavar="N,N,...",
                        help="step counts to try, each in 1..T (default: every count from 1 to the model's T)")

    def run(args: argparse.Namespace) -> None:
        sweep = sweep_steps(Run(args.run_dir), args.data, args.lowlight, args.steps, checkpoint=args.checkpoint,
                            device=args.device, batch_size=args.batch_size, out_dir=args.out)
        rows = zip(sweep["steps"], *(map(_percent, values) for values in sweep["accuracy"].values()), strict=True)
        print(markdown_table(("steps", *sweep["accuracy"]), rows), end="")

    parser.set_defaults(run=run)
