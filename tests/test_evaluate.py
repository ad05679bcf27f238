"""`lldif evaluate` and `lldif sweep-steps` on tiny untrained models and 14 synthetic test faces (2 per class)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from lldif import LLDif, lldif_tiny
from lldif.cli import main
from lldif.data.labels import EXPRESSIONS
from lldif.data.loader import open_dataset
from lldif.evaluate import (
    _batches,
    _infer,
    condition_metrics,
    evaluate_run,
    markdown_table,
    prediction_spread,
    sweep_steps,
)
from lldif.models.baseline import BaselineCNN, baseline_tiny
from lldif.run import Run
from lldif.train import validation_outputs

DATA = "synthetic:14"
HAPPINESS = EXPRESSIONS.index("happiness")


def make_run(folder: Path, model: nn.Module, kind: str, lowlight: str = "paper") -> Run:
    settings = {"data": DATA, "test_data": None, "lowlight": lowlight, "seed": 3, "batch_size": 7, "model": kind}
    run = Run(folder)
    run.create(settings, model.config.to_dict())
    model.save_pretrained(run.checkpoint("best"))
    return run


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a few shared cores, a second OpenMP thread (torch's or t-SNE's) waits at every barrier for a core that
    # another process holds, which made this file several times slower; one thread keeps it steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lldif_run(tmp_path_factory) -> Run:
    torch.manual_seed(0)
    return make_run(tmp_path_factory.mktemp("lldif-run"), LLDif(lldif_tiny()), "lldif")


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory) -> Run:
    torch.manual_seed(0)
    return make_run(tmp_path_factory.mktemp("baseline-run"), BaselineCNN(baseline_tiny()), "baseline", "none")


@pytest.fixture(scope="module")
def lldif_metrics(lldif_run) -> dict:
    return evaluate_run(lldif_run, progress=False)


def test_condition_metrics_of_known_probabilities():
    labels = torch.tensor([0, 0, 3, 3])
    probabilities = torch.full((4, 7), 0.05)
    probabilities[0, 0] = probabilities[1, 3] = probabilities[2, 3] = probabilities[3, 0] = 0.7
    metrics = condition_metrics(labels, probabilities)
    assert metrics["images"] == 4 and metrics["accuracy"] == pytest.approx(0.5)
    confusion = torch.tensor(metrics["confusion"])
    assert confusion[0, 0] == confusion[0, 3] == confusion[3, 3] == confusion[3, 0] == 1
    assert confusion.sum() == 4
    assert metrics["confidence"] == pytest.approx(0.7)
    assert metrics["true_class_confidence"] == pytest.approx((0.7 + 0.05 + 0.7 + 0.05) / 4)
    assert metrics["per_class_accuracy"]["surprise"] == pytest.approx(0.5)
    assert metrics["per_class_accuracy"]["fear"] is None  # no images of the class
    assert metrics["per_class_images"]["happiness"] == 2
    assert metrics["per_class_true_class_confidence"]["happiness"] == pytest.approx(0.375)
    # Classes 0 and 3 are predicted twice each.
    assert metrics["predicted_per_class"] == {name: 2 * (name in ("surprise", "happiness")) for name in EXPRESSIONS}
    assert metrics["top_class_share"] == pytest.approx(0.5)
    assert metrics["prediction_entropy"] == pytest.approx(math.log(2) / math.log(7))


def test_prediction_spread_from_one_class_to_all_equally():
    balanced = condition_metrics(torch.arange(7), torch.eye(7))
    assert balanced["predicted_per_class"] == dict.fromkeys(EXPRESSIONS, 1)
    assert balanced["top_class_share"] == pytest.approx(1 / 7) and balanced["prediction_entropy"] == pytest.approx(1.0)
    assert prediction_spread(torch.tensor([0, 0, 9, 0, 0, 0, 0])) == (1.0, 0.0)
    assert prediction_spread(torch.tensor([3, 1, 0, 0, 0, 0, 0]))[0] == pytest.approx(0.75)
    assert prediction_spread(torch.zeros(7, dtype=torch.int64)) == (0.0, 0.0)  # no images: no spread, no NaN


class AlwaysHappy(nn.Module):
    """A model whose softmax is 0.4 for happiness and 0.1 for every other class, whatever the image."""

    config = SimpleNamespace(image_size=64)
    landmark_points = None

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor | None = None, *,
                features: bool = False) -> torch.Tensor:
        return images.mean(dim=(2, 3)) if features else self.classify(images.mean(dim=(2, 3)))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(features.shape[0], 7)
        logits[:, HAPPINESS] = math.log(4.0)
        return logits


def test_evaluate_counts_a_model_with_known_outputs(baseline_run, tmp_path, monkeypatch):
    monkeypatch.setattr(Run, "load_model", lambda self, checkpoint="best", map_location="cpu": AlwaysHappy())
    metrics = evaluate_run(baseline_run, out_dir=tmp_path, progress=False)
    for values in metrics["conditions"].values():
        assert values["images"] == 14 and values["accuracy"] == pytest.approx(2 / 14)
        confusion = torch.tensor(values["confusion"])
        assert confusion.sum() == 14 and (confusion[:, HAPPINESS] == 2).all()
        assert values["confidence"] == pytest.approx(0.4)
        assert values["true_class_confidence"] == pytest.approx((2 * 0.4 + 12 * 0.1) / 14)
        assert values["per_class_true_class_confidence"]["happiness"] == pytest.approx(0.4)
        assert values["per_class_accuracy"] == {name: float(name == "happiness") for name in EXPRESSIONS}
        assert values["predicted_per_class"] == {name: 14 * (name == "happiness") for name in EXPRESSIONS}
        assert values["top_class_share"] == 1.0 and values["prediction_entropy"] == 0.0
        assert "prior_cosine" not in values
    report = (tmp_path / "report.md").read_text()
    predictions = report[report.index("## Predictions"):report.index("## Figures")]
    assert f"| condition | {' | '.join(EXPRESSIONS)} | top-class share | entropy |" in predictions
    for name in ("normal", "low-light"):
        assert f"| {name} | 0 | 0 | 0 | 14 | 0 | 0 | 0 | 1.0000 | 0.0000 |" in predictions
    assert "cosine" not in report


def test_evaluate_lldif_writes_report_and_figures(lldif_run, lldif_metrics):
    assert lldif_metrics["model"] == "lldif" and lldif_metrics["lowlight"] == "paper"
    assert lldif_metrics["data"] == DATA and lldif_metrics["checkpoint"] == "best"
    assert list(lldif_metrics["conditions"]) == ["normal", "low-light"]
    for values in lldif_metrics["conditions"].values():
        assert values["images"] == 14 and torch.tensor(values["confusion"]).sum() == 14
        assert set(values["per_class_images"].values()) == {2}
    out = lldif_run.evaluation_dir
    assert json.loads((out / "metrics.json").read_text()) == lldif_metrics
    report = (out / "report.md").read_text()
    assert report.startswith(f"# Evaluation of {lldif_run.path.name} (lldif)")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(links) == ["confidence.png", "confusion_low-light.png", "confusion_normal.png", "tsne.png"]
    for link in links:
        assert (out / link).read_bytes().startswith(b"\x89PNG")
    assert "| normal | 14 |" in report and "| low-light | 14 |" in report
    predictions = report[report.index("## Predictions"):report.index("## Figures")]
    for name, values in lldif_metrics["conditions"].items():
        assert sum(values["predicted_per_class"].values()) == 14
        assert max(values["predicted_per_class"].values()) / 14 == pytest.approx(values["top_class_share"])
        assert 0.0 <= values["prediction_entropy"] <= 1.0 and -1.0 <= values["prior_cosine"] <= 1.0
        row = (f"| {name} | {' | '.join(map(str, values['predicted_per_class'].values()))} | "
               f"{values['top_class_share']:.4f} | {values['prediction_entropy']:.4f} |")
        assert row in predictions
        assert f"{name} {values['prior_cosine']:.4f}" in predictions.split("cosine of the inference prior")[1]


def test_evaluate_keeps_the_inference_path_and_measures_the_prior_as_training_does(lldif_run, lldif_metrics):
    model = lldif_run.load_model()
    seed, generator = 3, torch.Generator().manual_seed(3)
    batches = list(_batches(lldif_run, model, open_dataset(DATA, "test"), None, 7))
    _, probabilities, features, cosines = _infer(model, batches, torch.device("cpu"), seed, features=True)
    with torch.no_grad():
        expected = torch.cat([model(b.image, b.landmarks, generator=generator, features=True) for b in batches])
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    torch.testing.assert_close(probabilities[None], model.classify(expected).softmax(-1), rtol=0, atol=0)
    # Stage 2's per-epoch `test_prior_cosine` is the same measure.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        trained = torch.cat([validation_outputs(model, "2", b, generator)["prior_cosine"] for b in batches])
    torch.testing.assert_close(cosines, trained)
    assert lldif_metrics["conditions"]["normal"]["prior_cosine"] == pytest.approx(float(cosines.mean()))


def test_evaluate_lldif_repeats(lldif_run, lldif_metrics, tmp_path):
    assert evaluate_run(lldif_run, out_dir=tmp_path, progress=False)["conditions"] == lldif_metrics["conditions"]


def test_lowlight_none_evaluates_the_images_as_given(lldif_run, lldif_metrics, tmp_path):
    metrics = evaluate_run(lldif_run, lowlight="none", out_dir=tmp_path, progress=False)
    assert list(metrics["conditions"]) == ["given"] and metrics["lowlight"] == "none"
    # Each condition samples with its own seeded generator, so "given" is the default's "normal".
    assert metrics["conditions"]["given"] == lldif_metrics["conditions"]["normal"]
    assert (tmp_path / "confusion_given.png").is_file() and not (tmp_path / "confusion_low-light.png").exists()


def test_baseline_run_defaults_to_the_paper_preset(baseline_run, tmp_path):
    metrics = evaluate_run(baseline_run, data="synthetic:7", out_dir=tmp_path, progress=False)
    assert metrics["model"] == "baseline" and metrics["lowlight"] == "paper" and metrics["data"] == "synthetic:7"
    assert [values["images"] for values in metrics["conditions"].values()] == [7, 7]
    assert all("prior_cosine" not in values for values in metrics["conditions"].values())
    report = (tmp_path / "report.md").read_text()
    assert "## Predictions" in report and "cosine" not in report


@pytest.mark.parametrize(("options", "name"), [({"lowlight": "bright"}, "lowlight"), ({"batch_size": 0}, "batch_size"),
                                               ({"checkpoint": "first"}, "checkpoint"), ({"device": "gpu"}, "device")])
def test_evaluate_rejects_bad_arguments(lldif_run, tmp_path, options, name):
    with pytest.raises(ValueError, match=name):
        evaluate_run(lldif_run, out_dir=tmp_path, progress=False, **options)


def test_sweep_steps_matches_evaluate(lldif_run, lldif_metrics, tmp_path):
    total = lldif_tiny().prior.steps
    sweep = sweep_steps(lldif_run, out_dir=tmp_path, progress=False)
    assert sweep["steps"] == list(range(1, total + 1))
    assert {name: len(values) for name, values in sweep["accuracy"].items()} == {"normal": total, "low-light": total}
    for name, values in sweep["accuracy"].items():
        assert values[-1] == lldif_metrics["conditions"][name]["accuracy"]  # T steps is evaluate's default
    assert json.loads((tmp_path / "sweep_steps.json").read_text()) == sweep
    assert (tmp_path / "sweep_steps.png").read_bytes().startswith(b"\x89PNG")


def test_sweep_steps_needs_diffusion(baseline_run, tmp_path):
    with pytest.raises(ValueError, match="has no diffusion; sweep-steps needs an LLDif run"):
        sweep_steps(baseline_run, out_dir=tmp_path, progress=False)
    config = lldif_tiny()
    config.prior.use_diffusion = False
    run = make_run(tmp_path / "no-diffusion", LLDif(config), "lldif")
    with pytest.raises(ValueError, match="has no diffusion"):
        sweep_steps(run, out_dir=tmp_path, progress=False)


@pytest.mark.parametrize("steps", [[0], [5], [], [1, 2.0], "12"])
def test_sweep_steps_rejects_steps_outside_the_chain(lldif_run, tmp_path, steps):
    with pytest.raises(ValueError, match=r"steps must be .* in 1\.\.4"):
        sweep_steps(lldif_run, steps=steps, out_dir=tmp_path, progress=False)


def test_markdown_table():
    assert markdown_table(("a", "b"), [(1, 0.5), ("x", None)]) == "| a | b |\n|---|---|\n| 1 | 0.5000 |\n| x | - |\n"


def test_cli_evaluate_and_sweep_steps(lldif_run, tmp_path, capsys):
    main(["evaluate", str(lldif_run.path), "--batch-size", "5", "--out", str(tmp_path), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "| normal | 14 |" in printed and f"report: {tmp_path / 'report.md'}" in printed
    main(["sweep-steps", str(lldif_run.path), "--steps", "2,1", "--lowlight", "none", "--out", str(tmp_path)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "| steps | given |" and [row.split()[1] for row in printed[2:]] == ["1", "2"]


@pytest.mark.parametrize("command", ["evaluate", "sweep-steps"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "RUN_DIR/evaluation" in " ".join(capsys.readouterr().out.split())


def write_record(folder: Path, record: dict) -> Path:
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(record))
    return folder


@pytest.mark.parametrize("command", ["evaluate", "sweep-steps"])
@pytest.mark.parametrize(("folder", "message"), [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: tmp, "is not a run folder"),
    (lambda tmp: write_record(tmp / "future", {"run_format": 99, "lldif_version": "9.0"}), "run format 99"),
])
def test_cli_unusable_run_folder_is_one_line(command, folder, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLDIF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main([command, str(folder(tmp_path))])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.startswith(f"lldif {command}: error: ") and message in error
    assert error.count("\n") == 1 and "Traceback" not in error


def test_cli_sweep_steps_of_a_baseline_is_one_line(baseline_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLDIF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["sweep-steps", str(baseline_run.path), "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "needs an LLDif run" in error and error.count("\n") == 1


def test_cli_rejects_a_bad_step_list(lldif_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep-steps", str(lldif_run.path), "--steps", "1,x"])
    assert exit_.value.code == 2 and "--steps: must be an integer >= 1, got 'x'" in capsys.readouterr().err
