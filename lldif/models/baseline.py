"""The comparison model: a ResNet-18-style CNN (the backbone most of LLDif's competitors use), trained with the
same recipe and data as LLDif and evaluated through the same interface (`forward`, `predict`, `features`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import BasicBlock
from .pretrained import read_model_folder, save_model_folder

ARCHITECTURE = "resnet18-baseline"


@dataclass
class BaselineConfig:
    """ResNet-18's layout, [2, 2, 2, 2] basic blocks at `widths`; `stem_stride` 2 without max pooling suits small
    faces (64-112 px), where ImageNet's stride-4 stem would leave too little resolution."""

    image_size: int = 112
    num_classes: int = 7
    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    stem_stride: int = 2

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.blocks) or min(self.widths) < 1 or min(self.blocks) < 1:
            raise ValueError(f"widths and blocks must be equally long positive ints, got {self.widths}, {self.blocks}")

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": ARCHITECTURE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BaselineConfig:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k != "architecture"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"config: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**values)


def baseline_tiny(image_size: int = 64) -> BaselineConfig:
    """Half ResNet-18's widths, for the CPU demo."""
    return BaselineConfig(image_size=image_size, widths=(32, 64, 128, 256))


class BaselineCNN(nn.Module):
    """ResNet-18-style classifier of ImageNet-normalised (B, 3, S, S) images; landmarks are accepted and ignored."""

    landmark_points: int | None = None  # it reads no landmarks (see LLDif.landmark_points)

    def __init__(self, config: BaselineConfig | None = None) -> None:
        super().__init__()
        self.config = config = BaselineConfig() if config is None else config
        first = config.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(3, first, 3, config.stem_stride, 1, bias=False), nn.BatchNorm2d(first),
                                  nn.ReLU(inplace=True))
        stages, channels = [], first
        for index, (width, blocks) in enumerate(zip(config.widths, config.blocks, strict=True)):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(channels, width, stride),
                                        *(BasicBlock(width, width) for _ in range(blocks - 1))))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, config.num_classes)

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be (B, 3, {size}, {size}) (config.image_size = {size}), got {shape}")

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor | None = None, *,
                features: bool = False) -> torch.Tensor:
        """Logits (B, num_classes), or with `features` the pooled features (B, widths[-1]) before the classifier."""
        self._check_images(images)
        pooled = self.stages(self.stem(images)).mean(dim=(2, 3))
        return pooled if features else self.head(pooled)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of pooled features (what `forward(..., features=True)` returns)."""
        return self.head(features)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities (B, num_classes), without gradient."""
        return self.forward(images).softmax(dim=-1)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy of a labelled batch."""
        return F.cross_entropy(self.forward(images), labels, label_smoothing=label_smoothing)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes `config.json` and `model.safetensors` into `directory`, each atomically."""
        save_model_folder(directory, self.config.to_dict(), self)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> BaselineCNN:
        """The model `save_pretrained` wrote into `directory`."""
        config, weights = read_model_folder(directory, map_location)
        if config.get("architecture") != ARCHITECTURE:
            raise ValueError(f"directory: {directory} holds no {ARCHITECTURE} model")
        model = cls(BaselineConfig.from_dict(config))
        model.load_state_dict(weights)
        return model.to(map_location)
