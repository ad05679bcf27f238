"""Face landmarks on real photos at normal light and in the dark (MTCNN's 5 points, dlib's 68), the contrast
stretch that finds faces in the dark, the dataset landmark file with its resume and command, and a face source's
landmarks detected in its images as the model sees them (`DetectedLandmarks`)."""

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
    DetectedLandmarks,
    LandmarkDetector,
    LandmarkFileError,
    compute_landmarks,
    contrast_stretch,
    landmark_file_name,
)
from lldif.data.lowlight import LowLight
from lldif.data.mtcnn import MTCNN, MTCNNWeightsError, non_maximum_suppression
from lldif.data.synthetic import SyntheticFaceDataset

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


# 14 synthetic training faces at 112 px: MTCNN finds 13 at normal light and 9 darkened with the paper preset (seed
# 0), within 0.12 eye distances (32 px) of the generator's exact points at normal light.
SYNTHETIC_FACES, SYNTHETIC_SIZE = 14, 112


@pytest.fixture(scope="module")
def synthetic_faces() -> SyntheticFaceDataset:
    return SyntheticFaceDataset(SYNTHETIC_FACES, "train", size=SYNTHETIC_SIZE)


def counting_detect(monkeypatch) -> list[np.ndarray]:
    """Makes LandmarkDetector.detect record every image it is given; returns the list they go into."""
    detect, seen = LandmarkDetector.detect, []

    def recorded(self, rgb):
        seen.append(rgb.copy())
        return detect(self, rgb)

    monkeypatch.setattr(LandmarkDetector, "detect", recorded)
    return seen


def test_detected_landmarks_come_from_the_detector(synthetic_faces, tmp_path):
    cache = tmp_path / landmark_file_name(synthetic_faces, None, "mtcnn")
    assert cache.name == f"synthetic-seed0-{SYNTHETIC_SIZE}px-normal-mtcnn.npz"
    detected = DetectedLandmarks(synthetic_faces, "mtcnn", cache, progress=False)
    assert len(detected) == SYNTHETIC_FACES and detected.found + detected.fallback == SYNTHETIC_FACES
    assert detected.found >= 11 and detected.fallback >= 1, (detected.found, detected.fallback)  # measured 13, 1
    table = load_landmarks(cache)
    keys = [synthetic_faces[i].key for i in range(SYNTHETIC_FACES)]
    assert table.paths == tuple(sorted(keys)) and int(table.found.sum()) == detected.found
    found = dict(zip(table.paths, table.found, strict=True))
    for index, key in enumerate(keys):
        source, sample = synthetic_faces[index], detected[index]
        assert (sample.key, sample.label, sample.caption) == (key, source.label, source.caption)
        assert np.array_equal(sample.image, source.image) and sample.landmarks.shape == (5, 2)
        np.testing.assert_array_equal(sample.landmarks, detected.points[key])
        if found[key]:
            exact = five_from_68(source.landmarks)
            assert not np.allclose(sample.landmarks, exact, atol=0.01)  # the detector's, not the generator's
            assert_near(sample.landmarks, exact, 0.2)
        else:
            np.testing.assert_array_equal(sample.landmarks, mean_shape(SYNTHETIC_SIZE, SYNTHETIC_SIZE, 5))


def test_detected_landmarks_reuse_their_cache(synthetic_faces, tmp_path, monkeypatch):
    cache = tmp_path / "landmarks" / "faces.npz"
    first = DetectedLandmarks(synthetic_faces, "mtcnn", cache, progress=False)
    monkeypatch.setattr(LandmarkDetector, "detect", lambda self, rgb: pytest.fail("cached faces detected again"))
    again = DetectedLandmarks(synthetic_faces, "mtcnn", cache, progress=False)
    assert again.found == first.found and again.points.keys() == first.points.keys()
    for key, points in first.points.items():
        np.testing.assert_array_equal(again.points[key], points)
    # A larger set of the same generator detects only its new faces and keeps the cached ones.
    monkeypatch.undo()
    seen = counting_detect(monkeypatch)
    more = DetectedLandmarks(SyntheticFaceDataset(SYNTHETIC_FACES + 2, "train", size=SYNTHETIC_SIZE), "mtcnn",
                             cache, progress=False)
    assert len(seen) == 2 and len(more) == SYNTHETIC_FACES + 2 and len(load_landmarks(cache).paths) == 16
    for key, points in first.points.items():
        np.testing.assert_array_equal(more.points[key], points)


def test_detected_landmarks_see_the_darkened_images(synthetic_faces, tmp_path, monkeypatch):
    darken = LowLight(seed=0)
    normal_file = tmp_path / landmark_file_name(synthetic_faces, None, "mtcnn")
    dark_file = tmp_path / landmark_file_name(synthetic_faces, darken, "mtcnn")
    assert dark_file.name == f"synthetic-seed0-{SYNTHETIC_SIZE}px-paper-seed0-mtcnn.npz" != normal_file.name
    seen = counting_detect(monkeypatch)
    dark = DetectedLandmarks(synthetic_faces, "mtcnn", dark_file, darken, progress=False)
    faces = [synthetic_faces[i] for i in range(SYNTHETIC_FACES)]
    assert len(seen) == SYNTHETIC_FACES
    for rgb, face in zip(seen, faces, strict=True):
        np.testing.assert_array_equal(rgb, darken(face.image, key=face.key))
    normal = DetectedLandmarks(synthetic_faces, "mtcnn", normal_file, progress=False)
    assert normal_file.is_file() and dark_file.is_file() and dark.found < normal.found  # measured 9 < 13
    assert any(not np.allclose(dark.points[face.key], normal.points[face.key]) for face in faces)


def test_detected_landmarks_refuse_what_they_cannot_cache(synthetic_faces, tmp_path):
    with pytest.raises(ValueError, match="darken"):
        DetectedLandmarks(synthetic_faces, "mtcnn", tmp_path / "faces.npz", LowLight(), progress=False)
    with pytest.raises(ValueError, match="kind"):
        DetectedLandmarks(synthetic_faces, "dlib5", tmp_path / "faces.npz", progress=False)

    class Anonymous:
        def __len__(self):
            return 0

    with pytest.raises(ValueError, match="identity"):
        landmark_file_name(Anonymous(), None, "mtcnn")
    assert not (tmp_path / "faces.npz").exists()


def test_detected_dlib68_landmarks(tmp_path):
    pytest.importorskip("dlib")
    faces = SyntheticFaceDataset(4, "test", size=SYNTHETIC_SIZE)
    cache = tmp_path / landmark_file_name(faces, None, "dlib68")
    assert cache.name.endswith("-normal-dlib68.npz")
    detected = DetectedLandmarks(faces, "dlib68", cache, progress=False)
    assert detected.found + detected.fallback == 4 and detected.found >= 3
    assert load_landmarks(cache).points.shape == (4, 68, 2)
    for index in range(4):
        assert detected[index].landmarks.shape == (68, 2)
    # A 5-point file cannot be resumed by the 68-point detector.
    DetectedLandmarks(faces, "mtcnn", tmp_path / "five.npz", progress=False)
    with pytest.raises(LandmarkFileError, match="5-point"):
        DetectedLandmarks(faces, "dlib68", tmp_path / "five.npz", progress=False)
