"""Face landmarks for face images, also in the dark: a contrast stretch before detection, MTCNN's five points or
dlib's 68, and `compute_landmarks` that writes a dataset folder's landmark file (resumable), plus its CLI."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .dataset import FaceSample
from .face_layout import mean_shape
from .images import ImageReadError, check_rgb, is_image_file, read_rgb
from .landmark_cache import LANDMARKS_FILE, LandmarkTable, load_landmarks, save_landmarks
from .lowlight import LowLight
from .mtcnn import MTCNN, MTCNNWeightsError

DETECTOR_KINDS = ("mtcnn", "dlib68")
POINTS_OF_KIND = {"mtcnn": 5, "dlib68": 68}
DLIB_INSTALL_HINT = "pip install dlib-bin face_recognition_models"
DLIB_PREDICTOR = ("face_recognition_models", "face_recognition_models/models/shape_predictor_68_face_landmarks.dat")

# Aligned FER crops can be 48 px; both detectors see faces of that size too coarsely, so small images are
# enlarged to this shorter side first.
MIN_DETECTION_SIDE = 112
# The smallest face MTCNN searches for, relative to the shorter side: FER crops are mostly face, so the
# image pyramid can stop early, which makes detection faster.
MIN_FACE_FRACTION = 0.1
# Aligned face crops cut through the face's outline; a black border around them (black is also what MTCNN's
# crops read outside an image) finds more faces: on 100 LFW crops 100 instead of 98, and 76 instead of 68 at
# 0.2x brightness with sensor noise.
BORDER_FRACTION = 0.2
# dlib's detector scans an 80-pixel window, so in small images it looks at twice their size.
DLIB_UPSAMPLE_BELOW_SIDE = 300
# The shape predictor was trained on dlib's boxes, which sit lower and wider on the face than MTCNN's: edge
# offsets (x0, y0 and x1, y1) in units of MTCNN's box size, the mean over 97 LFW faces both detectors found.
MTCNN_TO_DLIB_BOX = np.array([[-0.10, 0.085], [0.10, 0.025]], dtype=np.float32)
SAVE_INTERVAL_SECONDS = 60.0


def contrast_stretch(rgb: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.0) -> np.ndarray:
    """The image with its intensities stretched linearly so the given percentiles become 0 and 255, which lets
    the face detectors find faces in dark, low-contrast photos; a flat image is returned unchanged."""
    check_rgb(rgb)
    if not 0 <= low_percentile < high_percentile <= 100:
        raise ValueError(f"low_percentile and high_percentile must satisfy 0 <= low < high <= 100, "
                         f"got {low_percentile} and {high_percentile}")
    # One range for all channels: stretching each channel on its own would also shift the colours.
    low, high = np.percentile(rgb, [low_percentile, high_percentile])
    if high - low < 1:
        return rgb.copy()
    stretched = (rgb.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(stretched), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Detection:
    """One face: box (4,) x0, y0, x1, y1 and points (P, 2), float32 in continuous pixel coordinates of the
    image (face_layout conventions), and a confidence: MTCNN's face probability or dlib's detection margin."""

    box: np.ndarray
    points: np.ndarray
    score: float


def _check_kind(kind: str) -> None:
    if kind not in DETECTOR_KINDS:
        raise ValueError(f"kind must be one of {', '.join(DETECTOR_KINDS)}, got {kind!r}")


class LandmarkDetector:
    """Finds the main face of an RGB image and its landmarks: MTCNN's 5 points (kind="mtcnn") or dlib's 68
    iBUG points (kind="dlib68"; dlib's 68-point model is licensed by iBUG for non-commercial use only)."""

    def __init__(self, kind: str = "mtcnn", stretch: bool = True, *, weights_dir: str | os.PathLike | None = None,
                 device: str = "cpu") -> None:
        _check_kind(kind)
        self.kind = kind
        self.stretch = stretch
        # dlib68 needs MTCNN too: its box stands in when dlib's own face detector misses.
        self.mtcnn = MTCNN(weights_dir, device=device)
        if kind == "dlib68":
            self._dlib_detector, self._dlib_predictor = _load_dlib()

    @property
    def points(self) -> int:
        """How many landmarks each detection has (5 or 68)."""
        return POINTS_OF_KIND[self.kind]

    def detect(self, rgb: np.ndarray) -> Detection | None:
        """The most prominent face (largest, confident) of an (H, W, 3) uint8 image, or None if none is found."""
        check_rgb(rgb)
        image = contrast_stretch(rgb) if self.stretch else rgb
        height, width = image.shape[:2]
        border = round(BORDER_FRACTION * min(height, width))
        image = np.pad(image, ((border, border), (border, border), (0, 0)))
        zoom = max(1.0, MIN_DETECTION_SIDE / min(image.shape[:2]))
        if zoom > 1:
            size = (round(image.shape[1] * zoom), round(image.shape[0] * zoom))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        detection = self._detect_mtcnn(image) if self.kind == "mtcnn" else self._detect_dlib(image)
        if detection is None:
            return None
        scale = np.array([(width + 2 * border) / image.shape[1], (height + 2 * border) / image.shape[0]],
                         dtype=np.float32)
        return Detection((detection.box.reshape(2, 2) * scale - border).reshape(4),
                         detection.points * scale - border, detection.score)

    def _detect_mtcnn(self, image: np.ndarray) -> Detection | None:
        faces = self.mtcnn.detect(image, min_face_size=max(12.0, MIN_FACE_FRACTION * min(image.shape[:2])))
        if len(faces) == 0:
            return None
        areas = (faces.boxes[:, 2] - faces.boxes[:, 0]) * (faces.boxes[:, 3] - faces.boxes[:, 1])
        best = int(np.argmax(areas * faces.scores))
        return Detection(faces.boxes[best], faces.points[best], float(faces.scores[best]))

    def _detect_dlib(self, image: np.ndarray) -> Detection | None:
        import dlib

        upsample = int(min(image.shape[:2]) < DLIB_UPSAMPLE_BELOW_SIDE)
        rectangles, scores, _ = self._dlib_detector.run(image, upsample, 0.0)
        if rectangles:
            best = int(np.argmax(scores))
            rectangle, score = rectangles[best], float(scores[best])
        else:
            fallback = self._detect_mtcnn(image)
            if fallback is None:
                return None
            rectangle, score = dlib.rectangle(*_dlib_box_from_mtcnn(fallback.box)), fallback.score
        shape = self._dlib_predictor(image, rectangle)
        # dlib gives integer pixel indices; their continuous coordinates are the pixel centres.
        points = np.array([(p.x + 0.5, p.y + 0.5) for p in shape.parts()], dtype=np.float32)
        box = np.array([rectangle.left(), rectangle.top(), rectangle.right() + 1, rectangle.bottom() + 1],
                       dtype=np.float32)
        return Detection(box, points, score)


def _dlib_box_from_mtcnn(box: np.ndarray) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (box.reshape(2, 2) + MTCNN_TO_DLIB_BOX * (box[2:] - box[:2])).reshape(4)
    return round(x0), round(y0), round(x1) - 1, round(y1) - 1


def _load_dlib():
    try:
        import dlib
    except ImportError:
        raise ImportError(f"kind='dlib68' needs dlib and its 68-point model: `{DLIB_INSTALL_HINT}`") from None
    # face_recognition_models' __init__ imports pkg_resources, which may be absent, so only its file is located.
    try:
        predictor = Path(str(importlib.metadata.distribution(DLIB_PREDICTOR[0]).locate_file(DLIB_PREDICTOR[1])))
    except importlib.metadata.PackageNotFoundError:
        predictor = None
    if predictor is None or not predictor.is_file():
        raise ImportError(f"kind='dlib68' needs the 68-point model of the {DLIB_PREDICTOR[0]} package: "
                          f"`{DLIB_INSTALL_HINT}`")
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(predictor))


