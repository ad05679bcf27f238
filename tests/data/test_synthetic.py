"""The synthetic expression faces: shapes, determinism, balance, landmarks that match the drawing, expressions
that move the right features, captions, the dataset writer and the `lldif synth` command."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lldif.cli import main
from lldif.data.face_layout import mean_shape
from lldif.data.images import read_rgb
from lldif.data.labels import EXPRESSIONS, NUM_CLASSES, label_index
from lldif.data.landmark_cache import LANDMARKS_FILE, load_landmarks
from lldif.data.synthetic import (
    CAPTIONS_FILE,
    TEST_INDEX_START,
    SyntheticFace,
    SyntheticFaceDataset,
    SyntheticFaceGenerator,
    write_synthetic_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Every word a caption may use for an expression (the two-letter dataset codes are left out: "an" is English).
EXPRESSION_VOCABULARY = {"surprised", "surprise", "afraid", "scared", "fearful", "fear", "disgusted", "disgust",
                         "happy", "happiness", "sad", "sadness", "angry", "anger", "neutral", "calm"}
LUMA = np.array([0.299, 0.587, 0.114])


def pixel(image: np.ndarray, point: np.ndarray) -> np.ndarray:
    """The colour of the pixel that contains a continuous landmark coordinate."""
    x, y = np.floor(point).astype(int)
    return image[y, x].astype(np.float64)


def cheek(landmarks: np.ndarray) -> np.ndarray:
    """A point on the image-left cheek, halfway between the jaw and the nose wing."""
    return (landmarks[1] + landmarks[31]) / 2


def face_hash(face: SyntheticFace) -> str:
    digest = hashlib.sha256(face.image.tobytes())
    digest.update(face.landmarks.tobytes())
    digest.update(face.caption.encode())
    return digest.hexdigest()


@pytest.mark.parametrize("size", [64, 112, 224])
def test_faces_have_the_documented_types_and_shapes(size):
    generator = SyntheticFaceGenerator(seed=3, size=size)
    for index in range(NUM_CLASSES):
        face = generator.render(index)
        assert face.image.shape == (size, size, 3) and face.image.dtype == np.uint8
        assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
        assert face.label == index % NUM_CLASSES
        assert isinstance(face.caption, str) and face.caption
        assert (face.intensity == 0.0) == (EXPRESSIONS[face.label] == "neutral")
        assert 0.0 <= face.intensity <= 1.0
        assert face.image.std() > 20  # a drawn face, not a flat fill


def test_a_face_is_a_pure_function_of_seed_index_and_size():
    first, again = SyntheticFaceGenerator(7, 64).render(11), SyntheticFaceGenerator(7, 64).render(11)
    assert face_hash(first) == face_hash(again)
    assert not np.array_equal(first.image, SyntheticFaceGenerator(8, 64).render(11).image)
    assert not np.array_equal(first.image, SyntheticFaceGenerator(7, 64).render(18).image)  # same class
    assert face_hash(SyntheticFaceGenerator(np.int64(7), 64).render(np.int64(11))) == face_hash(first)
    script = ("import hashlib; from lldif.data.synthetic import SyntheticFaceGenerator as G; f = G(7, 64).render(11); "
              "d = hashlib.sha256(f.image.tobytes()); d.update(f.landmarks.tobytes()); d.update(f.caption.encode()); "
              "print(d.hexdigest())")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    other_process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                   cwd=REPO_ROOT, env=environment)
    assert other_process.stdout.strip() == face_hash(first)


def test_landmarks_scale_with_the_image_size():
    small, large = SyntheticFaceGenerator(5, 64).render(4), SyntheticFaceGenerator(5, 224).render(4)
    np.testing.assert_allclose(small.landmarks * (224 / 64), large.landmarks, rtol=1e-5)
    assert small.caption == large.caption and small.label == large.label


def test_labels_are_balanced_and_splits_disjoint():
    generator = SyntheticFaceGenerator(0, 64)
    labels = [generator.render(index).label for index in range(3 * NUM_CLASSES)]
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [3] * NUM_CLASSES
    train, test = SyntheticFaceDataset(14, "train", size=64), SyntheticFaceDataset(14, "test", size=64)
    assert len(train) == len(test) == 14
    assert [test[item].label for item in range(14)] == [item % NUM_CLASSES for item in range(14)]
    assert test.first_index == TEST_INDEX_START
    train_hashes = {face_hash(train[item]) for item in range(14)}
    assert train_hashes.isdisjoint(face_hash(test[item]) for item in range(14))
    with pytest.raises(IndexError):
        train[14]


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="size"):
        SyntheticFaceGenerator(size=16)
    with pytest.raises(ValueError, match="seed"):
        SyntheticFaceGenerator(seed=-1)
    with pytest.raises(ValueError, match="index"):
        SyntheticFaceGenerator().render(-1)
    with pytest.raises(ValueError, match="label"):
        SyntheticFaceGenerator().render(0, label=NUM_CLASSES)
    with pytest.raises(ValueError, match="split"):
        SyntheticFaceDataset(7, split="validation")
    with pytest.raises(ValueError, match="per_class"):
        write_synthetic_dataset("unused", per_class=0, split="train")


@pytest.mark.parametrize("size", [64, 112, 224])
def test_landmarks_lie_inside_the_image(size):
    generator = SyntheticFaceGenerator(1, size)
    points = np.stack([generator.render(index).landmarks for index in range(70)])
    assert points.min() >= 0 and points.max() < size


def test_landmarks_sit_on_the_drawn_eyes():
    """Within a pixel of each eye's landmark centre lies the dark pupil, far darker than the cheek's skin."""
    generator = SyntheticFaceGenerator(2, 112)
    for index in range(42):
        face = generator.render(index)
        luminance = face.image @ LUMA
        skin = pixel(face.image, cheek(face.landmarks)) @ LUMA
        for eye in (face.landmarks[36:42], face.landmarks[42:48]):
            x, y = np.floor((eye[0] + eye[3]) / 2).astype(int)
            assert luminance[y - 1:y + 2, x - 1:x + 2].min() < 0.5 * skin, index


def test_open_mouths_are_dark_between_the_inner_lips():
    generator = SyntheticFaceGenerator(4, 112)
    checked = 0
    for index in range(EXPRESSIONS.index("surprise"), 280, NUM_CLASSES):
        face = generator.render(index)
        top, bottom = face.landmarks[62], face.landmarks[66]
        if bottom[1] - top[1] < 4:
            continue
        between = [pixel(face.image, top + (bottom - top) * t) @ LUMA for t in np.linspace(0.4, 0.8, 5)]
        assert min(between) < 0.5 * (pixel(face.image, cheek(face.landmarks)) @ LUMA), index
        checked += 1
    assert checked >= 15


def expression_measures(landmarks: np.ndarray) -> dict[str, float]:
    """Face-frame measures (in eye distances, y down) of what action units move."""
    across = landmarks[45] - landmarks[36]
    eye_distance = np.linalg.norm(across)
    right = across / eye_distance
    down = np.array([-right[1], right[0]])

    def height(point: np.ndarray) -> float:
        return float(point @ down) / eye_distance

    eyes_y = (height(landmarks[36]) + height(landmarks[45])) / 2
    return {
        "corner lift": height(landmarks[[62, 66]].mean(0)) - height(landmarks[[48, 54]].mean(0)),
        "inner brow height": eyes_y - height(landmarks[[21, 22]].mean(0)),
        "brow height": eyes_y - height(landmarks[17:27].mean(0)),
        "eye opening": height(landmarks[[40, 41, 46, 47]].mean(0)) - height(landmarks[[37, 38, 43, 44]].mean(0)),
        "mouth opening": height(landmarks[66]) - height(landmarks[62]),
        "mouth width": float(np.linalg.norm(landmarks[54] - landmarks[48])) / eye_distance,
        "brow gap": float(np.linalg.norm(landmarks[22] - landmarks[21])) / eye_distance,
        "nose to lip": height(landmarks[51]) - height(landmarks[33]),
    }


# How each expression moves the face compared with the same person's neutral face (+1 up, -1 down).
EXPECTED_CHANGES = {
    "happiness": {"corner lift": +1},
    "sadness": {"corner lift": -1, "inner brow height": +1},
    "surprise": {"brow height": +1, "eye opening": +1, "mouth opening": +1},
    "fear": {"inner brow height": +1, "eye opening": +1, "mouth width": +1},
    "anger": {"inner brow height": -1, "brow gap": -1, "eye opening": -1},
    "disgust": {"nose to lip": -1, "inner brow height": -1},
}


@pytest.mark.parametrize("expression", list(EXPECTED_CHANGES))
def test_expressions_move_the_features_they_should(expression):
    """The same 30 people, neutral and with the expression: the prototype's features move the right way."""
    generator = SyntheticFaceGenerator(6, 112)
    neutral, expressive = [], []
    for person in range(30):
        neutral.append(expression_measures(generator.render(person, label_index("neutral")).landmarks))
        expressive.append(expression_measures(generator.render(person, label_index(expression)).landmarks))
    for measure, sign in EXPECTED_CHANGES[expression].items():
        change = sign * np.array([e[measure] - n[measure] for e, n in zip(expressive, neutral, strict=True)])
        assert change.mean() > 0.01, measure
        assert (change > 0).mean() >= 0.7, measure


