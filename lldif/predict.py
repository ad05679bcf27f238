"""Expression predictions for face photos: find the face (also in the dark), frame it as aligned FER datasets do,
run a trained model from a run folder, and report one label per image; plus the `lldif predict` command."""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from .argtypes import non_negative_int, positive_int
from .data.face_layout import five_from_68, mean_shape
from .data.images import IMAGE_SUFFIXES, ImageReadError, is_image_file, read_rgb, write_atomic
from .data.labels import EXPRESSIONS
from .data.landmarks import LandmarkDetector
from .data.loader import IMAGENET_MEAN, IMAGENET_STD
from .data.mtcnn import MTCNNWeightsError
from .run import CHECKPOINTS, Run, choose_device

# Margin added on each side of MTCNN's face box, as a fraction of the box's longer side, before the square crop.
# MTCNN's box runs from the forehead to the chin; aligned FER crops such as RAF-DB's show that whole face with a
# thin band of hair and background around it, which 10% a side gives (on skimage's astronaut photo the eyes sit at
# 0.39 and the mouth corners at 0.68 of the crop height).
FACE_MARGIN = 0.1
DEFAULT_CSV = "predictions.csv"


@dataclass(frozen=True)
class PreparedFace:
    """A face ready for a model: `image` (S, S, 3) uint8, `landmarks` (P, 2) in its pixels (None for models that
    take none), `box` (x0, y0, x1, y1) the crop in pixels of the photo, `face_found` None when detection was off."""

    image: np.ndarray
    landmarks: np.ndarray | None
    box: tuple[int, int, int, int]
    face_found: bool | None


@dataclass(frozen=True)
class Prediction:
    """The result for one image; an unreadable file has `error` set, no label and no probabilities."""

    path: str
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    face_found: bool | None = None
    error: str | None = None

    def describe(self) -> str:
        """One console line: `path: label confidence`, with a note for a missed face or an unreadable file."""
        if self.error is not None:
            return f"{self.path}: unreadable ({self.error})"
        note = " (no face found; whole image used)" if self.face_found is False else ""
        return f"{self.path}: {self.label} {self.confidence:.2f}{note}"


def _is_lldif(model: nn.Module) -> bool:
    # Imported here: the model pulls in the kernels, which the CLI's other commands do without.
    from .models.lldif import LLDif

    return isinstance(model, LLDif)


def landmark_points(model: nn.Module) -> int | None:
    """How many landmarks per face the model reads (68 or 5), or None when it ignores them."""
    if _is_lldif(model) and model.config.dlnet.landmark_features == "heatmap":
        return model.config.dlnet.landmark_points
    return None


def sixty_eight_from_five(five: np.ndarray) -> np.ndarray:
    """68 iBUG points for a face known by MTCNN's five: the mean shape moved, turned and scaled (least squares)
    onto the five points."""
    unit = mean_shape(1, 1).astype(np.float64)
    # As complex numbers a similarity transform is z -> a z + b, which least squares fits without reflections.
    source = five_from_68(unit) @ np.array([1, 1j])
    target = five.astype(np.float64) @ np.array([1, 1j])
    (scale_turn, shift), *_ = np.linalg.lstsq(np.stack([source, np.ones(5)], axis=1), target, rcond=None)
    moved = scale_turn * (unit @ np.array([1, 1j])) + shift
    return np.stack([moved.real, moved.imag], axis=1).astype(np.float32)


