"""Face landmarks on real photos at normal light and in the dark (MTCNN's 5 points, dlib's 68), the contrast
stretch that finds faces in the dark, and the dataset landmark file with its resume and command."""

from __future__ import annotations

import importlib.metadata
import sys

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from lldif.cli import main
from lldif.data import landmarks
from lldif.data.face_layout import five_from_68, flip_landmarks, mean_shape
from lldif.data.images import write_rgb
from lldif.data.landmark_cache import load_landmarks
from lldif.data.landmarks import (
    LandmarkDetector,
    LandmarkFileError,
    compute_landmarks,
    contrast_stretch,
)
from lldif.data.mtcnn import MTCNN, MTCNNWeightsError, non_maximum_suppression

# Five points (left eye, right eye, nose tip, left and right mouth corner) measured by eye on 4-6x zooms of the
# photos with a 10-pixel grid, in continuous pixel coordinates; eyes are the pupils.
ASTRONAUT_FIVE = np.array([(203, 101), (246, 104), (224, 128), (203, 141), (244, 142)], dtype=np.float32)
GRACE_HOPPER_FIVE = np.array([(222, 189), (305, 186), (266, 242), (230, 280), (306, 277)], dtype=np.float32)
# Allowed distance from the hand-measured points, in eye distances (43 px for the astronaut, 83 for Grace
# Hopper); dlib's eye centres average the eyelid contour and are coarser than MTCNN's.
TOLERANCE_MTCNN = 0.15
TOLERANCE_DLIB = 0.25


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The nets are small: on a busy CPU, intra-op threads cost more in synchronisation than they gain.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mtcnn_detector() -> LandmarkDetector:
    return LandmarkDetector("mtcnn")


@pytest.fixture(scope="module")
def dlib_detector() -> LandmarkDetector:
    pytest.importorskip("dlib")
    return LandmarkDetector("dlib68")