def test_captions_are_synthetic_varied_and_name_the_label():
    generator = SyntheticFaceGenerator(9, 64)
    faces = [generator.render(index) for index in range(70)]
    for face in faces:
        assert "synthetic" in face.caption
        words = set(face.caption.replace(",", " ").replace("-", " ").split())
        assert {label_index(word) for word in words & EXPRESSION_VOCABULARY} == {face.label}, face.caption
    assert len({face.caption for face in faces}) == len(faces)
    assert any("lit from" in face.caption for face in faces) and any("tilted" in face.caption for face in faces)


def test_classes_overlap_but_are_learnable():
    """Linear classifiers on held-out faces: well above chance (1/7) from aligned pixels, and below 100%
    even from the exact landmark geometry, because intensities and action-unit noise make classes overlap."""
    size, crop = 64, 32
    generator = SyntheticFaceGenerator(0, size)
    reference = mean_shape(crop, crop).astype(np.float64)
    centred_reference = reference - reference.mean(0)

    def aligned_pixels(face: SyntheticFace) -> np.ndarray:
        # Least-squares similarity taking crop coordinates to image coordinates; PIL's AFFINE wants exactly that.
        rows = np.zeros((136, 4))
        rows[0::2] = np.c_[reference[:, 0], -reference[:, 1], np.ones(68), np.zeros(68)]
        rows[1::2] = np.c_[reference[:, 1], reference[:, 0], np.zeros(68), np.ones(68)]
        a, b, shift_x, shift_y = np.linalg.lstsq(rows, face.landmarks.astype(np.float64).ravel(), rcond=None)[0]
        grey = Image.fromarray(face.image).convert("L")
        crop_image = grey.transform((crop, crop), Image.Transform.AFFINE, (a, -b, shift_x, b, a, shift_y),
                                    Image.Resampling.BILINEAR)
        values = np.asarray(crop_image, dtype=np.float64).ravel()
        return (values - values.mean()) / (values.std() + 1e-6)

    def aligned_landmarks(face: SyntheticFace) -> np.ndarray:
        points = face.landmarks.astype(np.float64)
        points = points - points.mean(0)
        u, _, vt = np.linalg.svd(points.T @ centred_reference)
        rotated = points @ (u @ vt)
        return (rotated / np.linalg.norm(rotated)).ravel()

    def held_out_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                          ridge: float) -> float:
        mean, std = train.mean(0), train.std(0) + 1e-9
        design = np.c_[(train - mean) / std, np.ones(len(train))]
        weights = np.linalg.solve(design.T @ design + ridge * len(train) * np.eye(design.shape[1]),
                                  design.T @ np.eye(NUM_CLASSES)[train_labels])
        scores = np.c_[(test - mean) / std, np.ones(len(test))] @ weights
        return float((scores.argmax(1) == test_labels).mean())

    train_faces = [generator.render(index) for index in range(1400)]
    test_faces = [generator.render(TEST_INDEX_START + index) for index in range(700)]
    train_labels = np.array([face.label for face in train_faces])
    test_labels = np.array([face.label for face in test_faces])
    pixel_accuracy = held_out_accuracy(np.stack([aligned_pixels(f) for f in train_faces]), train_labels,
                                       np.stack([aligned_pixels(f) for f in test_faces]), test_labels, ridge=0.1)
    geometry_accuracy = held_out_accuracy(np.stack([aligned_landmarks(f) for f in train_faces]), train_labels,
                                          np.stack([aligned_landmarks(f) for f in test_faces]), test_labels,
                                          ridge=1e-3)
    assert pixel_accuracy > 0.4
    assert 0.6 < geometry_accuracy < 0.97


