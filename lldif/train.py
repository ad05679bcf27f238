"""`lldif train`: one training stage of LLDif (LA-CLIP, stage 1, stage 2) or of the baseline CNN, into a run folder.

The defaults are the paper's recipe (SPEC 6): Adam (0.9, 0.999), lr 3.5e-5, weight decay 1e-4, ExponentialLR 0.98
per epoch, 200 epochs, batch 64, POSTER++'s augmentation, training images darkened on the fly. Everything a run
depends on is fixed by its settings and seed: the data order and augmentation come from (seed, epoch, index), the
model's own randomness from a generator whose state every checkpoint keeps, so `--resume` after a kill ends with
the weights an uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import distributed
from .argtypes import non_negative_int, positive_int
from .data.images import write_atomic
from .data.landmarks import DETECTOR_KINDS, detector_for
from .data.loader import FaceBatch, FaceDataModule, open_dataset
from .data.lowlight import LOWLIGHT_CHOICES, LowLight
from .data.text import label_prompts, text_embedder
from .evaluate import prediction_spread
from .models.baseline import BaselineCNN, BaselineConfig, baseline_tiny
from .models.config import LLDifConfig, apply_overrides, lldif_base, lldif_tiny
from .models.lldif import LLDif
from .models.pretrained import WEIGHTS_FILE, load_model_folder
from .run import RUN_FILE, Run, RunError

STAGES = ("la-clip", "1", "2")
MODELS = ("lldif", "baseline")
OPTIMIZERS = ("adam", "sgd")
LANDMARK_SOURCES = ("dataset", *DETECTOR_KINDS)
STATE_TENSORS, STATE_JSON = "training_state.safetensors", "training_state.json"


@dataclass
class TrainSettings:
    """Everything that decides a training run; stored in the run folder and read back by --resume."""

    data: str
    stage: str = "1"                 # la-clip | 1 | 2 (LLDif); ignored for the baseline
    model: str = "lldif"             # lldif | baseline
    config: str = "base"             # base | tiny | a JSON file (LLDifConfig.to_json, or a baseline config)
    test_data: str | None = None     # default: the test split of `data`
    lowlight: str = "paper"          # on-the-fly darkening of every image (train and test); none: data as given
    landmarks: str = "dataset"       # the data's own (landmarks.npz; synthetic: the exact points), or found by a
                                     # detector (mtcnn, dlib68) in each image as the model sees it
    landmark_cache: str | None = None  # folder of the detected landmarks (default RUN_DIR/landmarks)
    init: str | None = None          # run folder to start from: stage 1 <- LA-CLIP run, stage 2 <- stage-1 run
    epochs: int = 200
    batch_size: int = 64
    optimizer: str = "adam"          # adam (the paper) or sgd (momentum 0.9, as many FER baselines)
    lr: float = 3.5e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    lr_gamma: float = 0.98           # ExponentialLR factor per epoch
    warmup_epochs: int = 5           # stage 2: first epochs train PNET_S2 + denoiser on the prior loss alone
    seed: int = 0
    workers: int = 2
    amp: bool = True                 # bf16 autocast on CUDA
    checkpoint_every: int = 0        # steps between mid-epoch checkpoints (0: at the end of each epoch only)
    backend: str | None = None       # fused-op backend of the model (None: automatic)
    overrides: dict[str, Any] = field(default_factory=dict)  # config fields to change, e.g. {"prior.steps": 8}

    def __post_init__(self) -> None:
        choices = (("stage", STAGES), ("model", MODELS), ("lowlight", LOWLIGHT_CHOICES), ("optimizer", OPTIMIZERS),
                   ("landmarks", LANDMARK_SOURCES))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "workers", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr must be > 0, weight_decay >= 0 and lr_gamma in (0, 1], got {self.lr}, "
                             f"{self.weight_decay}, {self.lr_gamma}")
        self.betas = tuple(self.betas)

    @property
    def task(self) -> str:
        """What this run trains: `baseline`, or the LLDif stage."""
        return "baseline" if self.model == "baseline" else self.stage

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"settings: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**values)


# -------------------------------------------------------------------------------------------------------------
# the model of a run


def model_config(settings: TrainSettings) -> LLDifConfig | BaselineConfig:
    """The configuration `settings.config` names (a preset or a JSON file), with `settings.overrides` applied."""
    kind = BaselineConfig if settings.model == "baseline" else LLDifConfig
    presets = {"lldif": {"base": lldif_base, "tiny": lldif_tiny},
               "baseline": {"base": BaselineConfig, "tiny": baseline_tiny}}[settings.model]
    if settings.config in presets:
        config = presets[settings.config]()
    else:
        path = Path(settings.config)
        if not path.is_file():
            raise ValueError(f"config must be base, tiny or a JSON file, got {settings.config!r} (no such file)")
        try:
            config = kind.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as error:
            raise ValueError(f"config: {path}: {error}") from error
    return kind.from_dict(apply_overrides(config.to_dict(), settings.overrides)) if settings.overrides else config


def _inherited(key: str, task: str) -> bool:
    """Whether a weight of the init run is kept by a run of `task` (stage 1 keeps LA-CLIP and the label prompts
    and starts the rest afresh; stage 2 starts PNET_S2 and the denoiser afresh)."""
    if task == "1":
        return key.startswith(("la_clip.", "label_prompt_embeddings"))
    if task == "2":
        return not key.startswith(("diffusion.", "pnet_s2."))
    return True


# Config fields of the parts a stage-2 run inherits and keeps training or freezes: overriding them would change
# what the inherited weights mean (the same weights, read another way).
STAGE2_INHERITED_FIELDS = ("dtnet.", "dlnet.", "fusion.", "la_clip.", "prior.dim", "prior.pnet_s1",
                           "prior.normalize", "prior.label_embedding", "image_size", "internal_size", "num_classes",
                           "in_channels")


def _init_model(init: str) -> nn.Module:
    """The model `--init` names: a run folder's best checkpoint, or a model folder (`lldif convert`'s, a
    checkpoint folder) as it is."""
    folder = Path(init)
    if not (folder / RUN_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return load_model_folder(folder).eval()
    return Run(folder).load_model("best")


def _from_init(settings: TrainSettings) -> nn.Module:
    """The best model of the `init` run, rebuilt with `overrides` when there are any; the overrides may change
    only weights the run starts afresh (`_inherited`), and in stage 2 no field of the inherited parts."""
    start = _init_model(settings.init)
    if not settings.overrides:
        return start
    if settings.task == "2":
        kept = [key for key in settings.overrides if key.startswith(STAGE2_INHERITED_FIELDS)]
        if kept:
            raise ValueError(f"overrides change parts stage 2 inherits from its init run: {', '.join(kept)}")
    config = type(start.config).from_dict(apply_overrides(start.config.to_dict(), settings.overrides))
    model = type(start)(config)
    kept = {key: value for key, value in start.state_dict().items() if _inherited(key, settings.task)}
    wanted = {key for key in model.state_dict() if _inherited(key, settings.task)}
    stray = sorted(wanted.symmetric_difference(kept))
    if stray:
        raise ValueError(f"overrides change weights of the init run that are not retrained: {', '.join(stray[:5])}")
    try:
        model.load_state_dict(kept, strict=False)
    except RuntimeError as error:
        raise ValueError(f"overrides change the shape of weights of the init run: {error}") from error
    return model


def _frozen_text_embedder(cache: Path):
    """The frozen text encoder for captions and label prompts (MiniLM, cached in the run folder). Without MiniLM
    the data layer's learned embedding stands in, frozen at its random start: fixed random text features."""
    embedder = text_embedder(cache)
    if isinstance(embedder, nn.Module):
        embedder.requires_grad_(False)
    return embedder


