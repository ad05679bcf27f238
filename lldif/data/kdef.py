"""KDEF: 70 subjects x 2 sessions x 7 expressions x 5 angles, labelled by the code in each file name."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .dataset import FaceDataset, check_root, check_split, image_records
from .images import is_image_file
from .labels import label_index

# Session (A/B), gender (F/M), subject number, expression code, angle: e.g. AF01ANFL.JPG.
FILE_CODE = re.compile(r"^([AB])([FM])(\d\d)(AF|AN|DI|HA|NE|SA|SU)(FL|FR|HL|HR|S)$", re.IGNORECASE)
ANGLES = ("FL", "HL", "S", "HR", "FR")


class KDEF(FaceDataset):
    """KDEF with a seeded subject-disjoint split: `test_fraction` of the 70 subjects (both sessions, all their
    images) are the test split, so with every angle the split is 3,920 / 980 images. Files whose name is not a
    KDEF code are listed as skipped."""

    name = "kdef"

    def __init__(self, root: str | os.PathLike, split: str = "train", seed: int = 0, test_fraction: float = 0.2,
                 angles: tuple[str, ...] = ANGLES) -> None:
        root = check_root(root, "KDEF")
        check_split(split)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        unknown = set(angles) - set(ANGLES)
        if unknown:
            raise ValueError(f"angles must be among {', '.join(ANGLES)}, got {sorted(unknown)}")
        coded, unlabelled = [], []
        for path in sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p)):
            match = FILE_CODE.match(path.stem)
            if match is None:
                unlabelled.append((path, "file name is not a KDEF code like AF01ANS.JPG"))
            elif match.group(5).upper() in angles:
                coded.append((path, match.group(2).upper() + match.group(3), label_index(match.group(4))))
        subjects = sorted({subject for _, subject, _ in coded})
        if len(subjects) < 2:
            raise ValueError(f"root: KDEF needs images of at least two subjects for a subject-disjoint split, "
                             f"found {len(subjects)} under {root}")
        test_subjects = set(self.split_subjects(subjects, seed, test_fraction))
        labelled: list[tuple[Path, int | str]] = [
            (path, label) for path, subject, label in coded if (subject in test_subjects) == (split == "test")]
        super().__init__(root, split, *image_records(root, labelled + unlabelled))
        self.subjects = sorted({subject for _, subject, _ in coded if (subject in test_subjects) == (split == "test")})

    @staticmethod
    def split_subjects(subjects: list[str], seed: int, test_fraction: float) -> list[str]:
        """The test subjects: a seeded permutation's first round(n·test_fraction), at least one, never all."""
        count = min(max(1, round(len(subjects) * test_fraction)), len(subjects) - 1)
        order = np.random.default_rng(seed).permutation(len(subjects))
        return sorted(subjects[i] for i in order[:count])
