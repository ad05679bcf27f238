"""Batches for training and evaluation: `(image, label, landmarks, caption_embedding)` with POSTER++'s augmentations,
worker processes, and an order and augmentation that depend only on the seed and the epoch."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image

from .dataset import FaceSample, SkippedRecord
from .face_layout import flip_landmarks
from .landmarks import DETECTOR_KINDS, DetectedLandmarks, landmark_file_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FaceSource(Protocol):
    """Anything the loader can draw faces from: every reader, and the synthetic set."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> FaceSample: ...


class FaceBatch(NamedTuple):
    """One batch. `image` is (B, 3, S, S) ImageNet-normalised, `landmarks` (B, P, 2) in pixels of those S x S
    images, `caption_embedding` (B, D) from a frozen text encoder, or None when the embedder is trainable (then
    the training step embeds `caption` itself)."""

    image: torch.Tensor
    label: torch.Tensor
    landmarks: torch.Tensor
    caption_embedding: torch.Tensor | None
    caption: list[str]
    key: list[str]


@dataclass(frozen=True)
class Augmentation:
    """POSTER++'s training augmentation: a horizontal flip (landmarks mirrored and renumbered too) and random
    erasing of a rectangle covering `erasing_scale` of the image with aspect ratio in `erasing_ratio`, filled with
    zeros after normalisation. POSTER++ uses p 0.5 and scale (0.02, 0.1) on RAF-DB, p 1 and (0.05, 0.05) elsewhere."""

    flip_p: float = 0.5
    erasing_p: float = 0.5
    erasing_scale: tuple[float, float] = (0.02, 0.1)
    erasing_ratio: tuple[float, float] = (0.3, 3.3)

    def __post_init__(self) -> None:
        for name in ("flip_p", "erasing_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        low, high = self.erasing_scale
        if not 0.0 < low <= high < 1.0:
            raise ValueError(f"erasing_scale must satisfy 0 < low <= high < 1, got {self.erasing_scale}")
        if not 0.0 < self.erasing_ratio[0] <= self.erasing_ratio[1]:
            raise ValueError(f"erasing_ratio must satisfy 0 < low <= high, got {self.erasing_ratio}")

    def erase(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Zeroes one random rectangle of a (3, H, W) image with probability `erasing_p`."""
        if rng.random() >= self.erasing_p:
            return image
        height, width = image.shape[1:]
        log_ratio = np.log(self.erasing_ratio)
        for _ in range(10):  # a rectangle that does not fit is redrawn, as in torchvision's RandomErasing
            area = height * width * rng.uniform(*self.erasing_scale)
            ratio = np.exp(rng.uniform(*log_ratio))
            h, w = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
            if 0 < h < height and 0 < w < width:
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                image = image.clone()
                image[:, top:top + h, left:left + w] = 0
                return image
        return image


class _EpochView(torch.utils.data.Dataset):
    """The samples of one epoch as tensors; sample i's randomness comes from (seed, epoch, i), so the result does
    not depend on the order, the batch size or the worker that produces it."""

    def __init__(self, source: FaceSource, image_size: int, seed: int, epoch: int, augmentation: Augmentation | None,
                 lowlight: Callable[..., np.ndarray] | None) -> None:
        self.source, self.image_size, self.seed, self.epoch = source, image_size, seed, epoch
        self.augmentation, self.lowlight = augmentation, lowlight
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, str, str]:
        sample = self.source[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = sample.image if self.lowlight is None else self.lowlight(sample.image, key=sample.key)
        height, width = image.shape[:2]
        size = self.image_size
        if (height, width) != (size, size):
            image = np.array(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        landmarks = sample.landmarks * np.array([size / width, size / height], dtype=np.float32)
        if self.augmentation is not None and rng.random() < self.augmentation.flip_p:
            image = image[:, ::-1]
            landmarks = flip_landmarks(landmarks, size)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
        tensor = (tensor - self.mean) / self.std
        if self.augmentation is not None:
            tensor = self.augmentation.erase(tensor, rng)
        return tensor, sample.label, torch.from_numpy(np.ascontiguousarray(landmarks, np.float32)), \
            sample.caption, sample.key


def _collate(items: list[tuple[torch.Tensor, int, torch.Tensor, str, str]]) -> FaceBatch:
    images, labels, landmarks, captions, keys = zip(*items, strict=True)
    return FaceBatch(torch.stack(images), torch.tensor(labels, dtype=torch.int64), torch.stack(landmarks), None,
                     list(captions), list(keys))


class BatchLoader:
    """An epoch's batches: a DataLoader whose batches get their caption embeddings in the main process (so a
    text encoder is loaded once, not once per worker)."""

    def __init__(self, loader: torch.utils.data.DataLoader, embed: Callable[[Sequence[str]], torch.Tensor] | None):
        self.loader, self.embed = loader, embed

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[FaceBatch]:
        for batch in self.loader:
            yield batch if self.embed is None else batch._replace(caption_embedding=self.embed(batch.caption))


class FaceDataModule:
    """Train and test batches of two face sources.

    `lowlight` (e.g. `lowlight.LowLight(seed=0)`) darkens every image on the fly, given the record key, for
    sources that are normal-light; `text_embedder` maps captions to embeddings: a frozen one (not an nn.Module
    with trainable parameters) fills `caption_embedding`, a trainable one is left to the training step. Before
    any batch, unreadable images are dropped from sources that can check themselves, and the list of everything
    left out is written to `run_dir`. With `detect_landmarks` ("mtcnn" or "dlib68"), the landmarks are found by
    that detector in the images as the model sees them (darkened), cached in landmark files in the folder
    `landmark_cache` (see `landmarks.DetectedLandmarks`), instead of taken from the sources.
    """

    def __init__(self, train: FaceSource, test: FaceSource, *, image_size: int = 112, batch_size: int = 64,
                 workers: int = 0, seed: int = 0, augmentation: Augmentation | None = None,
                 lowlight: Callable[..., np.ndarray] | None = None,
                 text_embedder: Callable[[Sequence[str]], torch.Tensor] | None = None,
                 run_dir: str | os.PathLike | None = None, check_images: bool = True, progress: bool = True,
                 detect_landmarks: str | None = None, landmark_cache: str | os.PathLike | None = None) -> None:
        limits = (("image_size", image_size, 16), ("batch_size", batch_size, 1), ("workers", workers, 0))
        for name, value, low in limits:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.train, self.test = train, test
        self.image_size, self.batch_size, self.workers, self.seed = image_size, batch_size, workers, seed
        self.augmentation = Augmentation() if augmentation is None else augmentation
        self.lowlight = lowlight
        trainable = isinstance(text_embedder, torch.nn.Module) and any(
            p.requires_grad for p in text_embedder.parameters())
        self.embed = None if trainable else text_embedder
        self.skipped: dict[str, list[SkippedRecord]] = {}
        self.skip_lists: list[Path] = []
        for split, source in (("train", train), ("test", test)):
            if check_images and hasattr(source, "drop_unreadable"):
                source.drop_unreadable(progress=progress)
            self.skipped[split] = list(getattr(source, "skipped", []))
            if run_dir is not None and hasattr(source, "write_skipped"):
                self.skip_lists.append(source.write_skipped(run_dir))
        if detect_landmarks is not None:
            if detect_landmarks not in DETECTOR_KINDS:
                raise ValueError(f"detect_landmarks must be one of {', '.join(DETECTOR_KINDS)} or None, got "
                                 f"{detect_landmarks!r}")
            if landmark_cache is None:
                raise ValueError("landmark_cache: a folder for the detected landmarks is needed with detect_landmarks")
        self.detect_landmarks, self.landmark_cache = detect_landmarks, landmark_cache
        self.progress = progress
        self.detected: dict[str, DetectedLandmarks] = {}

    def _faces(self, split: str) -> FaceSource:
        """The split's source; with `detect_landmarks`, wrapped to give the detector's landmarks (detected at the
        first use of the split)."""
        source = self.train if split == "train" else self.test
        if self.detect_landmarks is None:
            return source
        if split not in self.detected:
            file = Path(self.landmark_cache) / landmark_file_name(source, self.lowlight, self.detect_landmarks)
            self.detected[split] = DetectedLandmarks(source, self.detect_landmarks, file, self.lowlight,
                                                     self.progress)
        return self.detected[split]

    def summary(self) -> str:
        """One line: faces per split, how many were left out, and where the lists of them are; with detected
        landmarks (once a split has been used), in how many faces the detector found them."""
        counts = "; ".join(f"{split} {len(source)} faces, {len(self.skipped[split])} left out"
                           + (f", landmarks found in {self.detected[split].found}" if split in self.detected else "")
                           for split, source in (("train", self.train), ("test", self.test)))
        lists = f" (listed in {', '.join(map(str, self.skip_lists))})" if self.skip_lists else ""
        return f"data: {counts}{lists}"

    def _loader(self, source: FaceSource, epoch: int, batches: list[list[int]], train: bool) -> BatchLoader:
        view = _EpochView(source, self.image_size, self.seed, epoch, self.augmentation if train else None,
                          self.lowlight)
        # The loader's own generator: creating an iterator would otherwise draw from the global one, and a run
        # resumed mid-epoch (which creates one more iterator) would then draw differently from an uninterrupted one.
        loader = torch.utils.data.DataLoader(view, batch_sampler=batches, num_workers=self.workers,
                                             collate_fn=_collate, generator=torch.Generator().manual_seed(self.seed))
        return BatchLoader(loader, self.embed)

    def epoch_order(self, epoch: int) -> list[int]:
        """The training order of `epoch`: a permutation that depends only on the seed and the epoch."""
        order_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
        return torch.randperm(len(self.train), generator=torch.Generator().manual_seed(order_seed)).tolist()

    def train_batches(self) -> int:
        """Full batches per epoch (the last, incomplete one is dropped so every step sees `batch_size` faces)."""
        return len(self.train) // self.batch_size

    def train_dataloader(self, epoch: int = 0, *, start_batch: int = 0, rank: int = 0,
                         world_size: int = 1) -> BatchLoader:
        """The training batches of `epoch` from batch `start_batch` on: shuffled and augmented, identical for the
        same seed and epoch. With `world_size` processes, each batch is split into equal consecutive shares and
        this process (`rank`) gets its share, so N processes together see the batches of one."""
        _check_shards(self.batch_size, rank, world_size)
        share = self.batch_size // world_size
        order = self.epoch_order(epoch)
        batches = [order[b * self.batch_size + rank * share:b * self.batch_size + (rank + 1) * share]
                   for b in range(start_batch, self.train_batches())]
        return self._loader(self._faces("train"), epoch, batches, train=True)

    def test_dataloader(self, *, rank: int = 0, world_size: int = 1) -> BatchLoader:
        """The test batches in dataset order, without augmentation; with `world_size` processes, this process gets
        every `world_size`-th face from `rank` on."""
        _check_shards(world_size, rank, world_size)
        indices = list(range(rank, len(self.test), world_size))
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        return self._loader(self._faces("test"), 0, batches, train=False)


def _check_shards(batch_size: int, rank: int, world_size: int) -> None:
    """Raises ValueError unless `rank` is one of `world_size` processes that can share batches of `batch_size`."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank}, "
                         f"world_size {world_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world_size}")


def open_dataset(spec: str, split: str, **options) -> FaceSource:
    """A face source from a data spec: `KIND:PATH` with KIND one of `rafdb`, `ferplus`, `kdef`, `folder`, a bare
    folder path, or `synthetic:N` for N synthetic faces of the split (options go to the reader)."""
    from .ferplus import FERPlus
    from .folder import ImageFolder
    from .kdef import KDEF
    from .rafdb import RAFDB
    from .synthetic import SyntheticFaceDataset

    readers = {"rafdb": RAFDB, "ferplus": FERPlus, "kdef": KDEF, "folder": ImageFolder}
    kind, _, path = spec.partition(":")
    if kind == "synthetic":
        if not path.isdigit() or int(path) < 1:
            raise ValueError(f"data spec {spec!r}: write synthetic:N with N the number of faces, e.g. synthetic:700")
        return SyntheticFaceDataset(int(path), split, **options)
    if not path:
        kind, path = "folder", spec
    if kind not in readers:
        raise ValueError(f"data spec {spec!r}: unknown kind {kind!r}; use one of {', '.join(readers)} as KIND:PATH, "
                         "or synthetic:N")
    return readers[kind](Path(path), split, **options)
