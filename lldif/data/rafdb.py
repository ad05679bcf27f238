"""RAF-DB basic emotions: `EmoLabel/list_patition_label.txt` (sic) and `Image/aligned/` (or `Image/original/`)."""

from __future__ import annotations

import os
from pathlib import Path

from .dataset import FaceDataset, check_root, check_split, image_records

LABEL_FILE = "EmoLabel/list_patition_label.txt"


class RAFDB(FaceDataset):
    """RAF-DB's basic-emotion set (train 12,271 / test 3,068 images). Its label file counts 1..7 in the
    project's class order, so label k is class k - 1; the split is the file-name prefix (`train_`, `test_`)."""

    name = "rafdb"

    def __init__(self, root: str | os.PathLike, split: str = "train", aligned: bool = True) -> None:
        root = check_root(root, "RAF-DB")
        check_split(split)
        label_file = root / LABEL_FILE
        if not label_file.is_file():
            raise FileNotFoundError(f"root: RAF-DB label file not found: {label_file}")
        image_dir = root / "Image" / ("aligned" if aligned else "original")
        labelled = []
        for name, label in read_partition_labels(label_file):
            if name.split("_", 1)[0] != split:
                continue
            file_name = f"{Path(name).stem}_aligned{Path(name).suffix}" if aligned else name
            labelled.append((image_dir / file_name, label))
        super().__init__(root, split, *image_records(root, labelled))


def read_partition_labels(path: Path) -> list[tuple[str, int]]:
    """(image name, class index) per line of RAF-DB's partition label file; any malformed line or label outside
    1..7 raises ValueError naming the file and line, before anything is trained."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit() or fields[0].split("_", 1)[0] not in ("train", "test"):
            raise ValueError(f"{path}:{number}: expected '<train|test>_NNNNN.jpg <label 1-7>', got {line.strip()!r}")
        if not 1 <= int(fields[1]) <= 7:
            raise ValueError(f"{path}:{number}: unknown label {fields[1]} (RAF-DB basic labels are 1-7)")
        entries.append((fields[0], int(fields[1]) - 1))
    return entries