def prepare_face(rgb: np.ndarray, size: int, *, detector: LandmarkDetector | None,
                 points: int | None) -> PreparedFace:
    """The model input for a photo: the detected face in a square crop with FACE_MARGIN, or the whole image when
    `detector` is None or finds no face, resized to `size`, with `points` landmarks in the crop's pixels."""
    height, width = rgb.shape[:2]
    detection = None if detector is None else detector.detect(rgb)
    if detection is None:
        box = (0, 0, width, height)
    else:
        x0, y0, x1, y1 = detection.box.astype(np.float64)
        side = max(x1 - x0, y1 - y0) * (1 + 2 * FACE_MARGIN)
        left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
        box = (left, top, left + round(side), top + round(side))
    # Parts of the crop outside the photo are black, as in MTCNN's own crops.
    image = np.asarray(Image.fromarray(rgb).crop(box).resize((size, size), Image.BILINEAR))
    crop_width, crop_height = box[2] - box[0], box[3] - box[1]
    landmarks = None
    if points is not None and detection is None:
        landmarks = mean_shape(size, size, points)
    elif points is not None:
        detected = detection.points if points == detection.points.shape[0] else sixty_eight_from_five(detection.points)
        scale = np.array([size / crop_width, size / crop_height], dtype=np.float32)
        landmarks = ((detected - np.array(box[:2], dtype=np.float32)) * scale).astype(np.float32)
    return PreparedFace(image, landmarks, box, None if detector is None else detection is not None)


