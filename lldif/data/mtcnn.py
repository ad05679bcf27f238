"""MTCNN face detection with five landmarks: the P-Net → R-Net → O-Net cascade of Zhang et al. (2016) in
plain torch, running the pretrained weights that ship in the facenet-pytorch wheel.

Boxes are (x0, y0, x1, y1) and points (x, y), both in continuous pixel coordinates of the input image
(pixel (i, j) covers [i, i+1) x [j, j+1)); the five points follow `face_layout`'s order.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .images import check_rgb

WEIGHTS_DISTRIBUTION = "facenet-pytorch"
WEIGHTS_INSTALL_HINT = "pip install --no-deps facenet-pytorch==2.6.0"
WEIGHT_FILES = {"pnet": "pnet.pt", "rnet": "rnet.pt", "onet": "onet.pt"}

PNET_STRIDE = 2
PNET_CELL = 12
RNET_INPUT = 24
ONET_INPUT = 48


class MTCNNWeightsError(FileNotFoundError):
    """The pretrained MTCNN weights cannot be found; the message says how to get them."""


def find_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding pnet.pt, rnet.pt and onet.pt: `weights_dir` if given, else the facenet-pytorch
    wheel's data folder (located without importing the package, which needs torchvision)."""
    if weights_dir is None:
        try:
            distribution = importlib.metadata.distribution(WEIGHTS_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            raise MTCNNWeightsError(
                f"MTCNN weights not found: the {WEIGHTS_DISTRIBUTION} package that ships them is not installed. "
                f"Install it with `{WEIGHTS_INSTALL_HINT}` (--no-deps: its own pins are for old torch) "
                "or pass weights_dir=<folder with pnet.pt, rnet.pt, onet.pt>"
            ) from None
        folder = Path(str(distribution.locate_file("facenet_pytorch/data")))
        source = f"the installed {WEIGHTS_DISTRIBUTION} package ({folder})"
    else:
        folder = Path(weights_dir)
        source = f"weights_dir {folder}"
    missing = [name for name in WEIGHT_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise MTCNNWeightsError(
            f"MTCNN weights not found: {source} lacks {', '.join(missing)}. Get them with "
            f"`{WEIGHTS_INSTALL_HINT}` or pass weights_dir=<folder with pnet.pt, rnet.pt, onet.pt>"
        )
    return folder


def _flatten_caffe_order(features: torch.Tensor) -> torch.Tensor:
    # The original MTCNN ran on transposed images with channels last; the converted conv kernels see upright
    # images, but the dense weights still expect features flattened width-major, channels last.
    return features.permute(0, 3, 2, 1).flatten(1)


class PNet(nn.Module):
    """Proposal net: fully convolutional, one 12x12 window per output cell at stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) normalised images → face probability (N, h, w) and box offsets (N, 4, h, w)."""
        x = self.pool1(self.prelu1(self.conv1(images)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x).softmax(1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refinement net: scores and box offsets for 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 24, 24) normalised crops → face probability (N,) and box offsets (N, 4)."""
        x = self.pool1(self.prelu1(self.conv1(crops)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten_caffe_order(self.prelu3(self.conv3(x)))))
        return self.dense5_1(x).softmax(1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net: scores, box offsets and five landmarks for 48x48 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 3, 48, 48) normalised crops → face probability (N,), box offsets (N, 4) and landmarks (N, 5, 2)
        as fractions of the crop's width and height."""
        x = self.pool1(self.prelu1(self.conv1(crops)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_flatten_caffe_order(self.prelu4(self.conv4(x)))))
        landmarks = self.dense6_3(x).view(-1, 2, 5).transpose(1, 2)  # all five x first, then all five y
        return self.dense6_1(x).softmax(1)[:, 1], self.dense6_2(x), landmarks


@dataclass(frozen=True)
class FaceDetections:
    """Faces found in one image, most confident first: boxes (K, 4), scores (K,), points (K, 5, 2), float32."""

    boxes: np.ndarray
    scores: np.ndarray
    points: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def none(cls) -> FaceDetections:
        """No faces."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))


def non_maximum_suppression(boxes: np.ndarray, scores: np.ndarray, threshold: float,
                            overlap: str = "union") -> np.ndarray:
    """Indices of the boxes kept by greedy NMS, best score first: a box is dropped when its overlap with a
    kept one exceeds `threshold`; overlap is intersection over union, or over the smaller box ("min")."""
    if overlap not in ("union", "min"):
        raise ValueError(f"overlap must be 'union' or 'min', got {overlap!r}")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        width = np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0])
        height = np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1])
        intersection = np.clip(width, 0, None) * np.clip(height, 0, None)
        if overlap == "union":
            denominator = areas[best] + areas[rest] - intersection
        else:
            denominator = np.minimum(areas[best], areas[rest])
        order = rest[intersection <= threshold * np.maximum(denominator, 1e-12)]
    return np.array(keep, dtype=np.int64)


def apply_box_offsets(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Boxes moved by the nets' regression output: each edge shifts by its offset times the box's size."""
    sizes = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
    return boxes + offsets * sizes


def squared(boxes: np.ndarray) -> np.ndarray:
    """The square boxes with the same centres and the longer side, as the next net expects square crops."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(1, keepdims=True) / 2
    return np.concatenate([centres - half, centres + half], axis=1)


def pyramid_scales(height: int, width: int, min_face_size: float, scale_factor: float) -> list[float]:
    """Scales at which P-Net's 12-pixel window sees faces from `min_face_size` up to the whole image."""
    scale = PNET_CELL / min_face_size
    scales = []
    while min(height, width) * scale >= PNET_CELL:
        scales.append(scale)
        scale *= scale_factor
    return scales


class _MipPyramid:
    """The image halved repeatedly (means of 2x2 pixels), so a crop is resampled from the level at most twice
    its size: bilinear sampling then averages every pixel it skips over instead of aliasing."""

    def __init__(self, image: torch.Tensor) -> None:
        self.levels = [image]
        while min(self.levels[-1].shape[-2:]) >= 2 * RNET_INPUT:
            self.levels.append(F.avg_pool2d(self.levels[-1], 2))

    def crops(self, boxes: np.ndarray, size: int) -> torch.Tensor:
        """(K, 3, size, size) resampled box contents; outside the image reads as black, as in training."""
        device = self.levels[0].device
        sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        level_of_box = np.clip(np.floor(np.log2(np.maximum(sides / size, 1.0))), 0, len(self.levels) - 1)
        steps = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size
        out = torch.empty(len(boxes), 3, size, size, device=device)
        for level in np.unique(level_of_box).astype(int):
            chosen = np.flatnonzero(level_of_box == level)
            image = self.levels[level]
            height, width = image.shape[-2:]
            level_boxes = torch.as_tensor(boxes[chosen], dtype=torch.float32, device=device) / 2**level
            xs = level_boxes[:, 0:1] + steps * (level_boxes[:, 2:3] - level_boxes[:, 0:1])
            ys = level_boxes[:, 1:2] + steps * (level_boxes[:, 3:4] - level_boxes[:, 1:2])
            # grid_sample's normalised coordinates (align_corners=False) map [-1, 1] onto [0, width].
            grid = torch.stack(
                [(2 * xs / width - 1)[:, None, :].expand(-1, size, -1),
                 (2 * ys / height - 1)[:, :, None].expand(-1, -1, size)], dim=-1,
            )
            # All crops are stacked into one tall grid so the image is sampled once, without copies per box.
            sampled = F.grid_sample(image, grid.reshape(1, -1, size, 2), mode="bilinear", padding_mode="zeros",
                                    align_corners=False)
            out[torch.as_tensor(chosen, device=device)] = sampled.view(3, len(chosen), size, size).transpose(0, 1)
        return out


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - 127.5) / 128.0


class MTCNN(nn.Module):
    """The three-stage MTCNN face detector with five landmarks, on the facenet-pytorch wheel's weights."""

    def __init__(self, weights_dir: str | os.PathLike | None = None, min_face_size: float = 20.0,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7), scale_factor: float = 0.709,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        if min_face_size <= 0:
            raise ValueError(f"min_face_size must be positive, got {min_face_size}")
        if not 0 < scale_factor < 1:
            raise ValueError(f"scale_factor must be in (0, 1), got {scale_factor}")
        if len(thresholds) != 3 or not all(0 <= t <= 1 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities, got {thresholds}")
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        folder = find_weights_dir(weights_dir)
        for name, file_name in WEIGHT_FILES.items():
            state = torch.load(folder / file_name, map_location="cpu", weights_only=True)
            getattr(self, name).load_state_dict(state, strict=True)
        self.to(device).eval()

    @property
    def device(self) -> torch.device:
        """Where the nets run."""
        return self.pnet.conv1.weight.device

    @torch.inference_mode()
    def detect(self, rgb: np.ndarray, min_face_size: float | None = None) -> FaceDetections:
        """All faces in an (H, W, 3) uint8 RGB image, with their boxes, scores and five landmarks."""
        check_rgb(rgb)
        image = torch.tensor(rgb, dtype=torch.float32, device=self.device).permute(2, 0, 1)[None]
        boxes = self._propose(image, self.min_face_size if min_face_size is None else float(min_face_size))
        pyramid = _MipPyramid(image)
        boxes = self._refine(pyramid, boxes)
        return self._output(pyramid, boxes)

    def _propose(self, image: torch.Tensor, min_face_size: float) -> np.ndarray:
        height, width = image.shape[-2:]
        proposals = []
        for scale in pyramid_scales(height, width, min_face_size, self.scale_factor):
            scaled_height, scaled_width = math.ceil(height * scale), math.ceil(width * scale)
            scaled = F.interpolate(image, size=(scaled_height, scaled_width), mode="bilinear", antialias=True,
                                   align_corners=False)
            probability, offsets = self.pnet(_normalise(scaled))
            rows, cols = torch.nonzero(probability[0] > self.thresholds[0], as_tuple=True)
            if rows.numel() == 0:
                continue
            cells = torch.stack([cols, rows], 1).float() * PNET_STRIDE
            to_image = torch.tensor([width / scaled_width, height / scaled_height], device=image.device)
            boxes = torch.cat([cells * to_image, (cells + PNET_CELL) * to_image], 1)
            candidates = np.concatenate([boxes.cpu().numpy(), probability[0, rows, cols].cpu().numpy()[:, None],
                                         offsets[0, :, rows, cols].T.cpu().numpy()], axis=1)
            proposals.append(candidates[non_maximum_suppression(candidates[:, :4], candidates[:, 4], 0.5)])
        if not proposals:
            return np.zeros((0, 4), dtype=np.float32)
        candidates = np.concatenate(proposals)
        candidates = candidates[non_maximum_suppression(candidates[:, :4], candidates[:, 4], 0.7)]
        return squared(apply_box_offsets(candidates[:, :4], candidates[:, 5:9]))

    def _refine(self, pyramid: _MipPyramid, boxes: np.ndarray) -> np.ndarray:
        if len(boxes) == 0:
            return boxes
        probability, offsets = self.rnet(_normalise(pyramid.crops(boxes, RNET_INPUT)))
        passed = (probability > self.thresholds[1]).cpu().numpy()
        boxes, scores, offsets = boxes[passed], probability.cpu().numpy()[passed], offsets.cpu().numpy()[passed]
        kept = non_maximum_suppression(boxes, scores, 0.7)
        return squared(apply_box_offsets(boxes[kept], offsets[kept]))

    def _output(self, pyramid: _MipPyramid, boxes: np.ndarray) -> FaceDetections:
        if len(boxes) == 0:
            return FaceDetections.none()
        crops = _normalise(pyramid.crops(boxes, ONET_INPUT))
        probability, offsets, landmarks = (output.cpu().numpy() for output in self.onet(crops))
        passed = probability > self.thresholds[2]
        boxes, scores = boxes[passed], probability[passed]
        points = boxes[:, None, :2] + landmarks[passed] * (boxes[:, None, 2:] - boxes[:, None, :2])
        boxes = apply_box_offsets(boxes, offsets[passed])
        kept = non_maximum_suppression(boxes, scores, 0.7, overlap="min")
        return FaceDetections(boxes[kept].astype(np.float32), scores[kept].astype(np.float32),
                              points[kept].astype(np.float32))
