"""Run folders: everything one `lldif train` writes, and what `evaluate`, `sweep-steps` and `predict` read back.

    RUN_DIR/run.json                    format, lldif version, git revision, environment, command, settings
    RUN_DIR/config.json                 the model's configuration
    RUN_DIR/metrics.csv                 one row per epoch (TensorBoard events in RUN_DIR/events when installed)
    RUN_DIR/checkpoints/{last,best}/    model folders (config.json + model.safetensors); `last` also holds
                                        training_state.safetensors + training_state.json, from which --resume goes on
    RUN_DIR/evaluation/                 what `lldif evaluate` writes
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lldif

from .data.images import write_atomic

RUN_FORMAT = 1
RUN_FILE, METRICS_FILE = "run.json", "metrics.csv"
CHECKPOINTS = ("best", "last")


class RunError(ValueError):
    """A folder that is not a usable run folder; the message says why in one line."""


def git_revision() -> str | None:
    """The commit of the lldif source tree (with `+dirty` when it has changes), or None outside a git checkout."""
    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """What a result depends on besides the code: versions, device, threads."""
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if cuda else platform.processor(),
            "cpu_threads": torch.get_num_threads()}


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """The device a command runs on: `device` ("cpu", "cuda", "cuda:N"), checked to exist; default CUDA when
    available."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be cpu or cuda (or cuda:N), got {device!r}") from None
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda (or cuda:N), got {device!r}")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available")
    return chosen


def write_json(path: Path, values: dict[str, Any]) -> None:
    """Writes `values` as indented JSON, atomically."""
    text = json.dumps(values, indent=2, sort_keys=True).encode("utf-8")
    write_atomic(path, lambda file: file.write(text))


class Run:
    """A run folder: its record (`run.json`), settings, checkpoints and evaluation folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def record_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def evaluation_dir(self) -> Path:
        return self.path / "evaluation"

    def checkpoint(self, name: str) -> Path:
        if name not in CHECKPOINTS:
            raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {name!r}")
        return self.path / "checkpoints" / name

    def create(self, settings: dict[str, Any], model_config: dict[str, Any]) -> None:
        """Writes the run's record for a new run."""
        write_json(self.record_file, {
            "run_format": RUN_FORMAT, "lldif_version": lldif.__version__, "git_revision": git_revision(),
            "environment": environment(), "command": sys.argv, "settings": settings})
        write_json(self.path / "config.json", model_config)

    def record(self) -> dict[str, Any]:
        """`run.json`, checked to be a run folder this version of lldif can read."""
        if not self.path.is_dir():
            raise RunError(f"run folder {self.path} does not exist")
        if not self.record_file.is_file():
            raise RunError(f"{self.path} is not a run folder (it has no {RUN_FILE}; `lldif train --out` makes one)")
        try:
            record = json.loads(self.record_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise RunError(f"{self.record_file} cannot be read: {error}") from error
        version = record.get("run_format") if isinstance(record, dict) else None
        if version != RUN_FORMAT:
            raise RunError(f"{self.path} was written by lldif {record.get('lldif_version', '?')} in run format "
                           f"{version}; this lldif ({lldif.__version__}) reads run format {RUN_FORMAT}")
        return record

    @property
    def settings(self) -> dict[str, Any]:
        """The training settings the run was started with."""
        return self.record()["settings"]

    def load_model(self, checkpoint: str = "best", map_location: str | torch.device = "cpu") -> nn.Module:
        """The model of a checkpoint, in eval mode; `best` falls back to `last` for a run without evaluation."""
        from .models.pretrained import load_model_folder

        self.record()
        folder = self.checkpoint(checkpoint)
        if checkpoint == "best" and not folder.is_dir():
            folder = self.checkpoint("last")
        if not folder.is_dir():
            raise RunError(f"{self.path} has no checkpoint yet (training has not finished an epoch)")
        return load_model_folder(folder, map_location).eval()