def photo(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "astronaut":
        return skimage.data.astronaut(), ASTRONAUT_FIVE
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as file:
        return np.asarray(Image.open(file).convert("RGB")), GRACE_HOPPER_FIVE


def darkened(rgb: np.ndarray, brightness: float, seed: int = 0) -> np.ndarray:
    """A low-light shot of the scene: fewer photons (Poisson, 255 at full light) plus Gaussian read noise."""
    rng = np.random.default_rng(seed)
    photons = rng.poisson(rgb.astype(np.float64) * brightness)
    return np.clip(np.rint(photons + rng.normal(0.0, 2.0, rgb.shape)), 0, 255).astype(np.uint8)


def assert_five_point_layout(five: np.ndarray, box: np.ndarray) -> None:
    left_eye, right_eye, nose, left_mouth, right_mouth = five
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    assert left_eye[0] < nose[0] < right_eye[0]
    assert left_mouth[0] < right_mouth[0]
    assert (five >= box[:2]).all() and (five <= box[2:]).all()


def assert_near(five: np.ndarray, truth: np.ndarray, tolerance: float) -> None:
    eye_distance = np.linalg.norm(truth[1] - truth[0])
    errors = np.linalg.norm(five - truth, axis=1) / eye_distance
    assert (errors < tolerance).all(), f"errors in eye distances: {errors.round(3)}"


PHOTO_CASES = [pytest.param(name, brightness, id=f"{name}-{brightness}x")
               for name in ("astronaut", "grace_hopper") for brightness in (1.0, 0.2)]


@pytest.mark.parametrize(("name", "brightness"), PHOTO_CASES)
def test_mtcnn_five_points_on_photos(mtcnn_detector, name, brightness):
    rgb, truth = photo(name)
    image = rgb if brightness == 1.0 else darkened(rgb, brightness)
    detection = mtcnn_detector.detect(image)
    assert detection is not None
    assert detection.points.shape == (5, 2) and detection.points.dtype == np.float32
    assert detection.box.shape == (4,) and detection.box.dtype == np.float32
    assert detection.score > 0.9
    assert_five_point_layout(detection.points, detection.box)
    assert_near(detection.points, truth, TOLERANCE_MTCNN)


def test_mtcnn_points_follow_a_mirrored_image(mtcnn_detector):
    rgb, truth = photo("astronaut")
    upright = mtcnn_detector.detect(rgb)
    mirrored = mtcnn_detector.detect(rgb[:, ::-1])
    # Continuous coordinates make the mirror image's points the exact mirror of the upright ones.
    unflipped = flip_landmarks(mirrored.points, rgb.shape[1])
    eye_distance = np.linalg.norm(truth[1] - truth[0])
    assert np.abs(unflipped - upright.points).max() < 0.06 * eye_distance


@pytest.mark.parametrize(("name", "brightness"), PHOTO_CASES)
def test_dlib68_points_on_photos(dlib_detector, name, brightness):
    rgb, truth = photo(name)
    image = rgb if brightness == 1.0 else darkened(rgb, brightness)
    detection = dlib_detector.detect(image)
    assert detection is not None
    points = detection.points
    assert points.shape == (68, 2) and points.dtype == np.float32
    left_eye, right_eye, mouth = points[36:42], points[42:48], points[48:68]
    assert left_eye[:, 0].max() < points[30, 0] < right_eye[:, 0].min()
    assert max(left_eye[:, 1].max(), right_eye[:, 1].max()) < points[30, 1] < mouth[:, 1].min()
    assert points[8, 1] > mouth[:, 1].max()  # the chin is below the mouth
    assert_five_point_layout(five_from_68(points), detection.box)
    assert_near(five_from_68(points), truth, TOLERANCE_DLIB)


def test_dlib68_falls_back_to_the_mtcnn_box(dlib_detector, monkeypatch):
    class BlindDetector:
        def run(self, image, upsample, threshold):
            return [], [], []

    monkeypatch.setattr(dlib_detector, "_dlib_detector", BlindDetector())
    rgb, truth = photo("astronaut")
    detection = dlib_detector.detect(rgb)
    assert detection is not None and detection.score > 0.9  # MTCNN's probability, not a dlib margin
    assert_five_point_layout(five_from_68(detection.points), detection.box)
    assert_near(five_from_68(detection.points), truth, TOLERANCE_DLIB)


def test_contrast_stretch_finds_more_faces_in_the_dark(mtcnn_detector):
    # lfw_subset's first 100 images are 25x25 grey face crops; the detector enlarges such small images itself.
    faces = np.rint(skimage.data.lfw_subset()[:30] * 255).astype(np.uint8)
    dark = [np.repeat(np.rint(face * 0.1).astype(np.uint8)[:, :, None], 3, axis=2) for face in faces]
    plain = LandmarkDetector("mtcnn", stretch=False)
    found_plain = sum(plain.detect(face) is not None for face in dark)
    found_stretched = sum(mtcnn_detector.detect(face) is not None for face in dark)
    assert found_stretched >= 27, found_stretched  # measured: 30 of 30
    assert found_stretched >= found_plain + 15, (found_plain, found_stretched)  # measured: 7 of 30 unstretched


def test_contrast_stretch_maps_percentiles_to_full_range():
    rng = np.random.default_rng(1)
    dark = rng.integers(10, 40, size=(32, 32, 3), dtype=np.uint8)
    stretched = contrast_stretch(dark, 1, 99)
    assert stretched.dtype == np.uint8 and stretched.shape == dark.shape
    assert np.percentile(stretched, 1) <= 5 and np.percentile(stretched, 99) >= 250
    order = np.argsort(dark, axis=None, kind="stable")
    assert (np.diff(stretched.reshape(-1)[order].astype(int)) >= 0).all()  # brighter stays brighter
    flat = np.full((8, 8, 3), 77, np.uint8)
    assert (contrast_stretch(flat) == flat).all()
    with pytest.raises(ValueError, match="low_percentile"):
        contrast_stretch(dark, 60, 40)
    with pytest.raises(ValueError, match="rgb"):
        contrast_stretch(dark[:, :, 0])


def test_non_maximum_suppression_keeps_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [2, 2, 6, 6]], dtype=np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.95], dtype=np.float32)
    assert non_maximum_suppression(boxes, scores, 0.5).tolist() == [3, 1, 2]
    # Measured against the smaller box, the small box inside the others overlaps them completely.
    assert non_maximum_suppression(boxes, scores, 0.5, overlap="min").tolist() == [3, 2]