def test_write_synthetic_dataset_writes_a_resumable_class_tree(tmp_path, monkeypatch):
    write_synthetic_dataset(tmp_path, per_class=2, split="train", seed=1, size=64, progress=False)
    images = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*.png"))
    assert len(images) == 2 * NUM_CLASSES
    assert "train/surprise/train_000000.png" in images and "train/neutral/train_000013.png" in images
    for relative in images:
        assert EXPRESSIONS.index(relative.split("/")[1]) == int(relative[-10:-4]) % NUM_CLASSES

    table = load_landmarks(tmp_path / LANDMARKS_FILE)
    captions = json.loads((tmp_path / CAPTIONS_FILE).read_text(encoding="utf-8"))
    assert sorted(table.paths) == images and sorted(captions) == images and table.found.all()
    expected = SyntheticFaceDataset(14, "train", seed=1, size=64)[13]
    path = "train/neutral/train_000013.png"
    np.testing.assert_array_equal(table.as_dict()[path], expected.landmarks)
    np.testing.assert_array_equal(read_rgb(tmp_path / path), expected.image)
    assert captions[path] == expected.caption

    write_synthetic_dataset(tmp_path, per_class=1, split="test", seed=1, size=64, progress=False)
    merged = load_landmarks(tmp_path / LANDMARKS_FILE).paths
    assert len(merged) == 3 * NUM_CLASSES and "test/fear/test_000001.png" in merged
    assert len(json.loads((tmp_path / CAPTIONS_FILE).read_text(encoding="utf-8"))) == 3 * NUM_CLASSES

    # A rerun renders only what is missing.
    (tmp_path / path).unlink()
    rendered = []
    original_render = SyntheticFaceGenerator.render

    def counting_render(self, index, label=None):
        rendered.append(index)
        return original_render(self, index, label)

    monkeypatch.setattr(SyntheticFaceGenerator, "render", counting_render)
    write_synthetic_dataset(tmp_path, per_class=2, split="train", seed=1, size=64, progress=False)
    assert rendered == [13]
    np.testing.assert_array_equal(read_rgb(tmp_path / path), expected.image)
    assert len(load_landmarks(tmp_path / LANDMARKS_FILE).paths) == 3 * NUM_CLASSES


