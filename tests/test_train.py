"""`lldif train`: run folders, the three LLDif stages and the baseline, kill + resume, DDP on gloo, bad arguments."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lldif import LLDif
from lldif.cli import main
from lldif.models.config import lldif_tiny
from lldif.run import Run
from lldif.train import Trainer, TrainingObjective, TrainSettings, build_model, train, validation_metrics

TINY = {"config": "tiny", "data": "synthetic:28", "batch_size": 7, "lr": 1e-3, "workers": 0, "warmup_epochs": 0}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / "model.safetensors")


def metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def lldif_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lldif.cli", *args]


def test_validation_metrics_from_known_sums():
    sums = {"correct": torch.tensor(6.0), "loss": torch.tensor(14.0), "count": torch.tensor(14.0),
            "predicted": torch.tensor([7.0, 7.0, 0, 0, 0, 0, 0]), "mean_prior_correct": torch.tensor(2.0),
            "prior_cosine": torch.tensor(7.0)}
    got = validation_metrics(sums)
    assert got["test_accuracy"] == pytest.approx(6 / 14) and got["test_loss"] == pytest.approx(1.0)
    assert got["test_top_class_share"] == pytest.approx(0.5)
    assert got["test_prediction_entropy"] == pytest.approx(math.log(2) / math.log(7))
    assert got["test_accuracy_mean_prior"] == pytest.approx(2 / 14) and got["test_prior_cosine"] == pytest.approx(0.5)
    assert "test_prior_cosine" not in validation_metrics({key: sums[key] for key in
                                                          ("correct", "loss", "count", "predicted")})


def test_stage1_validation_reads_the_llformer_under_the_test_sets_mean_teacher_prior(tmp_path):
    la_clip = train(TrainSettings(stage="la-clip", epochs=1, **TINY), tmp_path / "la-clip", progress=False)
    settings = TrainSettings(stage="1", init=str(la_clip.path), epochs=1, **TINY)
    trainer = Trainer(settings, tmp_path / "1", progress=False)
    got = trainer.validate()
    model, batches = trainer.model.eval(), list(trainer.data.test_dataloader())
    with torch.no_grad():
        priors = [model.teacher_prior(batch.image, batch.label) for batch in batches]
        mean = torch.cat(priors).mean(0)
        correct = sum(int((model.prior_logits(batch.image, batch.landmarks, mean.expand(len(batch.label), -1))
                           .argmax(-1) == batch.label).sum()) for batch in batches)
        teacher = sum(int((model.prior_logits(batch.image, batch.landmarks, prior).argmax(-1) == batch.label).sum())
                      for batch, prior in zip(batches, priors, strict=True))
    count = sum(len(batch.label) for batch in batches)
    assert got["test_accuracy_mean_prior"] == pytest.approx(correct / count)
    assert got["test_accuracy"] == pytest.approx(teacher / count)


def test_settings_check_their_fields():
    with pytest.raises(ValueError, match="stage must be one of la-clip, 1, 2"):
        TrainSettings(data="synthetic:7", stage="3")
    with pytest.raises(ValueError, match="lowlight must be one of none, paper"):
        TrainSettings(data="synthetic:7", lowlight="dim")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainSettings(data="synthetic:7", batch_size=0)
    settings = TrainSettings(data="synthetic:7", betas=[0.9, 0.99])
    assert TrainSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


def test_the_three_stages_chain_through_their_run_folders(tmp_path):
    runs = {}
    for stage, init in (("la-clip", None), ("1", "la-clip"), ("2", "1")):
        settings = TrainSettings(stage=stage, init=runs.get(init), epochs=1, **TINY)
        runs[stage] = str(train(settings, tmp_path / stage, progress=False).path)
    for stage, folder in runs.items():
        folder = Path(folder)
        record = json.loads((folder / "run.json").read_text())
        assert record["run_format"] == 1 and record["settings"]["stage"] == stage
        assert {"torch", "python", "device"} <= set(record["environment"])
        rows = metrics(folder)
        assert [row["epoch"] for row in rows] == ["1"] and 0 <= float(rows[0]["test_accuracy"]) <= 1
        assert (folder / "checkpoints" / "best" / "model.safetensors").is_file()
        assert (folder / "checkpoints" / "last" / "training_state.safetensors").is_file()
    assert "train_prior" in metrics(Path(runs["2"]))[0]
    # The diagnostics of every run, and each stage's own.
    for stage, folder in runs.items():
        row = metrics(Path(folder))[0]
        assert 1 / 7 <= float(row["test_top_class_share"]) <= 1 and 0 <= float(row["test_prediction_entropy"]) <= 1
        assert ("test_accuracy_mean_prior" in row) == (stage == "1") and ("test_prior_cosine" in row) == (stage == "2")
    la_clip, stage1, stage2 = (weights(Path(runs[s]) / "checkpoints" / "last") for s in ("la-clip", "1", "2"))
    # each stage starts from the one before and changes only what it trains
    assert torch.equal(la_clip["la_clip.controls.0.weight"], stage1["la_clip.controls.0.weight"])
    pnet_s1 = next(name for name in stage1 if name.startswith("pnet_s1."))
    assert not torch.equal(la_clip[pnet_s1], stage1[pnet_s1]) and torch.equal(stage1[pnet_s1], stage2[pnet_s1])
    assert torch.any(stage1["label_prompt_embeddings"] != 0)
    model = Run(runs["2"]).load_model()
    assert not model.training and model.predict(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    settings = TrainSettings(stage="1", epochs=2, checkpoint_every=1, **TINY)  # 4 steps per epoch
    whole = train(settings, tmp_path / "whole", progress=False)

    killed = tmp_path / "killed"
    arguments = ["train", "--out", str(killed), "--stage", "1", "--epochs", "2", "--checkpoint-every", "1",
                 "--quiet", *(f"--{key.replace('_', '-')}={value}" for key, value in TINY.items())]
    process = subprocess.Popen(lldif_command(*arguments), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = killed / "checkpoints" / "last" / "training_state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            progress = json.loads(state_file.read_text())["progress"]
        except (OSError, ValueError, KeyError):
            progress = {"epoch": 0, "batch": 0}
        if progress["epoch"] == 1 and progress["batch"] >= 1:  # inside the second epoch
            break
        time.sleep(0.05)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()}"
    process.send_signal(signal.SIGKILL)
    process.wait()

    train(TrainSettings.from_dict(Run(killed).settings), killed, resume=True, progress=False)
    resumed, uninterrupted = weights(killed / "checkpoints" / "last"), weights(whole.path / "checkpoints" / "last")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert [row["epoch"] for row in metrics(killed)] == ["1", "2"]
    assert [row["test_accuracy"] for row in metrics(killed)] == [row["test_accuracy"] for row in metrics(whole.path)]


# Per-sample random masks differ between the two layouts (each process draws its own share from its own seed):
# DropPath's (0 in the tiny preset) and stage 1's label dropout (switched off here).
NO_LABEL_DROPOUT = ["--set", "prior.label_dropout=0"]


@pytest.mark.parametrize(("model", "extra"), [
    ("baseline", []),
    pytest.param("lldif", NO_LABEL_DROPOUT, id="lldif"),
])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, model, extra):
    assert lldif_tiny().dlnet.drop_path == 0
    # SGD: Adam's first steps are lr * sign(gradient), which flips on the gradients that are zero up to rounding
    options = {**TINY, "batch_size": 14, "optimizer": "sgd", "lr": 0.05}
    arguments = ["train", "--model", model, "--stage", "1", "--epochs", "1", "--quiet", *extra,
                 *(f"--{key.replace('_', '-')}={value}" for key, value in options.items())]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(lldif_command(*arguments, "--out", str(tmp_path / "one")), env=environment,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    pair = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000), "-m", "lldif.cli", *arguments,
                           "--out", str(tmp_path / "two")], env=environment, capture_output=True, text=True,
                          timeout=600)
    assert pair.returncode == 0, pair.stderr[-3000:]
    one, two = weights(tmp_path / "one" / "checkpoints" / "last"), weights(tmp_path / "two" / "checkpoints" / "last")
    for name in one:  # float32 sums in another order, amplified by two SGD steps: relative 1e-4 to 1.4e-3 measured
        difference = (two[name].double() - one[name].double()).norm()
        assert difference <= 5e-3 * one[name].double().norm() + 1e-5, (name, float(difference))
    assert metrics(tmp_path / "one")[0]["test_accuracy"] == metrics(tmp_path / "two")[0]["test_accuracy"]
    assert float(metrics(tmp_path / "two")[0]["train_loss"]) == pytest.approx(
        float(metrics(tmp_path / "one")[0]["train_loss"]), rel=1e-4)


def test_help_and_bad_arguments_give_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0 and "--resume" in capsys.readouterr().out
    cases = [
        (["--data", "rafdb:/no/such/folder"], "no/such/folder"),
        (["--data", "synthetic:7", "--config", "huge"], "config must be base, tiny or a JSON file"),
        (["--data", "synthetic:7", "--stage", "2"], "stage 2 starts from a stage-1 run"),
        (["--data", "synthetic:7", "--batch-size", "64", "--config", "tiny", "--stage", "la-clip"],
         "larger than the training set"),
        ([], "--data is required"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--out", str(tmp_path / "run"), "--quiet", *extra])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in error and "Traceback" not in error, error
        assert len(error.strip().splitlines()) == 1, error
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"run_format": 99, "lldif_version": "9.9"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(other), "--resume"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "run format 99" in error and len(error.strip().splitlines()) == 1


# --- starting from an init run with overrides: what each stage may change ------------------------------------------


def saved_run(folder: Path, stage: str, seed: int) -> LLDif:
    """A run folder of `stage` holding a tiny LLDif (random weights, non-zero label prompts) as its only checkpoint,
    without training one."""
    torch.manual_seed(seed)
    model = LLDif(lldif_tiny())
    model.set_label_prompts(torch.randn(7, 384))
    model.freeze_for_stage({"la-clip": 0, "1": 1}[stage])
    folder.mkdir(parents=True)
    run = Run(folder)
    run.create(TrainSettings(stage=stage, **TINY).to_dict(), model.config.to_dict())
    model.save_pretrained(run.checkpoint("last"))
    return model


def assert_inherited(model: LLDif, init: LLDif, inherited) -> None:
    """Every weight `inherited(name)` names is the init run's, bitwise."""
    state, start = model.state_dict(), init.state_dict()
    names = [name for name in start if inherited(name)]
    assert names
    for name in names:
        assert torch.equal(state[name], start[name]), name