def build_model(settings: TrainSettings, prompt_embedder=None) -> nn.Module:
    """The model a run starts from: `init`'s best checkpoint or a fresh one, frozen for the stage;
    `prompt_embedder()` gives the text embedder of the label prompts when the model has none yet."""
    if settings.model == "baseline":
        return _from_init(settings) if settings.init else BaselineCNN(model_config(settings))
    if settings.init:
        model = _from_init(settings)
        if not isinstance(model, LLDif):
            raise ValueError(f"init: {settings.init} holds a baseline run, not an LLDif one")
    else:
        if settings.stage == "2":
            raise ValueError("init: stage 2 starts from a stage-1 run; give its folder with --init")
        model = LLDif(model_config(settings))
        if settings.stage == "1":
            warnings.warn("stage 1 without --init: LA-CLIP is untrained, so the teacher prior is weak; train "
                          "--stage la-clip first and pass its run folder to --init", stacklevel=2)
    if settings.stage in ("la-clip", "1") and not model.label_prompt_embeddings.any():
        with torch.no_grad():
            model.set_label_prompts(prompt_embedder()(label_prompts()).float())
    if settings.backend is not None:
        model.set_backend(settings.backend)
    model.freeze_for_stage({"la-clip": 0, "1": 1, "2": 2}[settings.stage])
    return model


