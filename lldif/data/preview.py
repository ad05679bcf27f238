"""The picture of the synthetic set in the docs: per class, faces at normal light, the same faces through the
low-light simulator, and those low-light faces contrast-stretched so their content can be seen.

Run: `python -m lldif.data.preview docs/synthetic_faces.png`
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

from .images import write_atomic
from .labels import EXPRESSIONS
from .landmarks import contrast_stretch
from .lowlight import LowLight
from .synthetic import SyntheticFaceGenerator

VIEWS = ("normal", "low light", "low light, stretched")


def preview_grid(faces_per_class: int = 3, size: int = 112, seed: int = 0, preset: str = "paper") -> Image.Image:
    """A grid with one row per expression and, for each of `faces_per_class` faces, the three VIEWS side by side."""
    generator, darken = SyntheticFaceGenerator(seed=seed, size=size), LowLight(preset, seed=seed)
    label_width, header, gap = 96, 20, 4
    columns = faces_per_class * len(VIEWS)
    grid = Image.new("RGB", (label_width + columns * (size + gap), header + len(EXPRESSIONS) * (size + gap)),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for column in range(columns):
        draw.text((label_width + column * (size + gap) + 2, 4), VIEWS[column % len(VIEWS)], fill=(0, 0, 0))
    for label, name in enumerate(EXPRESSIONS):
        top = header + label * (size + gap)
        draw.text((4, top + size // 2 - 6), name, fill=(0, 0, 0))
        for face_number in range(faces_per_class):
            face = generator.render(label * faces_per_class + face_number, label=label)
            dark = darken(face.image, key=f"preview/{label}/{face_number}")
            for view, image in enumerate((face.image, dark, contrast_stretch(dark))):
                left = label_width + (face_number * len(VIEWS) + view) * (size + gap)
                grid.paste(Image.fromarray(np.ascontiguousarray(image)), (left, top))
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the preview grid of synthetic faces, normal and low-light.")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--faces-per-class", type=int, default=3, help="faces per expression (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the faces and the darkening (default 0)")
    args = parser.parse_args(argv)
    grid = preview_grid(args.faces_per_class, seed=args.seed)
    write_atomic(os.fspath(args.out), lambda file: grid.save(file, format="PNG", optimize=True))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
