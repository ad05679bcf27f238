"""The landmark file a dataset folder may carry: points per image, keyed by the image's path relative to
the dataset root, and whether a detector found them (False: the mean-shape fallback was used)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import write_atomic

LANDMARKS_FILE = "landmarks.npz"


@dataclass(frozen=True)
class LandmarkTable:
    """Landmarks of many images: `points[i]` (P, 2) in pixels of image `paths[i]`; `found[i]` is False where
    the fallback shape stands in for a face the detector missed."""

    paths: tuple[str, ...]
    points: np.ndarray
    found: np.ndarray

    def __post_init__(self) -> None:
        count = len(self.paths)
        if self.points.ndim != 3 or self.points.shape[0] != count or self.points.shape[2] != 2:
            raise ValueError(f"points must have shape ({count}, P, 2), got {self.points.shape}")
        if self.found.shape != (count,):
            raise ValueError(f"found must have shape ({count},), got {self.found.shape}")

    def as_dict(self) -> dict[str, np.ndarray]:
        """Relative path → (P, 2) float32 points."""
        return dict(zip(self.paths, self.points, strict=True))


def save_landmarks(path: str | os.PathLike, table: LandmarkTable) -> None:
    """Writes the table atomically (a killed run leaves the previous file intact)."""
    buffer = io.BytesIO()
    np.savez(buffer, paths=np.array(table.paths, dtype=str), points=table.points.astype(np.float32),
             found=table.found.astype(bool))
    write_atomic(path, lambda file: file.write(buffer.getvalue()))


def load_landmarks(path: str | os.PathLike) -> LandmarkTable:
    """Reads a table written by `save_landmarks`; a malformed file raises ValueError naming it."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            return LandmarkTable(tuple(str(p) for p in data["paths"]), data["points"].astype(np.float32),
                                 data["found"].astype(bool))
    except FileNotFoundError:
        raise
    except (KeyError, ValueError, OSError) as error:
        raise ValueError(f"{path}: not a landmark file written by lldif ({error})") from None