@pytest.mark.parametrize("overrides", [{"fusion.embed_dim": 32}, {"prior.pnet_s1": "mlp"},
                                       {"prior.normalize": "none", "dtnet.bias_free_norm": True}])
def test_stage1_overrides_may_change_every_weight_but_la_clips(tmp_path, overrides):
    init = saved_run(tmp_path / "la-clip", "la-clip", seed=1)
    model = build_model(TrainSettings(stage="1", init=str(tmp_path / "la-clip"), overrides=overrides, **TINY))
    assert isinstance(model, LLDif) and model.stage == 1
    for key, value in overrides.items():
        part, name = key.split(".")
        assert getattr(getattr(model.config, part), name) == value
    assert_inherited(model, init, lambda name: name.startswith(("la_clip.", "label_prompt_embeddings")))
    if "fusion.embed_dim" in overrides:
        assert model.head.head.weight.shape[1] == 32 * (model.head.pos_embed.shape[1] - 1)
    if "prior.normalize" in overrides:
        assert not any(name.startswith("pnet_s1.out_norm.") for name in model.state_dict())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"la_clip.layers": 1}, r"not retrained: la_clip\."),
    ({"la_clip.width": 32}, "change the shape of weights"),
])
def test_stage1_overrides_may_not_change_la_clip(tmp_path, overrides, message):
    saved_run(tmp_path / "la-clip", "la-clip", seed=1)
    with pytest.raises(ValueError, match=message):
        build_model(TrainSettings(stage="1", init=str(tmp_path / "la-clip"), overrides=overrides, **TINY))


