"""Dataset readers on tiny fake trees in each layout, and the bad data every reader must survive."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lldif.data.dataset import default_caption
from lldif.data.face_layout import mean_shape
from lldif.data.ferplus import VOTE_COLUMNS, FERPlus, majority_label
from lldif.data.folder import ImageFolder
from lldif.data.images import ImageReadError, read_rgb, to_rgb, write_atomic, write_rgb
from lldif.data.kdef import KDEF
from lldif.data.labels import EXPRESSIONS, label_index
from lldif.data.landmark_cache import LandmarkTable, save_landmarks
from lldif.data.rafdb import RAFDB


def face(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def save(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def test_label_order_and_synonyms():
    assert EXPRESSIONS == ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
    assert [label_index(n) for n in ("Surprised", "AF", "disgusted", "happy", "SAD", "angry", "ne")] == list(range(7))
    with pytest.raises(ValueError, match="unknown expression label 'contempt'"):
        label_index("contempt")


# RAF-DB ---------------------------------------------------------------------------------------------------------


def make_rafdb(root: Path, lines: list[str], missing: tuple[str, ...] = ()) -> None:
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for seed, line in enumerate(lines):
        name = line.split()[0]
        if name not in missing:
            save(root / "Image" / "aligned" / name.replace(".jpg", "_aligned.jpg"), face(seed))


def test_rafdb_reads_both_splits_with_its_label_order(tmp_path):
    lines = [f"train_{i:05d}.jpg {i % 7 + 1}" for i in range(1, 15)]
    lines += [f"test_{i:04d}.jpg {i % 7 + 1}" for i in (1, 2, 3)]
    make_rafdb(tmp_path, lines, missing=("train_00014.jpg",))
    train, test = RAFDB(tmp_path, "train"), RAFDB(tmp_path, "test")
    assert len(train) == 13 and len(test) == 3
    assert [s.key for s in train.skipped] == ["Image/aligned/train_00014_aligned.jpg"]
    assert train.skipped[0].reason == "file not found"
    sample = train[0]
    assert sample.key == "Image/aligned/train_00001_aligned.jpg"
    assert sample.label == 1 and EXPRESSIONS[sample.label] == "fear"  # RAF-DB label 2 is Fear
    assert sample.image.shape == (24, 24, 3) and sample.image.dtype == np.uint8
    np.testing.assert_array_equal(sample.landmarks, mean_shape(24, 24))
    assert sample.caption == default_caption(1) == "a photo of a fearful face"
    assert test.class_counts()["happiness"] == 1


@pytest.mark.parametrize(("line", "message"), [
    ("train_00001.jpg 8", r"list_patition_label.txt:2: unknown label 8"),
    ("train_00001.jpg", r"list_patition_label.txt:2: expected"),
    ("val_00001.jpg 3", r"list_patition_label.txt:2: expected"),
    ("train_00001.jpg happy", r"list_patition_label.txt:2: expected"),
])
def test_rafdb_malformed_label_file_fails_before_training(tmp_path, line, message):
    make_rafdb(tmp_path, ["train_00002.jpg 1", line])
    with pytest.raises(ValueError, match=message):
        RAFDB(tmp_path)


def test_rafdb_missing_label_file_and_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="root: RAF-DB folder not found"):
        RAFDB(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="RAF-DB label file not found"):
        RAFDB(tmp_path)


# FERPlus --------------------------------------------------------------------------------------------------------


def votes_for(label: str) -> list[int]:
    votes = [0] * len(VOTE_COLUMNS)
    votes[VOTE_COLUMNS.index(label)] = 7
    votes[VOTE_COLUMNS.index("unknown")] = 1
    return votes


FERPLUS_ROWS = [  # (usage, votes, pixels-ok)
    ("Training", votes_for("happiness"), True),
    ("Training", votes_for("fear"), True),
    ("Training", votes_for("contempt"), True),           # non-basic majority: left out
    ("Training", [5, 5, 0, 0, 0, 0, 0, 0, 0, 0], True),  # tie: left out
    ("Training", votes_for("neutral"), False),           # bad pixel row: left out
    ("PublicTest", votes_for("anger"), True),
    ("PrivateTest", votes_for("surprise"), True),
]


def make_ferplus_tables(root: Path, rows=FERPLUS_ROWS, extra_label_row: bool = False) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "fer2013.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["emotion", "pixels", "Usage"])
        for i, (usage, _, ok) in enumerate(rows):
            pixels = np.full(48 * 48 if ok else 100, 10 * i)
            writer.writerow([0, " ".join(map(str, pixels)), usage])
    with open(root / "fer2013new.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["Usage", "Image name", *VOTE_COLUMNS])
        for i, (usage, votes, _) in enumerate(rows + rows[:1] if extra_label_row else rows):
            writer.writerow([usage, f"fer{i:07d}.png", *votes])


def test_majority_vote():
    assert majority_label(votes_for("disgust")) == label_index("disgust")
    assert majority_label([4, 4, 1, 0, 0, 0, 0, 0, 0, 0]) == "tied votes (neutral / happiness)"
    assert majority_label(votes_for("NF")) == "majority vote is NF"
    assert majority_label([0] * 10) == "no votes"


def test_ferplus_pixel_tables(tmp_path):
    make_ferplus_tables(tmp_path)
    train, test = FERPlus(tmp_path, "train"), FERPlus(tmp_path, "test")
    assert [r.key for r in train.records] == ["fer0000000.png", "fer0000001.png"]
    assert [r.label for r in train.records] == [label_index("happiness"), label_index("fear")]
    assert {s.key: s.reason for s in train.skipped} == {
        "fer0000002.png": "majority vote is contempt",
        "fer0000003.png": "tied votes (neutral / happiness)",
        "fer0000004.png": "pixel row 6 is not 48x48 values in 0-255",
    }
    assert [r.label for r in test.records] == [label_index("anger"), label_index("surprise")]
    image = train[1].image
    assert image.shape == (48, 48, 3) and (image == 10).all()


def test_ferplus_tables_must_agree(tmp_path):
    make_ferplus_tables(tmp_path, extra_label_row=True)
    with pytest.raises(ValueError, match="must have one row per face each; one of them ends at row 8"):
        FERPlus(tmp_path)
    (tmp_path / "fer2013.csv").unlink()
    with pytest.raises(FileNotFoundError, match="FER2013 pixels"):
        FERPlus(tmp_path)


def test_ferplus_malformed_votes(tmp_path):
    make_ferplus_tables(tmp_path, rows=[("Training", [1, 2, "x", 0, 0, 0, 0, 0, 0, 0], True)])
    with pytest.raises(ValueError, match=r"fer2013new.csv:2: expected 10 vote counts"):
        FERPlus(tmp_path)


def test_ferplus_folders(tmp_path):
    for folder, labels in (("FER2013Train", ("happiness", "contempt")), ("FER2013Valid", ("sadness",)),
                           ("FER2013Test", ("disgust",))):
        rows = []
        for i, label in enumerate(labels):
            save(tmp_path / folder / f"fer{i:07d}.png", np.full((48, 48), 50 * i, np.uint8)[:, :, None].repeat(3, 2))
            rows.append([f"fer{i:07d}.png", "(0, 0, 48, 48)", *votes_for(label)])
        with open(tmp_path / folder / "label.csv", "w", newline="") as file:
            csv.writer(file).writerows(rows)
    train, test = FERPlus(tmp_path, "train"), FERPlus(tmp_path, "test")
    assert [(r.key, r.label) for r in train.records] == [("FER2013Train/fer0000000.png", label_index("happy"))]
    assert train.skipped[0].reason == "majority vote is contempt"
    assert sorted(r.label for r in test.records) == sorted([label_index("sad"), label_index("disgust")])
    assert train[0].image.shape == (48, 48, 3)


def test_ferplus_without_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="no FERPlus labels"):
        FERPlus(tmp_path)


# KDEF -----------------------------------------------------------------------------------------------------------


def make_kdef(root: Path, subjects: int, angles=("FL", "HL", "S", "HR", "FR")) -> None:
    codes = ("AF", "AN", "DI", "HA", "NE", "SA", "SU")
    for session in "AB":
        for number in range(1, subjects + 1):
            gender, sid = ("F", number) if number <= 35 else ("M", number - 35)
            folder = root / f"{session}{gender}{sid:02d}"
            folder.mkdir(parents=True)
            for code in codes:
                for angle in angles:
                    (folder / f"{session}{gender}{sid:02d}{code}{angle}.JPG").touch()


def test_kdef_full_size_split_is_subject_disjoint_and_seeded(tmp_path):
    make_kdef(tmp_path, 70)
    (tmp_path / "AF01" / "notes.JPG").touch()
    train, test = KDEF(tmp_path, "train"), KDEF(tmp_path, "test")
    assert (len(train), len(test)) == (3920, 980)
    assert len(test.subjects) == 14 and not set(train.subjects) & set(test.subjects)
    assert [s.key for s in train.skipped] == ["AF01/notes.JPG"]
    assert train.class_counts() == {name: 560 for name in EXPRESSIONS}
    assert KDEF(tmp_path, "test", seed=0).subjects == test.subjects
    assert KDEF(tmp_path, "test", seed=1).subjects != test.subjects
    assert len(KDEF(tmp_path, "train", angles=("S",))) == 784


def test_kdef_labels_from_file_code(tmp_path):
    make_kdef(tmp_path, 3, angles=("S",))
    both = KDEF(tmp_path, "train").records + KDEF(tmp_path, "test").records
    by_code = {Path(r.key).stem[4:6]: EXPRESSIONS[r.label] for r in both}
    assert by_code == {"AF": "fear", "AN": "anger", "DI": "disgust", "HA": "happiness", "NE": "neutral",
                       "SA": "sadness", "SU": "surprise"}


def test_kdef_bad_arguments(tmp_path):
    make_kdef(tmp_path, 1, angles=("S",))
    with pytest.raises(ValueError, match="at least two subjects"):
        KDEF(tmp_path)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        KDEF(tmp_path, test_fraction=1.0)
    with pytest.raises(ValueError, match="angles must be among"):
        KDEF(tmp_path, angles=("UP",))
    with pytest.raises(ValueError, match="split must be one of train, test"):
        KDEF(tmp_path, split="val")


# class-per-folder -----------------------------------------------------------------------------------------------


def test_folder_with_and_without_split_folders(tmp_path):
    for split, names in (("train", ("happy", "Sad")), ("test", ("happy",))):
        for name in names:
            for i in range(2):
                save(tmp_path / "split" / split / name / f"{i}.png", face(i))
    save(tmp_path / "flat" / "angry" / "a.jpg", face(0))
    train = ImageFolder(tmp_path / "split", "train")
    assert [(r.key, EXPRESSIONS[r.label]) for r in train.records] == [
        ("train/Sad/0.png", "sadness"), ("train/Sad/1.png", "sadness"),
        ("train/happy/0.png", "happiness"), ("train/happy/1.png", "happiness")]
    assert len(ImageFolder(tmp_path / "split", "test")) == 2
    assert len(ImageFolder(tmp_path / "flat", "test")) == 1


def test_folder_unknown_class_and_empty(tmp_path):
    save(tmp_path / "contempt" / "a.png", face(0))
    with pytest.raises(ValueError, match=r"folder .*contempt: unknown expression label 'contempt'"):
        ImageFolder(tmp_path)
    (tmp_path / "empty" / "happy").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no usable images"):
        ImageFolder(tmp_path / "empty")


def test_landmarks_and_captions_files_are_used(tmp_path):
    save(tmp_path / "happy" / "a.png", face(0))
    save(tmp_path / "happy" / "b.png", face(1))
    points = np.random.default_rng(0).uniform(0, 24, (1, 5, 2)).astype(np.float32)
    save_landmarks(tmp_path / "landmarks.npz", LandmarkTable(("happy/a.png",), points, np.array([True])))
    (tmp_path / "captions.json").write_text('{"happy/b.png": "a grinning face"}')
    dataset = ImageFolder(tmp_path)
    np.testing.assert_array_equal(dataset[0].landmarks, points[0])
    assert dataset[1].caption == "a grinning face" and dataset[0].caption == "a photo of a happy face"
    (tmp_path / "captions.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"captions\.json: must map image paths to caption strings"):
        ImageFolder(tmp_path)


# bad data -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "LA", "P", "P-transparent", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_pil_mode_reads_as_rgb(tmp_path, mode):
    rgb = face(3, 32)
    image = Image.fromarray(rgb)
    if mode in ("I;16", "I", "F"):
        grey = np.asarray(image.convert("L")).astype(np.uint16) * 257  # 8-bit grey spread over 16 bits
        image = Image.fromarray(grey.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    elif mode == "P-transparent":
        image = image.convert("P")
        image.info["transparency"] = 0
    else:
        image = image.convert(mode)
    out = to_rgb(image)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    if mode in ("I;16", "I"):  # 16-bit grey scaled to 8 bits by its full range
        np.testing.assert_array_equal(out[:, :, 0], np.asarray(Image.fromarray(rgb).convert("L")))
    suffix = ".tif" if mode in ("I", "F", "CMYK", "I;16") else ".png"
    path = tmp_path / f"image{suffix}"
    image.save(path)
    assert read_rgb(path).shape == (32, 32, 3)


def test_alpha_is_composited_onto_black():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:10, :, 3] = 255
    out = to_rgb(Image.fromarray(rgba, "RGBA"))
    assert (out[:10] == 200).all() and (out[10:] == 0).all()


def make_bad_files(folder: Path) -> None:
    save(folder / "good.jpg", face(0, 64))
    save(folder / "small.png", face(1, 8))
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "empty.jpg").write_bytes(b"")


@pytest.mark.parametrize(("name", "reason"), [
    ("small.png", r"too small \(8x8"), ("truncated.jpg", "corrupt or truncated"),
    ("corrupt.png", "not an image Pillow can read"), ("empty.jpg", "not an image Pillow can read"),
    ("absent.jpg", "file not found"),
])
def test_bad_files_raise_image_read_error(tmp_path, name, reason):
    make_bad_files(tmp_path)
    with pytest.raises(ImageReadError, match=reason) as error:
        read_rgb(tmp_path / name)
    assert error.value.path == str(tmp_path / name)


def test_bad_images_are_dropped_before_training_and_listed(tmp_path):
    make_bad_files(tmp_path / "data" / "happy")
    dataset = ImageFolder(tmp_path / "data")
    assert len(dataset) == 5
    dropped = dataset.drop_unreadable(progress=False)
    assert [r.key for r in dataset.records] == ["happy/good.jpg"]
    assert sorted(s.key for s in dropped) == ["happy/corrupt.png", "happy/empty.jpg", "happy/small.png",
                                              "happy/truncated.jpg"]
    listing = dataset.write_skipped(tmp_path / "run")
    rows = list(csv.reader(listing.open()))
    assert rows[0] == ["key", "reason"] and len(rows) == 5
    assert {row[0] for row in rows[1:]} == {s.key for s in dropped}
    assert all(dataset[0].image.shape == (64, 64, 3) for _ in range(2))


def test_dataset_with_only_bad_images_fails_clearly(tmp_path):
    folder = tmp_path / "happy"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"junk")
    dataset = ImageFolder(tmp_path)
    with pytest.raises(ValueError, match="none of the 1 images can be read"):
        dataset.drop_unreadable(progress=False)


def test_atomic_write_keeps_the_old_file_on_failure_and_the_usual_mode(tmp_path):
    target = tmp_path / "out.png"
    write_rgb(target, face(0))
    (tmp_path / "plain").write_bytes(b"")
    assert target.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    before = target.read_bytes()

    def fail(file):
        file.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "plain"]
    with pytest.raises(ValueError, match="rgb must be an"):
        write_rgb(target, face(0).astype(np.float32))
