"""The data module: batch contents, POSTER++ augmentations with landmarks, repeatable order across workers, and
landmarks detected in the images as the model sees them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lldif.data.dataset import FaceSample
from lldif.data.folder import ImageFolder
from lldif.data.landmark_cache import load_landmarks
from lldif.data.landmarks import LandmarkDetector, landmark_file_name
from lldif.data.loader import IMAGENET_MEAN, IMAGENET_STD, Augmentation, FaceDataModule, open_dataset
from lldif.data.lowlight import LowLight
from lldif.data.synthetic import SyntheticFaceDataset


class Dots:
    """Faces that are black with one white pixel at landmark 0 (the jaw's left end), so any geometric transform
    of the image must move landmark 0 with the pixel."""

    def __init__(self, count: int, size: int = 32) -> None:
        self.count, self.size = count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> FaceSample:
        rng = np.random.default_rng(index)
        points = rng.uniform(2, self.size - 2, (68, 2)).astype(np.float32)
        image = np.zeros((self.size, self.size, 3), np.uint8)
        x, y = points[0].astype(int)
        image[y, x] = 255
        points[0] = (x + 0.5, y + 0.5)
        return FaceSample(image, index % 7, points, f"caption {index}", f"face{index}")


def bright_pixel(image: torch.Tensor) -> tuple[int, int]:
    y, x = np.unravel_index(int(image[0].argmax()), image.shape[1:])
    return int(x), int(y)


def collect(loader) -> list:
    return [(b.image.clone(), b.label.clone(), b.landmarks.clone(), b.key) for b in loader]


def same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) and x[3] == y[3] for x, y in zip(a, b, strict=True))


def test_batch_contents_and_normalisation():
    module = FaceDataModule(Dots(10), Dots(5), image_size=32, batch_size=4, progress=False)
    batch = next(iter(module.test_dataloader()))
    assert batch.image.shape == (4, 3, 32, 32) and batch.image.dtype == torch.float32
    assert batch.label.tolist() == [0, 1, 2, 3] and batch.landmarks.shape == (4, 68, 2)
    assert batch.key == ["face0", "face1", "face2", "face3"] and batch.caption_embedding is None
    black = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    torch.testing.assert_close(batch.image[0, :, 0, 0], black)
    assert len(module.test_dataloader()) == 2


def test_flip_moves_landmarks_with_the_pixels():
    module = FaceDataModule(Dots(40), Dots(1), image_size=32, batch_size=40,
                            augmentation=Augmentation(flip_p=0.5, erasing_p=0.0), progress=False)
    batch = next(iter(module.train_dataloader()))
    flipped = 0
    for image, points, key in zip(batch.image, batch.landmarks, batch.key, strict=True):
        original = Dots(40)[int(key[4:])].landmarks
        # after a flip, image-left jaw point 0 is renumbered 16
        index = 0 if np.allclose(points[0], original[0]) else 16
        flipped += index == 16
        x, y = bright_pixel(image)
        assert points[index].tolist() == pytest.approx([x + 0.5, y + 0.5])
    assert 8 < flipped < 32


def test_resize_scales_landmarks():
    module = FaceDataModule(Dots(3, size=64), Dots(3, size=64), image_size=32, batch_size=3, progress=False)
    batch = next(iter(module.test_dataloader()))
    for i in range(3):
        np.testing.assert_allclose(batch.landmarks[i].numpy(), Dots(3, 64)[i].landmarks / 2, rtol=1e-6)


def test_random_erasing_covers_the_configured_area():
    augmentation = Augmentation(flip_p=0.0, erasing_p=1.0, erasing_scale=(0.05, 0.1))
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(200):
        erased = augmentation.erase(torch.ones(3, 40, 40), rng)
        fractions.append(float((erased[0] == 0).float().mean()))
    fractions = np.array(fractions)
    assert fractions.min() > 0.03 and fractions.max() < 0.12 and fractions.std() > 0.005
    assert torch.equal(Augmentation(erasing_p=0.0).erase(torch.ones(3, 8, 8), rng), torch.ones(3, 8, 8))


def test_order_and_augmentation_repeat_for_a_seed_and_differ_between_epochs():
    def module(seed, workers=0):
        return FaceDataModule(Dots(24), Dots(4), image_size=32, batch_size=5, seed=seed, workers=workers,
                              augmentation=Augmentation(erasing_p=1.0), progress=False)

    first = collect(module(3).train_dataloader(epoch=1))
    assert same(first, collect(module(3).train_dataloader(epoch=1)))
    assert same(first, collect(module(3, workers=2).train_dataloader(epoch=1)))
    assert [b[3] for b in first] != [b[3] for b in collect(module(3).train_dataloader(epoch=2))]
    assert [b[3] for b in first] != [b[3] for b in collect(module(4).train_dataloader(epoch=1))]
    keys = [k for b in first for k in b[3]]
    assert len(keys) == len(set(keys)) == 20  # 4 full batches of 5; the incomplete one is dropped
    assert set(keys) <= {f"face{i}" for i in range(24)}


def test_resumed_and_sharded_epochs_are_slices_of_the_same_order():
    module = FaceDataModule(Dots(24), Dots(5), image_size=32, batch_size=6, seed=1, progress=False)
    whole = [b.key for b in module.train_dataloader(epoch=2)]
    assert len(whole) == module.train_batches() == 4
    assert [b.key for b in module.train_dataloader(epoch=2, start_batch=3)] == whole[3:]
    shares = [[b.key for b in module.train_dataloader(epoch=2, rank=r, world_size=2)] for r in range(2)]
    assert [a + b for a, b in zip(*shares, strict=True)] == whole
    tests = [k for r in range(2) for b in module.test_dataloader(rank=r, world_size=2) for k in b.key]
    assert sorted(tests) == sorted(k for b in module.test_dataloader() for k in b.key)
    with pytest.raises(ValueError, match="divisible by the number of processes 4"):
        module.train_dataloader(rank=0, world_size=4)


def test_caption_embeddings_from_a_frozen_embedder_only():
    calls = []

    def frozen(texts):
        calls.append(list(texts))
        return torch.ones(len(texts), 6)

    module = FaceDataModule(Dots(4), Dots(4), image_size=32, batch_size=2, text_embedder=frozen, progress=False)
    batch = next(iter(module.test_dataloader()))
    assert batch.caption_embedding.shape == (2, 6) and calls == [["caption 0", "caption 1"]]
    trainable = torch.nn.Linear(1, 1)
    module = FaceDataModule(Dots(4), Dots(4), image_size=32, batch_size=2, text_embedder=trainable, progress=False)
    assert next(iter(module.test_dataloader())).caption_embedding is None


def test_lowlight_gets_each_image_and_its_key():
    seen = []

    def darken(image, key):
        seen.append(key)
        return image // 4

    module = FaceDataModule(Dots(3), Dots(3), image_size=32, batch_size=3, lowlight=darken, progress=False)
    batch = next(iter(module.test_dataloader()))
    assert seen == ["face0", "face1", "face2"]
    brightest = (batch.image[:, 0].amax(dim=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
    torch.testing.assert_close(brightest, torch.full((3,), 63.0), atol=1e-3, rtol=0)


def write_faces(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        path = root / "happy" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.startswith("bad"):
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(np.full((20, 20, 3), 10 * i, np.uint8)).save(path)


def test_bad_images_are_left_out_before_the_first_batch(tmp_path):
    write_faces(tmp_path / "data", ["a.png", "bad.png", "b.png"])
    dataset = ImageFolder(tmp_path / "data")
    module = FaceDataModule(dataset, ImageFolder(tmp_path / "data", "test"), image_size=16, batch_size=1,
                            run_dir=tmp_path / "run", progress=False)
    assert [s.key for s in module.skipped["train"]] == ["happy/bad.png"]
    assert (tmp_path / "run" / "folder_train_skipped_images.csv").read_text().splitlines()[1].startswith(
        "happy/bad.png,not an image")
    assert sorted(k for b in module.train_dataloader() for k in b.key) == ["happy/a.png", "happy/b.png"]
    assert module.summary() == (f"data: train 2 faces, 1 left out; test 2 faces, 1 left out (listed in "
                                f"{tmp_path / 'run' / 'folder_train_skipped_images.csv'}, "
                                f"{tmp_path / 'run' / 'folder_test_skipped_images.csv'})")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"image_size": 8}, "image_size must be an integer >= 16"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"workers": -1}, "workers must be an integer >= 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FaceDataModule(Dots(2), Dots(2), progress=False, **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"flip_p": 1.5}, r"flip_p must be in \[0, 1\]"),
    ({"erasing_scale": (0.2, 0.1)}, "erasing_scale must satisfy"),
    ({"erasing_ratio": (0.0, 1.0)}, "erasing_ratio must satisfy"),
])
def test_bad_augmentation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Augmentation(**kwargs)


def test_open_dataset_specs(tmp_path):
    write_faces(tmp_path / "data", ["a.png"])
    assert open_dataset(f"folder:{tmp_path / 'data'}", "train").records[0].key == "happy/a.png"
    assert len(open_dataset(str(tmp_path / "data"), "test")) == 1
    with pytest.raises(ValueError, match="unknown kind 'affectnet'"):
        open_dataset("affectnet:/x", "train")
    with pytest.raises(FileNotFoundError, match="RAF-DB folder not found"):
        open_dataset(f"rafdb:{tmp_path / 'none'}", "train")
    with pytest.raises(ValueError, match="write synthetic:N"):
        open_dataset("synthetic:many", "train")


def test_synthetic_low_light_batches():
    train, test = open_dataset("synthetic:14", "train", size=64), open_dataset("synthetic:7", "test", size=64)
    module = FaceDataModule(train, test, image_size=64, batch_size=7, lowlight=LowLight(seed=0), progress=False)
    batch = next(iter(module.test_dataloader()))
    assert batch.label.tolist() == list(range(7)) and batch.landmarks.shape == (7, 68, 2)
    assert batch.key[0] == "test/surprise/test_000000.png" and "synthetic" in batch.caption[0]
    pixels = batch.image * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert float(pixels.mean()) < 0.2  # the paper preset's mean brightness is 5-15 % of full scale
    again = next(iter(module.test_dataloader()))
    assert torch.equal(batch.image, again.image)


def test_detected_landmarks_in_batches_and_only_for_the_splits_used(tmp_path, monkeypatch):
    detect, seen = LandmarkDetector.detect, []

    def counted(self, rgb):
        seen.append(rgb.shape)
        return detect(self, rgb)

    monkeypatch.setattr(LandmarkDetector, "detect", counted)
    train, test = SyntheticFaceDataset(8, "train", size=112), SyntheticFaceDataset(7, "test", size=112)
    darken = LowLight(seed=0)
    module = FaceDataModule(train, test, image_size=64, batch_size=4, lowlight=darken, progress=False,
                            detect_landmarks="mtcnn", landmark_cache=tmp_path / "cache")
    assert seen == [] and module.detected == {}  # nothing is detected before a split is used
    batches = list(module.test_dataloader())
    assert len(seen) == 7 and list(module.detected) == ["test"]
    cache = tmp_path / "cache" / landmark_file_name(test, darken, "mtcnn")
    table = load_landmarks(cache)
    assert sorted(table.paths) == sorted(k for b in batches for k in b.key)
    points = dict(zip(table.paths, table.points, strict=True))
    for batch in batches:
        assert batch.landmarks.shape == (len(batch.key), 5, 2)
        for key, landmarks in zip(batch.key, batch.landmarks, strict=True):
            np.testing.assert_allclose(landmarks.numpy(), points[key] * 64 / 112, rtol=1e-6)
    assert module.summary() == f"data: train 8 faces, 0 left out; test 7 faces, 0 left out, landmarks found in " \
                               f"{int(table.found.sum())}"
    # The training split is detected when its batches are first asked for, into the same file, and only once.
    next(iter(module.train_dataloader(epoch=0)))
    assert len(seen) == 15 and set(module.detected) == {"train", "test"}
    list(module.train_dataloader(epoch=1))
    list(module.test_dataloader())
    assert len(seen) == 15 and len(load_landmarks(cache).paths) == 15


def test_detected_landmarks_need_a_cache_folder():
    faces = SyntheticFaceDataset(2, "test", size=64)
    with pytest.raises(ValueError, match="landmark_cache"):
        FaceDataModule(faces, faces, image_size=64, progress=False, detect_landmarks="mtcnn")
