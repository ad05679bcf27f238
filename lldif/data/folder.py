"""A plain class-per-folder layout: `root/<expression>/*.jpg`, or `root/<split>/<expression>/*.jpg`."""

from __future__ import annotations

import os

from .dataset import FaceDataset, check_root, check_split, image_records
from .images import is_image_file
from .labels import label_index


class ImageFolder(FaceDataset):
    """Faces sorted into one folder per expression (any spelling `labels.label_index` knows: `happy`,
    `Happiness`, ...). With `train/` and `test/` folders at the root, `split` picks one; without them every image
    belongs to whichever split is asked for. Keys are paths relative to the root."""

    name = "folder"

    def __init__(self, root: str | os.PathLike, split: str = "train") -> None:
        root = check_root(root, "image")
        check_split(split)
        has_splits = any((root / name).is_dir() for name in ("train", "test"))
        base = root / split if has_splits else root
        if not base.is_dir():
            raise FileNotFoundError(f"root: {root} has split folders but no {split}/ folder")
        class_dirs = sorted(p for p in base.iterdir() if p.is_dir())
        if not class_dirs:
            raise ValueError(f"root: {base} has no class folders (expected one folder per expression)")
        labelled = []
        for class_dir in class_dirs:
            try:
                label = label_index(class_dir.name)
            except ValueError as error:
                raise ValueError(f"root: folder {class_dir}: {error}") from None
            labelled += [(path, label) for path in sorted(class_dir.rglob("*")) if is_image_file(path)]
        super().__init__(root, split, *image_records(root, labelled))