class TrainingObjective(nn.Module):
    """The loss of one training step of a run's task, as a module so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module, task: str, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model, self.task, self.label_smoothing = model, task, label_smoothing

    def forward(self, batch: FaceBatch, prior_only: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to back-propagate, its parts for the log)."""
        if self.task == "baseline":
            loss = self.model.loss(batch.image, batch.label, self.label_smoothing)
            return loss, {"classification": loss.detach()}
        if self.task == "la-clip":
            loss = self.model.la_clip_loss(batch)
            return loss, {}
        if self.task == "1":
            losses = self.model.stage1_loss(batch)
        else:
            losses = self.model.stage2_loss(batch, prior_only=prior_only)
        parts = {"prior": losses.prior.detach()}
        if losses.classification is not None:
            parts["classification"] = losses.classification.detach()
        return losses.total, parts


def validation_outputs(model: nn.Module, task: str, batch: FaceBatch, generator: torch.Generator,
                       mean_prior: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What a run is judged by after each epoch: "logits" -- LA-CLIP's label head, stage 1's teacher-guided
    LLformer, else the inference path -- and the diagnostics' inputs: stage 1's logits under `mean_prior`, the
    mean teacher prior ("mean_prior_logits", the label-shortcut detector), stage 2's cosine of each inference
    prior to its teacher prior ("prior_cosine")."""
    if task == "la-clip":
        return {"logits": model.la_clip_logits(batch.image)}
    if task == "baseline":
        return {"logits": model(batch.image)}
    if task == "1":
        outputs = {"logits": model.teacher_logits(batch.image, batch.label, batch.landmarks)}
        if mean_prior is not None:
            prior = mean_prior.expand(batch.label.shape[0], -1)
            outputs["mean_prior_logits"] = model.prior_logits(batch.image, batch.landmarks, prior)
        return outputs
    prior = model.inference_prior(batch.image, generator=generator)
    return {"logits": model.prior_logits(batch.image, batch.landmarks, prior),
            "prior_cosine": F.cosine_similarity(prior.float(), model.teacher_prior(batch.image, batch.label).float(),
                                                dim=-1)}


def validation_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The metrics of a validation from its sums over the test set (see `Trainer.validate`): accuracy and
    cross-entropy, the largest share of the predictions one class takes and the entropy of the predicted classes
    (0: one class for every image, 1: every class equally often), and the diagnostics the task has."""
    count = max(float(sums["count"]), 1.0)
    top_class_share, entropy = prediction_spread(sums["predicted"])
    metrics = {"test_accuracy": float(sums["correct"]) / count, "test_loss": float(sums["loss"]) / count,
               "test_top_class_share": top_class_share, "test_prediction_entropy": entropy}
    if "mean_prior_correct" in sums:
        metrics["test_accuracy_mean_prior"] = float(sums["mean_prior_correct"]) / count
    if "prior_cosine" in sums:
        metrics["test_prior_cosine"] = float(sums["prior_cosine"]) / count
    return metrics


# -------------------------------------------------------------------------------------------------------------
# checkpoints


def _swap_in(staging: Path, target: Path) -> None:
    """Replaces the folder `target` by the complete folder `staging`; a kill at any point leaves either the old or
    the new folder findable (`recover_checkpoints` finishes an interrupted swap)."""
    previous = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def recover_checkpoints(run: Run) -> None:
    """Finishes or undoes a checkpoint swap that a kill interrupted."""
    for name in ("best", "last"):
        target = run.checkpoint(name)
        previous, staging = target.with_name(name + ".old"), target.with_name(name + ".new")
        if not target.exists() and previous.exists():
            os.replace(previous, target)
        shutil.rmtree(previous, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                plain[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                          saved: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in saved["plain"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


@dataclass
class Progress:
    """Where training stands: the next (epoch, batch) to run, the best test accuracy so far and its epoch."""

    epoch: int = 0
    batch: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = -1


# -------------------------------------------------------------------------------------------------------------
# the loop


class Trainer:
    """Runs a TrainSettings into a run folder: new, or resumed from its last checkpoint."""

    def __init__(self, settings: TrainSettings, out: str | os.PathLike, *, resume: bool = False,
                 device: str | None = None, progress: bool = True) -> None:
        self.settings, self.run, self.show_progress = settings, Run(out), progress
        self.processes = distributed.start(device)
        self.device = self.processes.device
        if not resume and self.run.record_file.exists():
            raise ValueError(f"out: {self.run.path} already holds a run; pass --resume to continue it or choose "
                             "another --out")
        torch.manual_seed(settings.seed)
        embedders = []  # loaded at most once, and only when a caption or a label prompt needs embedding

        def embedder():
            if not embedders:
                embedders.append(_frozen_text_embedder(self.run.path / "text_embeddings.npz"))
            return embedders[0]

        self.model = build_model(settings, embedder).to(self.device)
        distributed.share_batch_norms(self.model, self.processes)
        self.model.train()
        if settings.task == "1" and self.model.config.prior.normalize == "batch" \
                and settings.batch_size // self.processes.world_size < 2:
            raise ValueError(f"batch_size {settings.batch_size} leaves fewer than 2 faces per process, which stage 1's "
                             "batch-standardised prior (prior.normalize=batch) needs")
        self.data = self._data_module(embedder() if settings.task == "la-clip" else None)
        if self.data.train_batches() == 0:
            raise ValueError(f"batch_size {settings.batch_size} is larger than the training set "
                             f"({len(self.data.train)} faces)")
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        if settings.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.parameters, lr=settings.lr, betas=settings.betas,
                                              weight_decay=settings.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.parameters, lr=settings.lr, momentum=0.9,
                                             weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, settings.lr_gamma)
        smoothing = self.model.config.loss.label_smoothing if isinstance(self.model, LLDif) else 0.0
        self.objective = TrainingObjective(self.model, settings.task, smoothing)
        self.step_objective = self.objective
        if self.processes.distributed:
            self.step_objective = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=settings.task == "2" and settings.warmup_epochs > 0)
        # The model's own randomness (DropPath, diffusion noise) draws from the global generator, seeded per
        # process; validation sampling has its own generator so it never shifts the training draws.
        torch.manual_seed(settings.seed + self.processes.rank)
        self.state = Progress()
        if resume:
            self._resume()
        elif self.processes.main:
            config = self.model.config.to_dict()
            self.run.create(settings.to_dict(), config)

    def _data_module(self, embed) -> FaceDataModule:
        settings = self.settings
        train = open_dataset(settings.data, "train")
        test = open_dataset(settings.test_data or settings.data, "test")
        lowlight = None if settings.lowlight == "none" else LowLight(settings.lowlight, seed=settings.seed)
        return FaceDataModule(train, test, image_size=self.model.config.image_size,
                              batch_size=settings.batch_size, workers=settings.workers, seed=settings.seed,
                              lowlight=lowlight, text_embedder=embed,
                              run_dir=self.run.path if self.processes.main else None,
                              progress=self.show_progress and self.processes.main,
                              detect_landmarks=detector_for(settings.landmarks, self.model.landmark_points),
                              landmark_cache=settings.landmark_cache or self.run.path / "landmarks")

    # --- checkpoints ---------------------------------------------------------------------------------------

    def _gather_rng_states(self) -> list[torch.Tensor]:
        state = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()
        if not self.processes.distributed:
            return [state]
        states: list[Any] = [None] * self.processes.world_size
        torch.distributed.all_gather_object(states, state)
        return states

    def _write_checkpoint(self, name: str, *extra_files: tuple[str, bytes]) -> None:
        """Writes the model (and `extra_files`) into checkpoints/<name> by a staged folder swap."""
        target = self.run.checkpoint(name)
        staging = target.with_name(name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        self.model.save_pretrained(staging)
        for file_name, payload in extra_files:
            write_atomic(staging / file_name, lambda file, data=payload: file.write(data))
        _swap_in(staging, target)

    def save_checkpoint(self) -> None:
        """Writes `last`: weights, optimizer, schedule, random generators of every process, progress."""
        rng_states = self._gather_rng_states()
        if not self.processes.main:
            return
        tensors, optimizer = _optimizer_state(self.optimizer)
        tensors.update({f"rng.{rank}": state for rank, state in enumerate(rng_states)})
        state = {"progress": dataclasses.asdict(self.state), "optimizer": optimizer,
                 "scheduler": self.scheduler.state_dict(), "world_size": self.processes.world_size,
                 "settings": self.settings.to_dict()}
        self._write_checkpoint("last", (STATE_TENSORS, safetensors.torch.save(tensors)),
                               (STATE_JSON, json.dumps(state, indent=2, sort_keys=True).encode()))

    def _save_best(self) -> None:
        if self.processes.main:
            self._write_checkpoint("best")

    def _resume(self) -> None:
        if TrainSettings.from_dict(self.run.settings) != self.settings:
            raise RunError(f"out: {self.run.path} was started with other settings; resume it with "
                           "`lldif train --resume --out` alone")
        recover_checkpoints(self.run)
        folder = self.run.checkpoint("last")
        if not (folder / STATE_JSON).is_file():
            raise RunError(f"out: {self.run.path} has no checkpoint to resume from yet; start it again")
        saved = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        if saved["world_size"] != self.processes.world_size:
            raise RunError(f"out: {self.run.path} was trained by {saved['world_size']} processes; resume it with "
                           f"as many (this is {self.processes.world_size})")
        weights = safetensors.torch.load_file(folder / "model.safetensors", device=str(self.device))
        self.model.load_state_dict(weights)
        tensors = safetensors.torch.load_file(folder / STATE_TENSORS)
        _load_optimizer_state(self.optimizer, tensors, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        rng = tensors[f"rng.{self.processes.rank}"]
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(rng, self.device)
        else:
            torch.set_rng_state(rng)
        self.state = Progress(**saved["progress"])

    # --- epochs --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.settings.amp and self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield

    def _to_device(self, batch: FaceBatch) -> FaceBatch:
        def move(value):
            return value.to(self.device, non_blocking=True) if torch.is_tensor(value) else value

        return FaceBatch(*(move(value) for value in batch))

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch from `state.batch` on; returns the mean loss (and parts) and throughput of its steps."""
        settings, processes = self.settings, self.processes
        prior_only = settings.task == "2" and epoch < settings.warmup_epochs \
            and self.model.config.loss.prior_loss != "none"
        loader = self.data.train_dataloader(epoch, start_batch=self.state.batch, rank=processes.rank,
                                            world_size=processes.world_size)
        totals: dict[str, float] = {}
        steps, images, started = 0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"{settings.task} epoch {epoch + 1}/{settings.epochs}", unit="batch",
                   disable=not (self.show_progress and processes.main), leave=False)
        for batch in bar:
            batch = self._to_device(batch)
            with self._autocast():
                loss, parts = self.step_objective(batch, prior_only)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss = loss.detach()
            for name, value in {"loss": loss, **parts}.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            steps += 1
            images += batch.image.shape[0] * processes.world_size
            self.state.batch += 1
            bar.set_postfix(loss=f"{float(loss):.4f}")
            if settings.checkpoint_every and self.state.batch % settings.checkpoint_every == 0 \
                    and self.state.batch < self.data.train_batches():
                self.save_checkpoint()
        seconds = time.perf_counter() - started
        means = torch.tensor([totals[name] / max(steps, 1) for name in sorted(totals)], dtype=torch.float64)
        means = distributed.sum_across(means, processes) / processes.world_size
        result = {f"train_{name}": float(value) for name, value in zip(sorted(totals), means, strict=True)}
        result["images_per_s"] = images / seconds if seconds > 0 else 0.0
        return result

    @torch.no_grad()
    def _mean_teacher_prior(self) -> torch.Tensor:
        """The mean of stage 1's teacher prior over the test set (all processes' shares)."""
        total, count = None, 0
        for batch in self.data.test_dataloader(rank=self.processes.rank, world_size=self.processes.world_size):
            batch = self._to_device(batch)
            with self._autocast():
                priors = self.model.teacher_prior(batch.image, batch.label).double()
            total = priors.sum(0) if total is None else total + priors.sum(0)
            count += priors.shape[0]
        sums = distributed.sum_across(torch.cat([total.cpu(), torch.tensor([float(count)], dtype=torch.float64)]),
                                      self.processes)
        return (sums[:-1] / sums[-1]).float().to(self.device)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Test accuracy, cross-entropy and the task's diagnostics (`validation_metrics`), over all processes."""
        was_training = self.model.training
        self.model.eval()
        task = self.settings.task
        generator = torch.Generator(self.device).manual_seed(self.settings.seed)
        mean_prior = self._mean_teacher_prior() if task == "1" else None
        sums: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor | float) -> None:
            value = torch.as_tensor(value, dtype=torch.float64).cpu()
            sums[name] = sums[name] + value if name in sums else value

        loader = self.data.test_dataloader(rank=self.processes.rank, world_size=self.processes.world_size)
        for batch in loader:
            batch = self._to_device(batch)
            with self._autocast():
                outputs = validation_outputs(self.model, task, batch, generator, mean_prior)
            logits = outputs["logits"].float()
            predicted = logits.argmax(-1)
            add("correct", float((predicted == batch.label).sum()))
            add("loss", float(F.cross_entropy(logits, batch.label, reduction="sum")))
            add("count", float(len(batch.label)))
            add("predicted", torch.bincount(predicted, minlength=logits.shape[-1]))
            if "mean_prior_logits" in outputs:
                add("mean_prior_correct", float((outputs["mean_prior_logits"].argmax(-1) == batch.label).sum()))
            if "prior_cosine" in outputs:
                add("prior_cosine", float(outputs["prior_cosine"].sum()))
        self.model.train(was_training)
        names = sorted(sums)
        sizes = [sums[name].numel() for name in names]
        reduced = distributed.sum_across(torch.cat([sums[name].reshape(-1) for name in names]), self.processes)
        return validation_metrics({name: part.reshape(sums[name].shape)
                                   for name, part in zip(names, reduced.split(sizes), strict=True)})

    def fit(self) -> Progress:
        """Trains the remaining epochs, writing metrics and checkpoints after each; returns the final progress."""
        settings, processes = self.settings, self.processes
        writer = _event_writer(self.run.path / "events") if processes.main else None
        try:
            for epoch in range(self.state.epoch, settings.epochs):
                started = time.perf_counter()
                row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], **self.train_epoch(epoch)}
                self.scheduler.step()
                row.update(self.validate())
                row["seconds"] = time.perf_counter() - started
                self.state.epoch, self.state.batch = epoch + 1, 0
                if row["test_accuracy"] > self.state.best_accuracy:
                    self.state.best_accuracy, self.state.best_epoch = row["test_accuracy"], epoch + 1
                    self._save_best()
                self.save_checkpoint()
                if processes.main:
                    self._log(row, writer)
        finally:
            if writer is not None:
                writer.close()
        return self.state

    def _log(self, row: dict[str, float], writer) -> None:
        _append_metrics(self.run.metrics_file, row)
        if writer is not None:
            for name, value in row.items():
                if name != "epoch":
                    writer.add_scalar(name, value, row["epoch"])
            writer.flush()
        if self.show_progress:
            parts = ", ".join(f"{name} {value:.4g}" for name, value in row.items() if name != "epoch")
            tqdm.write(f"{self.settings.task} epoch {row['epoch']}/{self.settings.epochs}: {parts}")


