"""FERPlus: FER2013's 48x48 faces with the FERPlus crowd votes, from either layout users have.

- `fer2013.csv` (emotion, pixels, Usage) beside `fer2013new.csv` (Usage, Image name, then votes for neutral,
  happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF), row for row;
- or the folders FERPlus's own script writes: `FER2013Train/`, `FER2013Valid/`, `FER2013Test/`, each with PNGs and
  a `label.csv` of (image name, face box, the same ten votes). This layout is what `lldif make-lowlight` can
  darken, since it converts image files, not pixel tables.

Train is FER2013's Training rows (28,709); test is PublicTest + PrivateTest (7,178). Each face takes the majority
of its votes; faces whose majority is contempt, unknown or not-a-face, or whose top two classes tie, are left out
and listed with the reason.
"""

from __future__ import annotations

import csv
import os
from itertools import zip_longest
from pathlib import Path

import numpy as np

from .dataset import FaceDataset, FaceRecord, SkippedRecord, check_root, check_split, image_records
from .labels import label_index

VOTE_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF")
USAGES = {"train": ("Training",), "test": ("PublicTest", "PrivateTest")}
FOLDERS = {"train": ("FER2013Train",), "test": ("FER2013Valid", "FER2013Test")}
PIXELS_FILE, LABELS_FILE = "fer2013.csv", "fer2013new.csv"
SIDE = 48


def majority_label(votes: list[int]) -> int | str:
    """The class index the votes elect, or why the face has none (a tie or a non-basic majority)."""
    counts = np.asarray(votes)
    order = np.argsort(-counts, kind="stable")
    if counts[order[0]] == 0:
        return "no votes"
    if counts[order[0]] == counts[order[1]]:
        return f"tied votes ({VOTE_COLUMNS[order[0]]} / {VOTE_COLUMNS[order[1]]})"
    winner = VOTE_COLUMNS[order[0]]
    if winner in ("contempt", "unknown", "NF"):
        return f"majority vote is {winner}"
    return label_index(winner)


def _votes(fields: list[str], where: str) -> list[int]:
    if len(fields) != len(VOTE_COLUMNS) or not all(field.strip().isdigit() for field in fields):
        raise ValueError(f"{where}: expected {len(VOTE_COLUMNS)} vote counts ({', '.join(VOTE_COLUMNS)}), "
                         f"got {fields}")
    return [int(field) for field in fields]


class FERPlus(FaceDataset):
    """FERPlus in either layout (see the module docstring); grey faces are returned as RGB."""

    name = "ferplus"

    def __init__(self, root: str | os.PathLike, split: str = "train") -> None:
        root = check_root(root, "FERPlus")
        check_split(split)
        self._pixels: dict[str, np.ndarray] = {}
        if (root / LABELS_FILE).is_file():
            records, skipped = self._from_tables(root, split)
        elif any((root / folder / "label.csv").is_file() for folder in FOLDERS[split]):
            records, skipped = self._from_folders(root, split)
        else:
            raise FileNotFoundError(f"root: no FERPlus labels under {root}: expected {LABELS_FILE} (with "
                                    f"{PIXELS_FILE}) or {'/label.csv, '.join(FOLDERS[split])}/label.csv")
        super().__init__(root, split, records, skipped)

    def _from_tables(self, root: Path, split: str) -> tuple[list[FaceRecord], list[SkippedRecord]]:
        pixels_file = root / PIXELS_FILE
        if not pixels_file.is_file():
            raise FileNotFoundError(f"root: {LABELS_FILE} found but the FER2013 pixels {pixels_file} are missing")
        with open(root / LABELS_FILE, newline="", encoding="utf-8") as labels_csv, \
                open(pixels_file, newline="", encoding="utf-8") as pixels_csv:
            label_rows, pixel_rows = csv.reader(labels_csv), csv.DictReader(pixels_csv)
            header = next(label_rows, None)
            if header is None or [h.strip() for h in header[2:]] != list(VOTE_COLUMNS):
                raise ValueError(f"{root / LABELS_FILE}: header must be Usage, Image name, "
                                 f"{', '.join(VOTE_COLUMNS)}; got {header}")
            if pixel_rows.fieldnames is None or not {"pixels", "Usage"} <= set(pixel_rows.fieldnames):
                raise ValueError(f"{pixels_file}: header must name the columns emotion, pixels, Usage; "
                                 f"got {pixel_rows.fieldnames}")
            records, skipped = [], []
            for row, (label_row, pixel_row) in enumerate(zip_longest(label_rows, pixel_rows)):
                if label_row is None or pixel_row is None:
                    raise ValueError(f"root: {LABELS_FILE} and {PIXELS_FILE} must have one row per face each; "
                                     f"one of them ends at row {row + 1}")
                if pixel_row["Usage"] not in USAGES[split]:
                    continue
                where = f"{root / LABELS_FILE}:{row + 2}"
                label = majority_label(_votes(label_row[2:], where))
                key = label_row[1].strip() or f"fer2013_row{row:05d}"
                values = np.array(pixel_row["pixels"].split(), dtype=np.int64)
                if isinstance(label, str):
                    skipped.append(SkippedRecord(key, label))
                elif values.size != SIDE * SIDE or values.min(initial=0) < 0 or values.max(initial=0) > 255:
                    skipped.append(SkippedRecord(key, f"pixel row {row + 2} is not {SIDE}x{SIDE} values in 0-255"))
                else:
                    self._pixels[key] = values.astype(np.uint8).reshape(SIDE, SIDE)
                    records.append(FaceRecord(key, label))
        return records, skipped

    @staticmethod
    def _from_folders(root: Path, split: str) -> tuple[list[FaceRecord], list[SkippedRecord]]:
        labelled = []
        for folder in FOLDERS[split]:
            label_file = root / folder / "label.csv"
            if not label_file.is_file():
                continue
            with open(label_file, newline="", encoding="utf-8") as file:
                for number, fields in enumerate(csv.reader(file), 1):
                    if not fields:
                        continue
                    if len(fields) != 2 + len(VOTE_COLUMNS):
                        raise ValueError(f"{label_file}:{number}: expected image name, face box and "
                                         f"{len(VOTE_COLUMNS)} vote counts, got {len(fields)} fields")
                    votes = _votes(fields[2:], f"{label_file}:{number}")
                    labelled.append((root / folder / fields[0], majority_label(votes)))
        return image_records(root, labelled)

    def read_image(self, record: FaceRecord) -> np.ndarray:
        if record.path is not None:
            return super().read_image(record)
        return np.repeat(self._pixels[record.key][:, :, None], 3, axis=2)
