"""`lldif ablate`: Table 5's four stage-2 variants from one stage-1 run, evaluated side by side."""

from __future__ import annotations

import json

import pytest

from lldif.cli import main
from lldif.run import Run
from lldif.train import TrainSettings, train


def test_ablation_trains_and_tabulates_every_variant(tmp_path, capsys):
    stage1 = train(TrainSettings(stage="1", config="tiny", data="synthetic:14", epochs=1, batch_size=7, workers=0),
                   tmp_path / "stage1", progress=False)
    main(["ablate", str(stage1.path), "--out", str(tmp_path / "ablation"), "--epochs", "1", "--quiet"])
    table = capsys.readouterr().out
    for name in ("LLDif (CE + KL)", "CE only", "no inserted noise", "no diffusion"):
        assert f"| {name}" in table
    results = json.loads((tmp_path / "ablation" / "ablation.json").read_text())["variants"]
    assert set(results) == {"full", "ce-only", "no-inserted-noise", "no-diffusion"}
    assert all(0 <= results[v]["low-light"] <= 1 for v in results)
    no_diffusion = Run(tmp_path / "ablation" / "no-diffusion").load_model("last")
    assert no_diffusion.diffusion.denoiser is None and not no_diffusion.config.prior.use_diffusion
    assert Run(tmp_path / "ablation" / "ce-only").load_model("last").config.loss.prior_loss == "none"
    full = Run(tmp_path / "ablation" / "full")
    assert full.settings["init"] == str(stage1.path) and full.settings["stage"] == "2"


def test_ablation_of_some_variants_says_which_were_left_out(tmp_path, capsys):
    stage1 = train(TrainSettings(stage="1", config="tiny", data="synthetic:14", epochs=1, batch_size=7, workers=0),
                   tmp_path / "stage1", progress=False)
    main(["ablate", str(stage1.path), "--out", str(tmp_path / "ablation"), "--epochs", "1", "--quiet",
          "--variants", "full,no-diffusion"])
    table = capsys.readouterr().out
    assert "| LLDif (CE + KL)" in table and "| no diffusion" in table and "| CE only" not in table
    assert "Not run here: CE only (no prior loss), no inserted noise" in table
    assert sorted(json.loads((tmp_path / "ablation" / "ablation.json").read_text())["variants"]) == [
        "full", "no-diffusion"]
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", str(stage1.path), "--out", str(tmp_path / "ablation"), "--variants", "full,table6"])
    assert exit_info.value.code == 2 and "variants must be some of" in capsys.readouterr().err


def test_ablate_needs_a_run_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", str(tmp_path), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is not a run folder" in error and len(error.strip().splitlines()) == 1