def _event_writer(folder: Path):
    """A TensorBoard writer when tensorboard is installed, else None (metrics.csv has the same numbers)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def _append_metrics(path: Path, row: dict[str, float]) -> None:
    """Adds an epoch's row to metrics.csv, rewriting the file atomically (rows of epochs at or after this one, left
    by a run killed after logging, are replaced)."""
    rows: list[dict[str, str]] = []
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as file:
            rows = [r for r in csv.DictReader(file) if int(r["epoch"]) < row["epoch"]]
    rows.append({name: f"{value:.6g}" if isinstance(value, float) else str(value) for name, value in row.items()})
    names = list(dict.fromkeys(name for r in rows for name in r))
    text = io.StringIO()
    table = csv.DictWriter(text, fieldnames=names, lineterminator="\n")
    table.writeheader()
    table.writerows(rows)
    data = text.getvalue().encode("utf-8")
    write_atomic(path, lambda file: file.write(data))


def train(settings: TrainSettings, out: str | os.PathLike, *, resume: bool = False, device: str | None = None,
          progress: bool = True) -> Run:
    """Trains (or resumes) a run into `out` and returns it."""
    trainer = Trainer(settings, out, resume=resume, device=device, progress=progress)
    try:
        trainer.fit()
    finally:
        distributed.stop(trainer.processes)
    return trainer.run


def train_or_resume(settings: TrainSettings, out: str | os.PathLike, *, device: str | None = None,
                    progress: bool = True) -> Run:
    """The finished run of `settings` in `out`: trained, resumed when interrupted, or kept when already done (what
    the commands that chain several runs use, so that they can be resumed too)."""
    run = Run(out)
    if not run.record_file.is_file():
        return train(settings, out, device=device, progress=progress)
    if TrainSettings.from_dict(run.settings) != settings:
        raise ValueError(f"out: {run.path} holds a run with other settings; use another folder")
    state = run.checkpoint("last") / STATE_JSON
    finished = state.is_file() and json.loads(state.read_text(encoding="utf-8"))["progress"]["epoch"] >= \
        settings.epochs
    return run if finished else train(settings, out, resume=True, device=device, progress=progress)


# -------------------------------------------------------------------------------------------------------------
# the command


def parse_override(text: str) -> tuple[str, Any]:
    """A `--set FIELD=VALUE` argument: the value as JSON, else as a string."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE like prior.steps=8, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _float_pair(text: str) -> tuple[float, float]:
    try:
        first, second = (float(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.999, got {text!r}") from error
    return first, second


def add_train_command(commands: argparse._SubParsersAction) -> None:
    """Registers `lldif train`."""
    defaults = TrainSettings(data="")
    parser = commands.add_parser(
        "train", help="train LLDif (one stage) or the baseline CNN into a run folder",
        description="Train one stage of LLDif -- la-clip, then 1 (--init the LA-CLIP run), then 2 (--init the stage-1 "
                    "run) -- or the baseline CNN (--model baseline), with the paper's recipe unless told otherwise. "
                    "The run folder gets run.json (settings, git revision, environment), config.json, metrics.csv "
                    "(and TensorBoard events when installed), checkpoints/last and checkpoints/best. Under torchrun "
                    "--nproc_per_node N the same command trains with DistributedDataParallel (NCCL on GPUs, gloo on "
                    "CPU); --batch-size is the global batch.")
    parser.add_argument("--data", help="training data: rafdb:PATH, ferplus:PATH, kdef:PATH, folder:PATH, PATH or "
                                       "synthetic:N (required unless --resume)")
    parser.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint, with its stored settings")
    parser.add_argument("--stage", choices=STAGES, default=defaults.stage, help="LLDif training stage (default 1)")
    parser.add_argument("--model", choices=MODELS, default=defaults.model, help="lldif (default) or baseline")
    parser.add_argument("--config", default=defaults.config, help="base (default), tiny or a JSON config file")
    parser.add_argument("--test-data", help="test data spec (default: the test split of --data)")
    parser.add_argument("--lowlight", choices=LOWLIGHT_CHOICES, default=defaults.lowlight,
                        help="darken every image on the fly with this preset (default paper); none: use the images "
                             "as they are (e.g. a folder made with `lldif make-lowlight`)")
    parser.add_argument("--landmarks", choices=LANDMARK_SOURCES, default=defaults.landmarks,
                        help="dataset (default): the data's own landmarks (landmarks.npz; synthetic faces: their exact "
                             "points); mtcnn, dlib68: found by that detector in each image as the model sees it "
                             "(darkened), cached")
    parser.add_argument("--landmark-cache", help="folder for the detected landmarks (default RUN_DIR/landmarks)")
    parser.add_argument("--init", help="run folder to initialise from (stage 1: the LA-CLIP run; stage 2: the "
                                       "stage-1 run), or a model folder such as `lldif convert`'s")
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer,
                        help="adam (default, the paper's) or sgd with momentum 0.9")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--betas", type=_float_pair, default=defaults.betas, help="Adam's betas, e.g. 0.9,0.999")
    parser.add_argument("--lr-gamma", type=float, default=defaults.lr_gamma, help="lr factor per epoch")
    parser.add_argument("--warmup-epochs", type=non_negative_int, default=defaults.warmup_epochs,
                        help="stage 2: epochs that train only PNET_S2 and the denoiser, on the prior loss")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=non_negative_int, default=defaults.workers, help="data loader processes")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=defaults.checkpoint_every,
                        help="also checkpoint every N steps within an epoch (0: at epoch ends only)")
    parser.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[],
                        metavar="FIELD=VALUE",
                        help="change a model config field, e.g. --set prior.steps=8 --set loss.prior_loss=l1 "
                             "(repeatable; values are JSON, else strings)")
    parser.add_argument("--backend", choices=("reference", "cpp", "cuda", "triton"), help="fused-op backend")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> None:
        if args.resume:
            settings = TrainSettings.from_dict(Run(args.out).settings)
        else:
            if not args.data:
                raise ValueError("--data is required for a new run")
            fields = {f.name for f in dataclasses.fields(TrainSettings)}
            values = {name: value for name, value in vars(args).items() if name in fields}
            settings = TrainSettings(**{**values, "overrides": dict(args.overrides)})
        run_folder = train(settings, args.out, resume=args.resume, device=args.device, progress=not args.quiet).path
        print(f"run folder: {run_folder}")

    parser.set_defaults(run=run)
