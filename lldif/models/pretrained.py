"""Model folders: `config.json` + `model.safetensors`, each written atomically, for every model of the project."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..data.images import write_atomic
from ..run import write_json

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# Where other projects' training scripts keep the weights inside a saved dict, first match wins: BasicSR's EMA and
# plain weights (DiffIR), then the usual `state_dict` / `model` wrappers (POSTER++, open_clip, timm).
CHECKPOINT_WRAPPERS = ("params_ema", "params", "state_dict", "model")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in another project's `.pth`: loaded with `weights_only=True` (a file that pickles anything
    but tensors and plain containers is refused), unwrapped from a training script's dict, `module.` (DataParallel)
    prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(f"path: {path} holds more than plain weights, refused (weights_only=True): "
                                     f"{error}") from error
    for key in CHECKPOINT_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"path: {path} does not hold a state dict (names to tensors)")
    return {key.removeprefix("module."): value for key, value in state.items()}


def save_model_folder(directory: str | os.PathLike, config: dict[str, Any], module: nn.Module,
                      metadata: dict[str, str] | None = None) -> None:
    """Writes `module`'s state dict and its JSON `config` into `directory`; the weights go first, so a folder whose
    config exists always has weights matching it."""
    directory = Path(directory)
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in module.state_dict().items()}
    payload = safetensors.torch.save(weights, metadata={"format": "pt", **(metadata or {})})
    write_atomic(directory / WEIGHTS_FILE, lambda file: file.write(payload))
    write_json(directory / CONFIG_FILE, config)


def read_model_folder(directory: str | os.PathLike, map_location: str | torch.device = "cpu"
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The (config, state dict) of a folder `save_model_folder` wrote."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"directory: {directory} has no {name} (not a saved model folder)")
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    return config, safetensors.torch.load_file(directory / WEIGHTS_FILE, device=str(map_location))


def load_model_folder(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Whichever model (LLDif or the baseline CNN) a folder holds, with its weights."""
    from .baseline import ARCHITECTURE, BaselineCNN
    from .lldif import LLDif

    config, _ = read_model_folder(directory, "cpu")
    kind = BaselineCNN if config.get("architecture") == ARCHITECTURE else LLDif
    return kind.from_pretrained(directory, map_location)