def _to_batch(faces: Sequence[PreparedFace], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    images = torch.from_numpy(np.stack([face.image for face in faces])).to(device).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    landmarks = None
    if faces[0].landmarks is not None:
        landmarks = torch.from_numpy(np.stack([face.landmarks for face in faces])).to(device)
    return (images - mean) / std, landmarks


def predict_images(model: nn.Module, paths: Sequence[str | os.PathLike], *, detect: bool = True,
                   device: str | torch.device | None = None, batch_size: int = 16, seed: int = 0,
                   progress: bool = True) -> list[Prediction]:
    """Predicts the expression of each image, in order. Unreadable files get a Prediction with `error`; LLDif's
    diffusion sampling is seeded with `seed`, so the same images in the same order and batches repeat exactly."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    classes = model.config.num_classes
    if classes != len(EXPRESSIONS):
        raise ValueError(f"the model has {classes} classes; predictions are named for the {len(EXPRESSIONS)} "
                         f"expressions {', '.join(EXPRESSIONS)}")
    device = choose_device(device)
    model = model.to(device).eval()
    detector = LandmarkDetector("mtcnn", stretch=True, device=str(device)) if detect else None
    points = landmark_points(model)
    generator = torch.Generator(device=device).manual_seed(seed) if _is_lldif(model) else None
    size = model.config.image_size
    results: list[Prediction] = []
    with tqdm(total=len(paths), desc="predict", unit="image", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = [str(path) for path in paths[start:start + batch_size]]
            faces: dict[int, PreparedFace] = {}
            errors: dict[int, str] = {}
            for index, path in enumerate(chunk):
                try:
                    faces[index] = prepare_face(read_rgb(path), size, detector=detector, points=points)
                except ImageReadError as error:
                    errors[index] = error.reason
            probabilities = torch.empty(0, classes)
            if faces:
                images, landmarks = _to_batch(list(faces.values()), device)
                options = {"generator": generator} if generator is not None else {}
                with torch.inference_mode():
                    probabilities = model.predict(images, landmarks, **options).float().cpu()
            rows = dict(zip(faces, probabilities.tolist(), strict=True))
            for index, path in enumerate(chunk):
                if index in errors:
                    results.append(Prediction(path, error=errors[index]))
                    continue
                row = rows[index]
                best = int(np.argmax(row))
                results.append(Prediction(path, EXPRESSIONS[best], row[best], dict(zip(EXPRESSIONS, row, strict=True)),
                                          faces[index].face_found))
            bar.update(len(chunk))
    return results


CSV_COLUMNS = ("path", "label", "confidence", "face_found", "error", *EXPRESSIONS)


def write_predictions_csv(path: str | os.PathLike, predictions: Sequence[Prediction]) -> None:
    """Writes one row per prediction (columns CSV_COLUMNS, one probability column per class), atomically;
    fields that do not apply (no detection, no label for an unreadable file) are empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for item in predictions:
        confidence = "" if item.confidence is None else f"{item.confidence:.6f}"
        found = "" if item.face_found is None else str(item.face_found).lower()
        writer.writerow([item.path, item.label or "", confidence, found, item.error or "",
                         *(f"{item.probabilities[name]:.6f}" if item.probabilities else "" for name in EXPRESSIONS)])
    text = buffer.getvalue().encode("utf-8")
    write_atomic(path, lambda file: file.write(text))


def find_images(target: str | os.PathLike) -> tuple[list[Path], bool]:
    """The image files a path names (the file itself, or every image below a folder, sorted) and whether it is
    a folder; a missing path or a folder without images raises an error naming IMAGE_OR_FOLDER."""
    target = Path(target)
    if target.is_dir():
        images = sorted(path for path in target.rglob("*") if path.is_file() and is_image_file(path))
        if not images:
            raise ValueError(f"IMAGE_OR_FOLDER: {target} holds no images (looked for "
                             f"{', '.join(sorted(IMAGE_SUFFIXES))} in it and its subfolders)")
        return images, True
    if not target.exists():
        raise FileNotFoundError(f"IMAGE_OR_FOLDER: {target} does not exist")
    return [target], False


def _load_run_model(run_dir: str, checkpoint: str, device: torch.device) -> nn.Module:
    try:
        return Run(run_dir).load_model(checkpoint, map_location=device)
    except (ValueError, OSError) as error:
        raise ValueError(f"--model: {error}") from None


def add_predict_command(commands: argparse._SubParsersAction) -> None:
    """Registers `lldif predict IMAGE_OR_FOLDER --model RUN_DIR`, which labels the expression of face photos."""
    parser = commands.add_parser(
        "predict", help="predict the facial expression of a photo or of every photo in a folder",
        description="Predicts the facial expression of a photo, or of every image below a folder, with a model "
                    "trained by `lldif train`. Each face is found with MTCNN (contrast-stretched, so dark photos "
                    "work too) and cropped square with a margin; where no face is found the whole image is used "
                    "and the output says so. Prints `path: label confidence` per image; for a folder it also "
                    "writes a CSV with every class probability (unreadable files are listed there, not fatal).")
    parser.add_argument("target", metavar="IMAGE_OR_FOLDER", help="an image, or a folder searched recursively")
    parser.add_argument("--model", metavar="RUN_DIR", required=True, help="run folder written by `lldif train`")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best",
                        help="which checkpoint of the run (default best; falls back to last without one)")
    parser.add_argument("--csv", metavar="PATH", default=None,
                        help=f"CSV file to write (default for a folder: {DEFAULT_CSV} in the current directory)")
    parser.add_argument("--no-detect", dest="detect", action="store_false",
                        help="use each whole image as the face (already aligned crops such as RAF-DB's), "
                             "with the mean face shape as landmarks")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where the model runs (default: cuda when available)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default 16)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of LLDif's diffusion sampling (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> None:
        device = choose_device(args.device)
        images, is_folder = find_images(args.target)
        model = _load_run_model(args.model, args.checkpoint, device)
        try:
            predictions = predict_images(model, images, detect=args.detect, device=device, batch_size=args.batch_size,
                                         seed=args.seed, progress=is_folder and not args.quiet)
        except MTCNNWeightsError as error:
            raise ValueError(f"face detection: {error}; or pass --no-detect for aligned face crops") from None
        if not is_folder and predictions[0].error is not None:
            raise ValueError(f"IMAGE_OR_FOLDER: {predictions[0].path}: {predictions[0].error}")
        for prediction in predictions:
            print(prediction.describe())
        csv_path = args.csv if args.csv is not None else DEFAULT_CSV if is_folder else None
        if csv_path is not None:
            write_predictions_csv(csv_path, predictions)
            print(f"predict: {len(predictions)} images -> {csv_path}")

    parser.set_defaults(run=run)