class LandmarkFileError(ValueError):
    """An existing landmark file that a run cannot resume."""


@dataclass(frozen=True)
class LandmarkReport:
    """What `compute_landmarks` produced for a dataset folder: counts over its images and where they went."""

    out: Path
    images: int
    found: int
    fallback: int
    reused: int
    unreadable: dict[str, str]

    @property
    def summary(self) -> str:
        """One line for the console."""
        reused = f" ({self.reused} from an earlier run)" if self.reused else ""
        return (f"landmarks: {self.images} images, {self.found} found, {self.fallback} mean-shape fallback, "
                f"{len(self.unreadable)} unreadable{reused} -> {self.out}")


def compute_landmarks(root: str | os.PathLike, out: str | os.PathLike | None = None, kind: str = "mtcnn",
                      stretch: bool = True, progress: bool = True) -> LandmarkReport:
    """Detects landmarks for every image under `root` and saves them as a landmark file (default
    root/landmarks.npz); missed faces get the mean shape, unreadable files are listed, and a run resumes
    from an existing file, saving periodically."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"root: {root} is not a directory")
    out = root / LANDMARKS_FILE if out is None else Path(out)
    _check_kind(kind)
    entries = _resumable_entries(out, POINTS_OF_KIND[kind])
    detector = LandmarkDetector(kind, stretch)
    image_paths = sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                         if path.is_file() and is_image_file(path))
    reused = sum(path in entries for path in image_paths)
    unreadable: dict[str, str] = {}

    def pixels(relative: str) -> np.ndarray | None:
        try:
            return read_rgb(root / relative)
        except ImageReadError as error:
            unreadable[relative] = error.reason
            return None

    pending = [(path, lambda path=path: pixels(path)) for path in image_paths if path not in entries]
    _detect_pending(pending, entries, detector, out, progress)
    found = sum(entries[path][1] for path in image_paths if path in entries)
    fallback = sum(path in entries for path in image_paths) - found
    return LandmarkReport(out, len(image_paths), found, fallback, reused, unreadable)


def _detect_pending(pending: list[tuple[str, Callable[[], np.ndarray | None]]],
                    entries: dict[str, tuple[np.ndarray, bool]], detector: LandmarkDetector, out: Path,
                    progress: bool) -> None:
    """Adds the detection (or the mean-shape fallback) of each (key, pixels) pair to `entries`, saving them to
    `out` periodically and at the end; pixels that give None are left out."""
    last_save = time.monotonic()
    for count, (key, read) in enumerate(_progress(pending, progress), start=1):
        rgb = read()
        if rgb is None:
            continue
        detection = detector.detect(rgb)
        if detection is None:
            entries[key] = (mean_shape(rgb.shape[1], rgb.shape[0], detector.points), False)
        else:
            entries[key] = (detection.points, True)
        if time.monotonic() - last_save > SAVE_INTERVAL_SECONDS and count < len(pending):
            _save_entries(out, entries, detector.points)
            last_save = time.monotonic()
    _save_entries(out, entries, detector.points)


def detector_for(landmarks: str, points: int | None) -> str | None:
    """The detector that must find the landmarks of a model reading `points` landmarks (None: it reads none), when
    a run's landmarks are `landmarks` ("dataset": the data's own, or a detector kind); None when no detector is
    needed."""
    if landmarks == "dataset" or points is None:
        return None
    _check_kind(landmarks)
    if POINTS_OF_KIND[landmarks] < points:
        raise ValueError(f"landmarks: {landmarks} finds {POINTS_OF_KIND[landmarks]} points, the model reads {points}; "
                         "use dlib68, or a model with 5-point landmark features (dlnet.landmark_points=5)")
    return landmarks


def _check_darkening(darken: LowLight | None) -> None:
    if darken is not None and (not isinstance(darken, LowLight) or darken.seed is None):
        raise ValueError("darken: landmarks are detected once per face, so the darkening must be the same in every "
                         f"epoch: a LowLight with a seed, got {darken!r}")


def landmark_file_name(source, darken: LowLight | None, kind: str) -> str:
    """The name of the landmark file of a source's faces (`source.identity`) as a detector sees them: normal, or
    darkened by a seeded LowLight (named by its preset and seed)."""
    identity = getattr(source, "identity", None)
    if identity is None:
        raise ValueError(f"source: a {type(source).__name__} has no `identity` to name its landmark file by")
    _check_darkening(darken)
    condition = "normal" if darken is None else f"{darken.preset}-seed{darken.seed}"
    return f"{identity}-{condition}-{kind}.npz"


class DetectedLandmarks:
    """A face source whose landmarks are the detector's, found in each image as the model sees it -- darkened by
    `darken` first when given -- instead of the source's own (for synthetic faces the generator's exact points,
    which no user has). Detections are computed once into the landmark file `cache` (keyed by record key,
    resumed and saved periodically); faces the detector misses get the mean shape and are counted."""

    def __init__(self, source, kind: str, cache: str | os.PathLike, darken: LowLight | None = None,
                 progress: bool = True) -> None:
        _check_kind(kind)
        _check_darkening(darken)
        self.source, self.kind = source, kind
        cache = Path(cache)
        entries = _resumable_entries(cache, POINTS_OF_KIND[kind])
        # Sources that can name a face without reading it (`key`) spare a pass over every image when all is cached.
        key_of = getattr(source, "key", None) or (lambda index: source[index].key)
        samples = {key_of(index): index for index in range(len(source))}
        pending = [(key, lambda index=index: self._pixels(index, darken)) for key, index in samples.items()
                   if key not in entries]
        if pending:
            _detect_pending(pending, entries, LandmarkDetector(kind), cache, progress)
        self.points = {key: entries[key][0] for key in samples}
        self.found = sum(entries[key][1] for key in samples)

    def _pixels(self, index: int, darken: LowLight | None) -> np.ndarray:
        sample = self.source[index]
        return sample.image if darken is None else darken(sample.image, key=sample.key)

    @property
    def fallback(self) -> int:
        """How many faces got the mean shape because the detector found none."""
        return len(self.points) - self.found

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> FaceSample:
        sample = self.source[index]
        return dataclasses.replace(sample, landmarks=self.points[sample.key])


def _resumable_entries(out: Path, points: int) -> dict[str, tuple[np.ndarray, bool]]:
    if not out.exists():
        return {}
    try:
        table = load_landmarks(out)
    except ValueError as error:
        raise LandmarkFileError(f"cannot resume from {out}: {error}") from None
    if table.points.shape[1] != points:
        raise LandmarkFileError(f"{out} holds {table.points.shape[1]}-point landmarks but this detector gives "
                                f"{points}; write to another file or delete it")
    return {path: (points_, bool(found)) for path, points_, found in
            zip(table.paths, table.points, table.found, strict=True)}


def _save_entries(out: Path, entries: dict[str, tuple[np.ndarray, bool]], points: int) -> None:
    paths = tuple(sorted(entries))
    landmarks = np.zeros((len(paths), points, 2), np.float32)
    for row, path in enumerate(paths):
        landmarks[row] = entries[path][0]
    save_landmarks(out, LandmarkTable(paths, landmarks, np.array([entries[path][1] for path in paths], dtype=bool)))


def _progress(paths: list[str], enabled: bool) -> tqdm:
    return tqdm(paths, desc="landmarks", unit="image", disable=not enabled, file=sys.stderr)


def add_landmarks_command(commands: argparse._SubParsersAction) -> None:
    """Registers `lldif landmarks DATA_DIR`, which writes the dataset folder's landmark file."""
    parser = commands.add_parser(
        "landmarks", help="detect face landmarks for every image of a dataset folder",
        description="Detects face landmarks for every image under DATA_DIR and saves them as a landmark file. "
                    "Faces not found get the mean face shape; an existing file is resumed, not recomputed.",
    )
    parser.add_argument("data_dir", metavar="DATA_DIR", help="dataset folder; every image below it is processed")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help=f"landmark file to write or resume (default: DATA_DIR/{LANDMARKS_FILE})")
    parser.add_argument("--detector", choices=DETECTOR_KINDS, default="mtcnn",
                        help="mtcnn: 5 points (default); dlib68: 68 iBUG points (non-commercial model)")
    parser.add_argument("--no-stretch", dest="stretch", action="store_false",
                        help="detect on the images as they are, without the contrast stretch that helps in the dark")

    def run(args: argparse.Namespace) -> None:
        if not Path(args.data_dir).is_dir():
            parser.error(f"DATA_DIR: {args.data_dir} is not a directory")
        try:
            report = compute_landmarks(args.data_dir, args.out, args.detector, args.stretch)
        except (MTCNNWeightsError, ImportError) as error:
            parser.error(f"--detector {args.detector}: {error}")
        except LandmarkFileError as error:
            parser.error(f"--out: {error}")
        print(report.summary)

    parser.set_defaults(run=run)