def test_stage2_overrides_may_change_only_pnet_s2_and_the_denoiser(tmp_path):
    init = saved_run(tmp_path / "1", "1", seed=2)
    settings = TrainSettings(stage="2", init=str(tmp_path / "1"), overrides={"prior.pnet_s2_feats": 8,
                                                                             "prior.denoiser_blocks": 2}, **TINY)
    model = build_model(settings)
    assert model.stage == 2 and model.pnet_s2.E[0].out_channels == 8 and len(model.diffusion.denoiser.resmlp) == 5
    assert_inherited(model, init, lambda name: not name.startswith(("diffusion.", "pnet_s2.")))
    # Fields of the inherited parts may not change, with their weights (bias_free_norm, embed_dim, normalize) or
    # without (modulation, readout: the same weights read another way).
    for key, value in [("dtnet.bias_free_norm", True), ("fusion.embed_dim", 32), ("prior.normalize", "none"),
                       ("dtnet.modulation", "diffir"), ("fusion.readout", "mean"), ("prior.label_embedding", "raw")]:
        with pytest.raises(ValueError, match=f"overrides change parts stage 2 inherits from its init run: {key}"):
            build_model(TrainSettings(stage="2", init=str(tmp_path / "1"), overrides={key: value}, **TINY))


def test_a_stage1_run_with_set_trains_from_an_la_clip_run(tmp_path):
    init = saved_run(tmp_path / "la-clip", "la-clip", seed=1)
    arguments = ["train", "--out", str(tmp_path / "1"), "--stage", "1", "--init", str(tmp_path / "la-clip"),
                 "--epochs", "1", "--quiet", "--set", "fusion.embed_dim=32", "--set", "prior.pnet_s1=mlp",
                 *(f"--{key.replace('_', '-')}={value}" for key, value in TINY.items())]
    assert main(arguments) in (0, None)
    assert Run(tmp_path / "1").settings["overrides"] == {"fusion.embed_dim": 32, "prior.pnet_s1": "mlp"}
    trained = weights(tmp_path / "1" / "checkpoints" / "last")
    start = init.state_dict()
    assert all(torch.equal(trained[name], start[name]) for name in start if name.startswith("la_clip."))
    assert trained["head.pos_embed"].shape[2] == 32 and "pnet_s1.proj.0.weight" in trained


def test_the_prior_only_objective_logs_no_classification():
    torch.manual_seed(0)
    model = LLDif(lldif_tiny())
    model.freeze_for_stage(2)
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 3, 64, 64, generator=generator), "label": torch.tensor([0, 5]),
             "landmarks": torch.rand(2, 68, 2, generator=generator) * 64}
    objective = TrainingObjective(model, "2")
    torch.manual_seed(1)
    loss, parts = objective(batch, prior_only=True)
    assert set(parts) == {"prior"} and torch.equal(loss.detach(), parts["prior"]) and loss.requires_grad
    torch.manual_seed(1)
    loss, parts = objective(batch)
    assert set(parts) == {"prior", "classification"}
    torch.testing.assert_close(loss.detach(), parts["prior"] + parts["classification"])
