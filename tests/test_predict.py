"""`lldif predict`: the face crop on a real photo in normal light and in the dark, the mean-shape fallbacks,
predictions from untrained tiny LLDif and baseline models, the folder CSV, and the command's errors."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import skimage.data
import torch

from lldif import LLDif, lldif_tiny
from lldif.cli import main
from lldif.data.face_layout import five_from_68, mean_shape
from lldif.data.images import write_rgb
from lldif.data.labels import EXPRESSIONS
from lldif.data.landmarks import LandmarkDetector
from lldif.data.mtcnn import MTCNNWeightsError
from lldif.data.synthetic import SyntheticFaceGenerator
from lldif.models.baseline import BaselineCNN, baseline_tiny
from lldif.predict import CSV_COLUMNS, predict_images, prepare_face, sixty_eight_from_five
from lldif.run import Run

# The astronaut's pupils and mouth corners, hand-measured in pixels of skimage's photo (as in test_landmarks).
ASTRONAUT_EYES = np.array([(203, 101), (246, 104)], dtype=np.float32)
ASTRONAUT_MOUTH = np.array([(203, 141), (244, 142)], dtype=np.float32)


def darkened(rgb: np.ndarray, brightness: float = 0.08, seed: int = 0) -> np.ndarray:
    """A low-light shot of the scene: fewer photons (Poisson) plus Gaussian read noise."""
    rng = np.random.default_rng(seed)
    photons = rng.poisson(rgb.astype(np.float64) * brightness)
    return np.clip(np.rint(photons + rng.normal(0.0, 2.0, rgb.shape)), 0, 255).astype(np.uint8)


def make_run(folder, model) -> str:
    run = Run(folder)
    run.create({"model": "lldif" if isinstance(model, LLDif) else "baseline", "seed": 0, "lowlight": "paper",
                "data": "synthetic:14", "test_data": None, "batch_size": 7}, model.config.to_dict())
    model.save_pretrained(run.checkpoint("best"))
    return str(folder)


@pytest.fixture(scope="module")
def lldif_run(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return make_run(tmp_path_factory.mktemp("lldif_run"), LLDif(lldif_tiny()))


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return make_run(tmp_path_factory.mktemp("baseline_run"), BaselineCNN(baseline_tiny()))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder with the astronaut, a dark copy in a subfolder, a synthetic face, a broken file and a text file."""
    folder = tmp_path_factory.mktemp("photos")
    astronaut = skimage.data.astronaut()
    write_rgb(folder / "astronaut.png", astronaut)
    write_rgb(folder / "dark" / "astronaut_dark.png", darkened(astronaut))
    write_rgb(folder / "synthetic.png", SyntheticFaceGenerator(seed=0, size=112).render(3).image)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not an image either, and not looked at")
    return folder


@pytest.fixture(scope="module")
def detector() -> LandmarkDetector:
    try:
        return LandmarkDetector("mtcnn")
    except MTCNNWeightsError as error:
        pytest.skip(f"MTCNN weights are not installed: {error}")


@pytest.mark.parametrize("brightness", [1.0, 0.08], ids=["normal", "dark"])
def test_face_crop_frames_the_astronaut_in_normal_light_and_in_the_dark(detector, brightness):
    rgb = skimage.data.astronaut()
    rgb = rgb if brightness == 1.0 else darkened(rgb, brightness)
    face = prepare_face(rgb, 64, detector=detector, points=68)
    assert face.face_found is True and face.image.shape == (64, 64, 3) and face.landmarks.shape == (68, 2)
    x0, y0, x1, y1 = face.box
    side = x1 - x0
    assert side == y1 - y0 and 100 < side < 250, face.box  # a face-sized square, not the 512 px photo
    features = np.concatenate([ASTRONAUT_EYES, ASTRONAUT_MOUTH])
    assert (features > (x0, y0)).all() and (features < (x1, y1)).all()
    # The face is centred: its landmarks' centre is near the crop centre.
    assert np.abs(face.landmarks.mean(0) - 32).max() < 0.15 * 64
    # The 68 points follow the real face: eye and mouth-corner points land near the hand-measured ones.
    to_crop = 64 / side
    eyes = (ASTRONAUT_EYES - (x0, y0)) * to_crop
    found_eyes = np.stack([face.landmarks[36:42].mean(0), face.landmarks[42:48].mean(0)])
    assert np.linalg.norm(found_eyes - eyes, axis=1).max() < 0.05 * 64
    mouth = (ASTRONAUT_MOUTH - (x0, y0)) * to_crop
    assert np.linalg.norm(face.landmarks[[48, 54]] - mouth, axis=1).max() < 0.08 * 64


def test_five_points_become_the_mean_shape_moved_onto_them():
    angle = math.radians(12)
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=np.float32)
    face = mean_shape(90, 90) @ turn.T + (40, 25)
    np.testing.assert_allclose(sixty_eight_from_five(five_from_68(face)), face, atol=1e-3)


