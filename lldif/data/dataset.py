"""What every reader produces: labelled face records of one split, their pixels on demand, and the list of
records left out (with the reason), so bad data is reported before training instead of failing mid-epoch."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .face_layout import mean_shape
from .images import ImageReadError, read_rgb, write_atomic
from .labels import ADJECTIVES, EXPRESSIONS, LABEL_PROMPT, NUM_CLASSES
from .landmark_cache import LANDMARKS_FILE, load_landmarks

CAPTIONS_FILE = "captions.json"
SKIPPED_FILE = "skipped_images.csv"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class FaceRecord:
    """One labelled face: `key` names it uniquely within its dataset (the image path relative to the root
    for image files)."""

    key: str
    label: int
    path: Path | None = None


@dataclass(frozen=True)
class FaceSample:
    """A face ready for the loader: 8-bit RGB pixels, class index, landmarks (P, 2) in pixels, caption."""

    image: np.ndarray
    label: int
    landmarks: np.ndarray
    caption: str
    key: str


@dataclass(frozen=True)
class SkippedRecord:
    """A record a reader or the image check left out, and why."""

    key: str
    reason: str


def check_split(split: str) -> str:
    """Returns `split` if it names a split the readers know, else raises naming the argument."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def check_root(root: str | os.PathLike, what: str) -> Path:
    """The dataset root as a Path, or a clear error when it does not exist."""
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"root: {what} folder not found: {path}")
    return path


def default_caption(label: int) -> str:
    """The caption of a face that has none: its label prompt (DA-CLIP appends the label to the caption; with no
    captioner offline the label part is all there is)."""
    return LABEL_PROMPT.format(ADJECTIVES[label])


class FaceDataset(torch.utils.data.Dataset):
    """Labelled faces of one split. Subclasses list the records; pixels are read when a sample is asked for.

    Optional files at the dataset root, keyed by the record key: `landmarks.npz` (see `landmark_cache`) and
    `captions.json`. Faces without landmarks get the mean face shape, without a caption the label prompt.
    """

    name = "faces"

    def __init__(self, root: Path, split: str, records: list[FaceRecord], skipped: list[SkippedRecord]) -> None:
        self.root = root
        self.split = split
        self.records = records
        self.skipped = skipped
        if not records:
            raise ValueError(f"{self.name} {split} split under {root} has no usable images"
                             + (f" ({len(skipped)} skipped, first: {skipped[0].key}: {skipped[0].reason})"
                                if skipped else ""))
        self.landmarks = self._read_landmarks(root / LANDMARKS_FILE)
        self.captions = read_captions(root / CAPTIONS_FILE)

    @staticmethod
    def _read_landmarks(path: Path) -> dict[str, np.ndarray]:
        return load_landmarks(path).as_dict() if path.is_file() else {}

    def __len__(self) -> int:
        return len(self.records)

    def key(self, index: int) -> str:
        """The key of record `index`, without reading its image."""
        return self.records[index].key

    @property
    def identity(self) -> str:
        """A name for the dataset these records come from, which caches of per-image results are keyed by: the
        reader and a digest of the root's absolute path (record keys are unique within a root)."""
        digest = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:12]
        return f"{self.name}-{digest}"

    @property
    def labels(self) -> np.ndarray:
        """Class index of every record, in record order."""
        return np.array([record.label for record in self.records], dtype=np.int64)

    def class_counts(self) -> dict[str, int]:
        """Number of records per expression name."""
        counts = np.bincount(self.labels, minlength=NUM_CLASSES)
        return {name: int(count) for name, count in zip(EXPRESSIONS, counts, strict=True)}

    def read_image(self, record: FaceRecord) -> np.ndarray:
        """The record's pixels as (H, W, 3) uint8 RGB; raises ImageReadError when they cannot be used."""
        if record.path is None:
            raise NotImplementedError(f"{type(self).__name__} must read records that have no image file")
        return read_rgb(record.path)

    def __getitem__(self, index: int) -> FaceSample:
        record = self.records[index]
        image = self.read_image(record)
        landmarks = self.landmarks.get(record.key)
        if landmarks is None:
            landmarks = mean_shape(image.shape[1], image.shape[0])
        caption = self.captions.get(record.key) or default_caption(record.label)
        return FaceSample(image, record.label, landmarks, caption, record.key)

    def drop_unreadable(self, progress: bool = True) -> list[SkippedRecord]:
        """Reads every image once and removes those that cannot be used (corrupt, truncated, tiny, missing),
        adding them to `skipped`; returns the newly skipped records. Run before training."""
        kept, dropped = [], []
        for record in tqdm(self.records, desc=f"checking {self.name} {self.split}", disable=not progress,
                           unit="img", leave=False):
            try:
                self.read_image(record)
            except ImageReadError as error:
                dropped.append(SkippedRecord(record.key, error.reason))
            else:
                kept.append(record)
        if not kept:
            raise ValueError(f"{self.name} {self.split} split under {self.root}: none of the "
                             f"{len(self.records)} images can be read (first: {dropped[0].key}: {dropped[0].reason})")
        self.records = kept
        self.skipped.extend(dropped)
        return dropped

    def write_skipped(self, run_dir: str | os.PathLike) -> Path:
        """Writes the skipped records (key, reason) as CSV into the run folder, atomically; returns its path."""
        path = Path(run_dir) / f"{self.name}_{self.split}_{SKIPPED_FILE}"
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["key", "reason"])
        writer.writerows((item.key, item.reason) for item in self.skipped)
        write_atomic(path, lambda file: file.write(text.getvalue().encode("utf-8")))
        return path


def read_captions(path: Path) -> dict[str, str]:
    """The {image key: caption} map of a dataset's captions file; empty when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        captions = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a JSON file of captions ({error})") from None
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise ValueError(f"{path}: must map image paths to caption strings")
    return captions


def image_records(root: Path, labelled: Iterable[tuple[Path, int | str]],
                  ) -> tuple[list[FaceRecord], list[SkippedRecord]]:
    """Records of image files under `root` from (path, class index) pairs; a pair whose label is a string (why the
    file is left out) and a missing file become skipped records."""
    records, skipped = [], []
    for path, label in labelled:
        key = path.relative_to(root).as_posix()
        if isinstance(label, str):
            skipped.append(SkippedRecord(key, label))
        elif not path.is_file():
            skipped.append(SkippedRecord(key, "file not found"))
        else:
            records.append(FaceRecord(key, label, path))
    return records, skipped
