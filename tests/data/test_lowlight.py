"""The low-light simulator: colour maths, determinism, how dark and noisy the presets are, and the converter."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lldif
from lldif.cli import main
from lldif.data.images import read_rgb, write_rgb
from lldif.data.lowlight import (
    PRESETS,
    LowLight,
    LowLightParams,
    convert_folder,
    image_rng,
    linear_to_srgb,
    sample_params,
    simulate_low_light,
    srgb_to_linear,
    white_balance_gains,
)

# The documented mean output brightness of each preset, as fractions of full scale.
PRESET_MEAN_RANGES = {"paper": (0.05, 0.15), "dark": (0.10, 0.30), "extreme": (0.015, 0.065)}
CLEAN = LowLightParams()  # the identity; each test turns on only what it studies


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    skimage_data = pytest.importorskip("skimage.data")
    cbook = pytest.importorskip("matplotlib.cbook")
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as grace_hopper:
        grace_hopper_rgb = np.asarray(grace_hopper.convert("RGB"))
    return {"astronaut": skimage_data.astronaut(), "chelsea": skimage_data.chelsea(), "grace_hopper": grace_hopper_rgb}


def flat(value: tuple[int, int, int] | int, size: int = 128) -> np.ndarray:
    return np.broadcast_to(np.array(value, dtype=np.uint8), (size, size, 3)).copy()


def linear_of(rgb: np.ndarray) -> np.ndarray:
    return srgb_to_linear(rgb / 255.0)


# --- colour maths ---------------------------------------------------------------------------------------------


def test_srgb_transfer_functions_invert_each_other_and_match_the_standard():
    encoded = np.linspace(0, 1, 10001)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(encoded)), encoded, atol=1e-12)
    assert srgb_to_linear(0.5) == pytest.approx(0.2140411, abs=1e-6)
    assert srgb_to_linear(0.04045) == pytest.approx(0.04045 / 12.92)  # the knee joins both pieces
    assert linear_to_srgb(1.0) == pytest.approx(1.0)


def test_identity_params_give_back_every_8_bit_value_exactly():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, :, :] = np.arange(64)[:, None] * 4 + np.arange(3)  # make sure the darkest codes are there
    np.testing.assert_array_equal(simulate_low_light(rgb, CLEAN, np.random.default_rng(0)), rgb)


# --- determinism ------------------------------------------------------------------------------------------------


def test_same_seed_and_key_give_identical_bytes_and_other_keys_or_seeds_differ():
    rgb = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    first = LowLight("paper", seed=7)(rgb, "train/0001.jpg")
    assert first.tobytes() == LowLight("paper", seed=7)(rgb, "train/0001.jpg").tobytes()
    assert not np.array_equal(first, LowLight("paper", seed=7)(rgb, "train/0002.jpg"))
    assert not np.array_equal(first, LowLight("paper", seed=8)(rgb, "train/0001.jpg"))
    rng = image_rng(7, "train/0001.jpg")
    np.testing.assert_array_equal(first, simulate_low_light(rgb, sample_params("paper", rng), rng))


def test_unseeded_transform_draws_fresh_randomness_and_seeded_needs_a_key():
    rgb = flat((90, 100, 110), 32)
    transform = LowLight("paper")
    assert not np.array_equal(transform(rgb), transform(rgb))
    with pytest.raises(ValueError, match="key"):
        LowLight("paper", seed=0)(rgb)
    with pytest.raises(ValueError, match="seed"):
        LowLight("paper", seed=-1)
    with pytest.raises(ValueError, match="preset"):
        LowLight("night")


# --- how dark the presets are ------------------------------------------------------------------------------------


def preset_corners(preset: str) -> tuple[LowLightParams, LowLightParams]:
    """The darkest and the brightest settings a preset can draw: together they bound every draw."""
    ranges = PRESETS[preset]
    return (LowLightParams(**{name: bounds[0] for name, bounds in ranges.items()}),
            LowLightParams(**{name: bounds[1] for name, bounds in ranges.items()}))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_setting_a_preset_can_draw_keeps_the_mean_in_its_documented_range(preset, photos):
    low, high = PRESET_MEAN_RANGES[preset]
    for name, rgb in photos.items():
        for params in preset_corners(preset):
            mean = simulate_low_light(rgb, params, np.random.default_rng(0)).mean() / 255
            assert low <= mean <= high, f"{preset} on {name} with {params}: mean {mean:.3f}"


def test_paper_preset_piles_the_histogram_into_the_lowest_bins(photos):
    for name, rgb in photos.items():
        for params in preset_corners("paper"):
            dark = simulate_low_light(rgb, params, np.random.default_rng(0))
            histogram = np.bincount(dark.ravel(), minlength=256) / dark.size
            assert histogram[:64].sum() >= 0.7, f"{name}: {histogram[:64].sum():.3f} of the values below 64"
            assert histogram[:32].sum() >= 0.4, f"{name}: {histogram[:32].sum():.3f} of the values below 32"
            assert histogram[128:].sum() == 0


# --- noise -------------------------------------------------------------------------------------------------------


def test_noise_variance_grows_with_signal_as_shot_plus_read_noise():
    shot, read = 1e-3, 2e-3
    params = replace(CLEAN, shot_noise=shot, read_noise=read, colour_noise=0.5)
    variances = {}
    for level in (64, 192):
        patch = flat((level, level, level - 1))  # not grey, so colour noise applies
        signal = linear_of(patch).mean()
        variances[level] = linear_of(simulate_low_light(patch, params, np.random.default_rng(level))).var()
        assert variances[level] == pytest.approx(shot * signal + read**2, rel=0.1)
    assert variances[192] > 5 * variances[64]


def test_read_noise_is_present_at_zero_signal_and_shot_noise_is_not():
    black = flat(0)
    read = 0.01
    noisy = linear_of(simulate_low_light(black, replace(CLEAN, read_noise=read), np.random.default_rng(0)))
    assert 0.45 <= (noisy > 0).mean() <= 0.55  # the negative half is clipped to black
    assert noisy.mean() == pytest.approx(read / math.sqrt(2 * math.pi), rel=0.1)  # mean of a half-normal
    shot_only = simulate_low_light(black, replace(CLEAN, shot_noise=0.01), np.random.default_rng(0))
    assert not shot_only.any()


def test_colour_noise_decorrelates_channels_and_grey_images_stay_grey():
    patch = flat((100, 110, 120))
    for share, expected in ((0.0, 1.0), (0.5, 0.5), (1.0, 0.0)):
        params = replace(CLEAN, read_noise=0.01, colour_noise=share)
        noisy = linear_of(simulate_low_light(patch, params, np.random.default_rng(0)))
        correlation = np.corrcoef(noisy[:, :, 0].ravel(), noisy[:, :, 2].ravel())[0, 1]
        assert correlation == pytest.approx(expected, abs=0.05)
    grey = np.repeat(np.random.default_rng(0).integers(0, 256, (64, 64, 1), dtype=np.uint8), 3, axis=2)
    out = LowLight("extreme", seed=0)(grey, "grey.png")
    assert np.array_equal(out[:, :, 0], out[:, :, 1]) and np.array_equal(out[:, :, 0], out[:, :, 2])


# --- white balance and tones -------------------------------------------------------------------------------------


def test_white_balance_shifts_channel_ratios_in_the_documented_direction():
    patch = flat((120, 128, 136))
    before = linear_of(patch)[0, 0]
    warmer = linear_of(simulate_low_light(patch, replace(CLEAN, temperature=0.5), np.random.default_rng(0)))[0, 0]
    assert (warmer[0] / warmer[2]) / (before[0] / before[2]) == pytest.approx(math.exp(0.6 * 0.5), rel=0.02)
    cooler = linear_of(simulate_low_light(patch, replace(CLEAN, temperature=-0.5), np.random.default_rng(0)))[0, 0]
    assert cooler[0] / cooler[2] < before[0] / before[2]
    magenta = linear_of(simulate_low_light(patch, replace(CLEAN, tint=0.5), np.random.default_rng(0)))[0, 0]
    assert magenta[1] / magenta[0] < before[1] / before[0]
    assert white_balance_gains(0.7, -0.4) @ np.array([0.2126, 0.7152, 0.0722]) == pytest.approx(1.0, rel=1e-6)


def test_highlights_and_shadows_bend_the_tone_curve_the_documented_way():
    ramp = np.repeat(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2), 2, axis=0)

    def curve(**sliders: float) -> np.ndarray:
        return simulate_low_light(ramp, replace(CLEAN, **sliders), np.random.default_rng(0))[0, :, 0].astype(int)

    levels = np.arange(256)
    for highlights in (-1.0, 1.0):
        for shadows in (-1.0, 1.0):
            assert np.all(np.diff(curve(highlights=highlights, shadows=shadows)) >= 0)  # never inverts tones
    pulled = curve(highlights=-1.0)
    pulled, raised = curve(highlights=-1.0), curve(highlights=1.0)
    assert np.all(pulled[140:240] <= levels[140:240] - 10) and np.all(raised[140:240] >= levels[140:240] + 10)
    assert np.all(np.abs(pulled[:40] - levels[:40]) <= 1) and pulled[255] == 255
    crushed, lifted = curve(shadows=-1.0), curve(shadows=1.0)
    assert np.all(crushed[20:130] <= levels[20:130] - 10) and np.all(lifted[20:130] >= levels[20:130] + 10)
    assert np.all(np.abs(crushed[220:] - levels[220:]) <= 1) and crushed[0] == 0


# --- parameters ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("exposure_ev", 1.0), ("exposure_ev", float("nan")), ("temperature", -1.5), ("tint", 2.0),
    ("highlights", -1.01), ("shadows", "dark"), ("shot_noise", -0.1), ("read_noise", 0.5),
    ("colour_noise", 1.2), ("bit_depth", 7), ("bit_depth", 12.0), ("display_gamma", 0.5),
])
def test_out_of_range_parameters_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LowLightParams(**{field: value})


def test_presets_only_draw_valid_parameters():
    rng = np.random.default_rng(0)
    for preset, ranges in PRESETS.items():
        LowLightParams(**{name: bounds[0] for name, bounds in ranges.items()})
        LowLightParams(**{name: bounds[1] for name, bounds in ranges.items()})
        params = sample_params(preset, rng)
        assert ranges["exposure_ev"][0] <= params.exposure_ev <= ranges["exposure_ev"][1]
    with pytest.raises(ValueError, match="preset"):
        sample_params("night", rng)


# --- converter ----------------------------------------------------------------------------------------------------


def make_dataset(root: Path) -> None:
    rows, columns = np.mgrid[0:40, 0:36]
    for index, name in enumerate(("Image/aligned/train_00001_aligned.jpg", "Image/aligned/test_0001_aligned.jpg",
                                  "Image/original/train_00001.png", "extra/deep/face.bmp")):
        smooth = np.stack([rows * 5 + index * 20, columns * 6, 200 - rows * 3], axis=2)  # photo-like gradients
        write_rgb(root / name, smooth.astype(np.uint8))
    Image.fromarray((rows * 6).astype(np.uint8), "L").save(root / "Image/grey.png")
    (root / "EmoLabel").mkdir()
    (root / "EmoLabel/list_patition_label.txt").write_text("train_00001.jpg 5\ntest_0001.jpg 1\n")
    (root / "fer2013new.csv").write_text("Usage,Image name,neutral\nTraining,fer0000000.png,10\n")
    (root / "Image/aligned/broken.jpg").write_bytes((root / "Image/aligned/test_0001_aligned.jpg").read_bytes()[:300])


def tree_hashes(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    make_dataset(tmp_path / "src")
    return tmp_path / "src"


def test_converter_keeps_structure_names_formats_and_labels_and_leaves_src_untouched(dataset, tmp_path):
    before = tree_hashes(dataset)
    dst = tmp_path / "dst"
    report = convert_folder(dataset, dst, preset="paper", seed=5, progress=False)
    assert tree_hashes(dataset) == before
    written = tree_hashes(dst)
    assert set(written) == (set(before) - {"Image/aligned/broken.jpg"}) | {"lowlight.json"}
    assert (report.converted, report.already_done, report.copied) == (5, 0, 2)
    assert [path for path, _ in report.unreadable] == ["Image/aligned/broken.jpg"]
    for label_file in ("EmoLabel/list_patition_label.txt", "fer2013new.csv"):
        assert written[label_file] == before[label_file]
    for key in ("Image/aligned/train_00001_aligned.jpg", "Image/original/train_00001.png", "extra/deep/face.bmp"):
        with Image.open(dataset / key) as source, Image.open(dst / key) as target:
            assert target.format == source.format and target.size == source.size
        expected = LowLight("paper", seed=5)(read_rgb(dataset / key), key)  # what the transform gives that key
        output = read_rgb(dst / key)
        if key.endswith(".jpg"):  # JPEG at quality 95 keeps the brightness; it smooths some of the fine noise
            assert abs(output.mean() - expected.mean()) < 0.5 and np.abs(output - expected.astype(int)).mean() < 4
        else:
            np.testing.assert_array_equal(output, expected)
        assert output.mean() < read_rgb(dataset / key).mean() / 2
    record = json.loads((dst / "lowlight.json").read_text())
    assert record["preset"] == "paper" and record["seed"] == 5 and record["complete"]
    assert record["lldif_version"] == lldif.__version__ and record["converted"] == 5
    assert record["unreadable"][0]["path"] == "Image/aligned/broken.jpg"


@pytest.mark.parametrize("where", ["same", "dst inside src", "src inside dst"])
def test_converter_never_writes_inside_src(dataset, tmp_path, where):
    before = tree_hashes(dataset)
    src, dst = {"same": (dataset, dataset), "dst inside src": (dataset, dataset / "Image" / "low"),
                "src inside dst": (dataset, tmp_path)}[where]
    with pytest.raises(ValueError, match="SRC"):
        convert_folder(src, dst, progress=False)
    assert tree_hashes(dataset) == before


def test_converter_resumes_skipping_finished_outputs_and_redoing_missing_ones(dataset, tmp_path):
    dst = tmp_path / "dst"
    convert_folder(dataset, dst, seed=1, progress=False)
    first = tree_hashes(dst)
    kept, deleted = dst / "Image/original/train_00001.png", dst / "extra/deep/face.bmp"
    kept.write_bytes(b"finished earlier")  # a resumed run must not even look inside existing outputs
    deleted.unlink()
    report = convert_folder(dataset, dst, seed=1, progress=False)
    assert (report.converted, report.already_done, report.copied) == (1, 6, 0)
    assert kept.read_bytes() == b"finished earlier"
    assert tree_hashes(dst)["extra/deep/face.bmp"] == first["extra/deep/face.bmp"]
    with pytest.raises(ValueError, match=r"preset 'paper'.*preset 'dark'"):
        convert_folder(dataset, dst, preset="dark", seed=1, progress=False)
    with pytest.raises(ValueError, match="seed"):
        convert_folder(dataset, dst, seed=2, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("unrelated")
    with pytest.raises(ValueError, match=r"not empty and has no lowlight\.json"):
        convert_folder(dataset, tmp_path / "other", progress=False)


def test_converter_output_does_not_depend_on_worker_processes(dataset, tmp_path):
    convert_folder(dataset, tmp_path / "inline", seed=4, workers=0, progress=False)
    report = convert_folder(dataset, tmp_path / "pool", seed=4, workers=2, progress=False)
    assert report.converted == 5 and len(report.unreadable) == 1
    assert tree_hashes(tmp_path / "pool") == tree_hashes(tmp_path / "inline")


def test_cli_converts_and_prints_a_one_line_summary(dataset, tmp_path, capsys):
    main(["make-lowlight", str(dataset), str(tmp_path / "dst"), "--preset", "extreme", "--seed", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert "5 converted, 0 already done, 2 copied, 1 unreadable" in lines[0]
    assert json.loads((tmp_path / "dst/lowlight.json").read_text())["preset"] == "extreme"


@pytest.mark.parametrize(("argv", "named"), [
    (["--preset", "night"], "--preset"), (["--seed", "-1"], "--seed"), (["--workers", "two"], "--workers"),
])
def test_cli_bad_arguments_give_one_error_line_naming_the_argument(dataset, tmp_path, capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        main(["make-lowlight", str(dataset), str(tmp_path / "dst"), *argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert named in error and "Traceback" not in error


def test_cli_refuses_dst_inside_src_without_a_traceback(dataset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["make-lowlight", str(dataset), str(dataset / "low")])
    assert exit_info.value.code == 2
    assert "inside SRC" in capsys.readouterr().err
    assert not (dataset / "low").exists()