def test_without_detection_or_a_face_the_whole_image_and_the_mean_shape_are_used(detector):
    flat = np.full((80, 120, 3), 128, np.uint8)
    aligned = prepare_face(flat, 64, detector=None, points=5)
    assert aligned.face_found is None and aligned.box == (0, 0, 120, 80)
    np.testing.assert_array_equal(aligned.landmarks, mean_shape(64, 64, 5))
    missed = prepare_face(flat, 64, detector=detector, points=68)
    assert missed.face_found is False and missed.box == (0, 0, 120, 80)
    np.testing.assert_array_equal(missed.landmarks, mean_shape(64, 64, 68))
    assert prepare_face(flat, 64, detector=detector, points=None).landmarks is None


def check_prediction(prediction) -> None:
    values = np.array([prediction.probabilities[name] for name in EXPRESSIONS])
    assert abs(values.sum() - 1) < 1e-5 and (values >= 0).all()
    assert prediction.label == EXPRESSIONS[int(values.argmax())] and prediction.confidence == values.max()
    assert prediction.error is None


def test_lldif_predictions_are_distributions_and_repeat_with_the_seed(lldif_run, photos, detector):
    model = Run(lldif_run).load_model()
    paths = [photos / "astronaut.png", photos / "dark" / "astronaut_dark.png", photos / "synthetic.png"]
    first = predict_images(model, paths, batch_size=2, seed=3, progress=False)
    assert [p.path for p in first] == [str(path) for path in paths]
    assert [p.face_found for p in first[:2]] == [True, True]
    for prediction in first:
        check_prediction(prediction)
    assert predict_images(model, paths, batch_size=2, seed=3, progress=False) == first


def test_baseline_without_detection_reports_unreadable_files_and_no_face_column(baseline_run, photos):
    model = Run(baseline_run).load_model()
    predictions = predict_images(model, [photos / "synthetic.png", photos / "broken.jpg"], detect=False,
                                 progress=False)
    check_prediction(predictions[0])
    assert predictions[0].face_found is None
    broken = predictions[1]
    assert broken.label is None and broken.probabilities == {} and "not an image" in broken.error
    assert broken.describe().startswith(f"{photos / 'broken.jpg'}: unreadable (")


def test_folder_writes_a_csv_row_per_image_with_errors(baseline_run, photos, detector, tmp_path, monkeypatch,
                                                       capsys):
    monkeypatch.chdir(tmp_path)
    main(["predict", str(photos), "--model", baseline_run, "--quiet"])
    lines = capsys.readouterr().out.splitlines()
    with open(tmp_path / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == CSV_COLUMNS
    expected = ["astronaut.png", "broken.jpg", "dark/astronaut_dark.png", "synthetic.png"]
    assert [row["path"] for row in rows] == [str(photos / name) for name in expected]
    broken = rows[1]
    assert broken["label"] == "" and "not an image" in broken["error"] and broken["surprise"] == ""
    for row, line in zip(rows, lines, strict=False):
        if row["error"]:
            continue
        values = [float(row[name]) for name in EXPRESSIONS]
        assert abs(sum(values) - 1) < 1e-4 and row["label"] == EXPRESSIONS[int(np.argmax(values))]
        assert line == f"{row['path']}: {row['label']} {float(row['confidence']):.2f}"
    assert [row["face_found"] for row in rows[:3]] == ["true", "", "true"]
    assert rows[3]["face_found"] in ("true", "false")
    assert lines[-1] == "predict: 4 images -> predictions.csv"


def test_single_image_without_detection_prints_the_argmax(lldif_run, photos, capsys):
    image = photos / "synthetic.png"
    main(["predict", str(image), "--model", lldif_run, "--no-detect", "--seed", "1", "--device", "cpu"])
    captured = capsys.readouterr()
    expected = predict_images(Run(lldif_run).load_model(), [image], detect=False, seed=1, progress=False)[0]
    assert captured.out == f"{image}: {expected.label} {expected.confidence:.2f}\n"
    assert captured.err == ""


def test_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--help"])
    assert stop.value.code == 0
    assert "facial expression" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing image", "not a run", "empty folder", "unreadable image"])
def test_bad_arguments_end_with_one_line(case, lldif_run, photos, tmp_path, capsys):
    target, run_dir, named = str(photos / "synthetic.png"), lldif_run, "IMAGE_OR_FOLDER"
    if case == "missing image":
        target = str(tmp_path / "missing.jpg")
    elif case == "not a run":
        run_dir, named = str(photos), "--model"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        target = str(tmp_path / "empty")
    else:
        target = str(photos / "broken.jpg")
    with pytest.raises(SystemExit) as stop:
        main(["predict", target, "--model", run_dir, "--no-detect"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"lldif predict: error: {named}") and "Traceback" not in error
