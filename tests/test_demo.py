"""`lldif demo` on a handful of faces: both models trained and evaluated, one report with the figures, resumable."""

from __future__ import annotations

import json

import pytest

from lldif.cli import main


def test_demo_writes_a_report_comparing_both_models_and_keeps_finished_runs(tmp_path, capsys):
    arguments = ["demo", "--out", str(tmp_path / "demo"), "--report-dir", str(tmp_path / "report"), "--quiet",
                 "--train-faces", "14", "--test-faces", "7", "--la-clip-epochs", "1", "--stage1-epochs", "1",
                 "--stage2-epochs", "1", "--batch-size", "7"]
    main(arguments)
    printed = capsys.readouterr().out
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| LLDif-tiny | 0 |" in report and "| baseline | 0 |" in report and "Chance is 14.3%" in report
    assert "report.md" in printed and "| LLDif-tiny |" in printed
    # Step-matched: LA-CLIP 1 + stage 1 1 + stage 2 1 epochs of 2 steps, the baseline 3 epochs.
    assert "6 optimizer steps in all" in report and "baseline trains for 3 epochs" in report
    assert "found by the `dlib68` detector" in report and (tmp_path / "report" / "curves.png").is_file()
    for model in ("LLDif-tiny", "baseline"):
        for figure in ("tsne.png", "confusion_low-light.png", "confidence.png", "report.md"):
            assert (tmp_path / "report" / model / figure).is_file()
    runs = tmp_path / "demo" / "runs" / "seed0"
    assert sorted(p.name for p in runs.iterdir()) == ["baseline", "la-clip", "stage1", "stage2"]
    stage2 = json.loads((runs / "stage2" / "run.json").read_text())["settings"]
    assert stage2["init"] == str(runs / "stage1") and stage2["landmarks"] == "dlib68"
    assert sorted(p.name for p in (tmp_path / "demo" / "landmarks").iterdir()) == [
        "synthetic-seed0-112px-normal-dlib68.npz", "synthetic-seed0-112px-paper-seed0-dlib68.npz"]
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/checkpoints/last/model.safetensors")}
    main(arguments)  # a finished demo keeps its runs and only evaluates again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_demo_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0 and "under 10 minutes" in capsys.readouterr().out.lower()
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--stage2-epochs", "0"])
    assert exit_info.value.code == 2