def test_missing_weights_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(MTCNNWeightsError, match=r"pnet\.pt.*pip install --no-deps facenet-pytorch==2\.6\.0"):
        MTCNN(weights_dir=tmp_path)
    with pytest.raises(MTCNNWeightsError, match="weights_dir"):
        LandmarkDetector("mtcnn", weights_dir=tmp_path)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(MTCNNWeightsError, match=r"not installed.*pip install --no-deps facenet-pytorch"):
        MTCNN()


def test_missing_dlib_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` fail
    with pytest.raises(ImportError, match="pip install dlib-bin face_recognition_models"):
        LandmarkDetector("dlib68")
    with pytest.raises(ValueError, match="kind"):
        LandmarkDetector("dlib5")


@pytest.fixture
def dataset(tmp_path):
    """Two photos (one in a subfolder), a blank image, a corrupt file and a non-image."""
    root = tmp_path / "data"
    astronaut, _ = photo("astronaut")
    grace_hopper, _ = photo("grace_hopper")
    write_rgb(root / "astronaut.png", np.asarray(Image.fromarray(astronaut).resize((128, 128))))
    write_rgb(root / "people" / "grace_hopper.jpg", np.asarray(Image.fromarray(grace_hopper).resize((128, 150))))
    write_rgb(root / "blank.png", np.full((64, 48, 3), 90, np.uint8))
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_compute_landmarks_writes_found_fallback_and_unreadable(dataset, monkeypatch, capsys):
    report = compute_landmarks(dataset, progress=False)
    assert (report.images, report.found, report.fallback, report.reused) == (4, 2, 1, 0)
    assert list(report.unreadable) == ["corrupt.jpg"]
    assert report.summary == (f"landmarks: 4 images, 2 found, 1 mean-shape fallback, 1 unreadable -> "
                              f"{dataset / 'landmarks.npz'}")
    table = load_landmarks(dataset / "landmarks.npz")
    assert table.paths == ("astronaut.png", "blank.png", "people/grace_hopper.jpg")
    assert table.found.tolist() == [True, False, True]
    assert table.points.shape == (3, 5, 2)
    np.testing.assert_array_equal(table.points[1], mean_shape(48, 64, 5))
    assert_near(table.points[0], ASTRONAUT_FIVE * 128 / 512, TOLERANCE_MTCNN)

    # A second run resumes: nothing is detected again and the command reports what the file holds.
    monkeypatch.setattr(LandmarkDetector, "detect", lambda self, rgb: pytest.fail("resumed run detected again"))
    main(["landmarks", str(dataset)])
    assert capsys.readouterr().out.strip() == (
        f"landmarks: 4 images, 2 found, 1 mean-shape fallback, 1 unreadable (3 from an earlier run) -> "
        f"{dataset / 'landmarks.npz'}")
    assert load_landmarks(dataset / "landmarks.npz").paths == table.paths


def test_a_killed_run_resumes_from_its_last_save(dataset, monkeypatch):
    monkeypatch.setattr(landmarks, "SAVE_INTERVAL_SECONDS", -1.0)  # save after every image
    detect = LandmarkDetector.detect
    calls = []

    def killed_on_second_image(self, rgb):
        calls.append(rgb.shape)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return detect(self, rgb)

    monkeypatch.setattr(LandmarkDetector, "detect", killed_on_second_image)
    with pytest.raises(KeyboardInterrupt):
        compute_landmarks(dataset, progress=False)
    assert load_landmarks(dataset / "landmarks.npz").paths == ("astronaut.png",)
    monkeypatch.setattr(LandmarkDetector, "detect", detect)
    report = compute_landmarks(dataset, progress=False)
    assert (report.reused, report.found, report.fallback) == (1, 2, 1)
    assert len(load_landmarks(dataset / "landmarks.npz").paths) == 3


def test_resume_refuses_a_file_of_other_points(dataset, capsys):
    out = dataset / "five.npz"
    compute_landmarks(dataset, out, progress=False)
    with pytest.raises(LandmarkFileError, match="5-point"):
        compute_landmarks(dataset, out, kind="dlib68", progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["landmarks", str(dataset), "--out", str(out), "--detector", "dlib68"])
    assert exit_info.value.code == 2
    assert "--out:" in capsys.readouterr().err


def test_command_rejects_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["landmarks", str(tmp_path / "absent")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "DATA_DIR" in error and "not a directory" in error