def test_write_synthetic_dataset_names_a_corrupt_captions_file(tmp_path):
    (tmp_path / CAPTIONS_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=CAPTIONS_FILE):
        write_synthetic_dataset(tmp_path, per_class=1, split="train", size=64, progress=False)


def test_synth_command_writes_both_splits(tmp_path):
    main(["synth", str(tmp_path), "--per-class", "1", "--test-per-class", "1", "--size", "64", "--seed", "2",
          "--quiet"])
    assert len(list((tmp_path / "train").rglob("*.png"))) == NUM_CLASSES
    assert len(list((tmp_path / "test").rglob("*.png"))) == NUM_CLASSES
    assert len(load_landmarks(tmp_path / LANDMARKS_FILE).paths) == 2 * NUM_CLASSES


def test_synth_command_reports_an_unusable_out_dir_in_one_line(tmp_path, capsys):
    (tmp_path / CAPTIONS_FILE).write_text("[]", encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path), "--per-class", "1", "--size", "64", "--quiet"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "OUT_DIR" in errors[0] and CAPTIONS_FILE in errors[0]


@pytest.mark.parametrize(("arguments", "named"), [
    (["--per-class", "0"], "--per-class"),
    (["--per-class", "two"], "--per-class"),
    (["--per-class", "1", "--size", "8"], "--size"),
    (["--per-class", "1", "--seed", "-3"], "--seed"),
    (["--per-class", "1", "--test-per-class", "-1"], "--test-per-class"),
])
def test_synth_command_rejects_bad_arguments_in_one_line(tmp_path, capsys, arguments, named):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", str(tmp_path), *arguments])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and named in errors[0]
