"""Low-light versions of normal photos, made the way LLDif's LL-RAF-DB, LL-FERPlus and LL-KDEF were: the paper
lowered exposure, white balance, highlights and shadows in a photo editor; this does the same in linear RGB and
adds the sensor noise a really dark shot would carry.

Pipeline for one (H, W, 3) uint8 sRGB image:

1. sRGB → linear light with the exact sRGB transfer function;
2. white balance: per-channel gains from a temperature/tint shift (see `white_balance_gains`);
3. highlights and shadows: smooth, monotone tone curves on luminance (on a square-root lightness scale),
   applied as one gain per pixel so hues are kept;
4. exposure: multiply by 2**exposure_ev;
5. sensor noise in linear light, after darkening: shot noise (Gaussian approximation of Poisson photo-electron
   counts, variance shot_noise * signal) plus read noise (Gaussian, std read_noise), partly shared by the three
   channels (luminance noise) and partly independent (colour noise);
6. clip to [0, 1], quantise to the sensor's bit depth, encode for display (sRGB curve or a plain gamma) to uint8.

A grey input (three equal channels, e.g. FERPlus) stays grey: white balance and colour noise are skipped, as a
photo editor does for a monochrome photo.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from types import MappingProxyType

import numpy as np
from tqdm import tqdm

from ..argtypes import non_negative_int
from .images import ImageReadError, check_rgb, is_image_file, read_rgb, write_atomic, write_rgb

RECORD_FILE = "lowlight.json"

# Rec. 709 / sRGB primaries: the luminance the highlights and shadows sliders act on.
_LUMINANCE_WEIGHTS = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
_CHANNEL_MEAN_WEIGHTS = np.full(3, 1 / 3, dtype=np.float32)
# ln of the R (and 1/B) gain at temperature ±1 and of the 1/G gain at tint ±1.
_TEMPERATURE_LOG_GAIN = 0.3
_TINT_LOG_GAIN = 0.2


def srgb_to_linear(encoded: np.ndarray) -> np.ndarray:
    """Linear light from sRGB-encoded values in [0, 1] (the exact piecewise sRGB EOTF)."""
    encoded = np.asarray(encoded)
    return np.where(encoded <= 0.04045, encoded / 12.92, ((encoded + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """sRGB-encoded values from linear light in [0, 1] (the exact piecewise sRGB OETF)."""
    linear = np.asarray(linear)
    return np.where(linear <= 0.0031308, linear * 12.92, 1.055 * np.maximum(linear, 0) ** (1 / 2.4) - 0.055)


_SRGB_TO_LINEAR = srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)


# (low, high, meaning) of every float field; the class docstring's table repeats it for readers.
_FLOAT_RANGES: dict[str, tuple[float, float, str]] = {
    "exposure_ev": (-10.0, 0.0, "stops of exposure change"),
    "temperature": (-1.0, 1.0, "white-balance shift, + warmer (redder), - cooler (bluer)"),
    "tint": (-1.0, 1.0, "white-balance shift, + magenta, - green"),
    "highlights": (-1.0, 1.0, "- pulls bright tones down, + lifts them"),
    "shadows": (-1.0, 1.0, "- crushes dark tones, + lifts them"),
    "shot_noise": (0.0, 0.05, "variance of shot noise per unit of linear signal"),
    "read_noise": (0.0, 0.05, "std of read noise in linear full-scale units"),
    "colour_noise": (0.0, 1.0, "share of the noise variance independent per channel"),
}
_BIT_DEPTH_RANGE = (8, 16)
_GAMMA_RANGE = (1.0, 3.0)


@dataclass(frozen=True)
class LowLightParams:
    """Every setting of one low-light rendering; the defaults change nothing (a lossless identity).

    ============== ============== ==========================================================================
    field          range          meaning
    ============== ============== ==========================================================================
    exposure_ev    [-10, 0]       exposure change in stops: linear light is multiplied by 2**exposure_ev
    temperature    [-1, 1]        + warmer (R gain up, B gain down), - cooler; ±1 scales R/B by e**±0.6
    tint           [-1, 1]        + magenta (G gain down), - green; ±1 scales G by e**∓0.2
    highlights     [-1, 1]        - pulls bright tones down, + lifts them (white itself stays white)
    shadows        [-1, 1]        - crushes dark tones towards black, + lifts them (black stays black)
    shot_noise     [0, 0.05]      a: shot-noise variance is a * signal (a = 1 / photo-electrons at full scale)
    read_noise     [0, 0.05]      b: read-noise std in linear full-scale units (present even at zero signal)
    colour_noise   [0, 1]         share of the noise variance drawn independently per channel (rest is grey)
    bit_depth      8..16 (int)    the sensor's linear quantisation before display encoding
    display_gamma  None or [1, 3] None: the sRGB curve; a number g: plain power 1/g
    ============== ============== ==========================================================================
    """

    exposure_ev: float = 0.0
    temperature: float = 0.0
    tint: float = 0.0
    highlights: float = 0.0
    shadows: float = 0.0
    shot_noise: float = 0.0
    read_noise: float = 0.0
    colour_noise: float = 0.0
    bit_depth: int = 16
    display_gamma: float | None = None

    def __post_init__(self) -> None:
        for name, (low, high, meaning) in _FLOAT_RANGES.items():
            _check_number(name, getattr(self, name), low, high, meaning)
        if isinstance(self.bit_depth, bool) or not isinstance(self.bit_depth, (int, np.integer)):
            raise ValueError(f"bit_depth must be an integer in {list(_BIT_DEPTH_RANGE)}, got {self.bit_depth!r}")
        _check_number("bit_depth", self.bit_depth, *_BIT_DEPTH_RANGE, "bits of the sensor's quantisation")
        if self.display_gamma is not None:
            _check_number("display_gamma", self.display_gamma, *_GAMMA_RANGE, "None for sRGB, else a power")


def _check_number(name: str, value: object, low: float, high: float, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in [{low}, {high}] ({meaning}), got {value!r}")
    if not low <= value <= high:  # also rejects NaN
        raise ValueError(f"{name} must be in [{low}, {high}] ({meaning}), got {value!r}")


# Ranges each image's settings are drawn from (uniformly); fields left out keep LowLightParams' defaults.
# Mean output brightness over every setting a preset can draw, on skimage's astronaut and chelsea and
# matplotlib's grace_hopper (tests/data/test_lowlight.py checks it): paper 5-15 % of full scale, with at least
# 70 % of the values in the lowest quarter of the histogram and none in the upper half (the paper's Fig. 1 look);
# dark 10-30 %; extreme 1.5-6.5 %.
PRESETS: Mapping[str, Mapping[str, tuple[float, float]]] = MappingProxyType({
    "paper": MappingProxyType({
        "exposure_ev": (-4.2, -3.4),
        "temperature": (-0.3, 0.3),
        "tint": (-0.15, 0.15),
        "highlights": (-0.8, -0.3),
        "shadows": (-0.5, 0.0),
        "shot_noise": (3e-4, 1.5e-3),
        "read_noise": (8e-4, 3e-3),
        "colour_noise": (0.2, 0.5),
        "bit_depth": (12, 14),
    }),
    "dark": MappingProxyType({
        "exposure_ev": (-2.4, -1.6),
        "temperature": (-0.2, 0.2),
        "tint": (-0.1, 0.1),
        "highlights": (-0.4, -0.1),
        "shadows": (-0.3, 0.0),
        "shot_noise": (1e-4, 5e-4),
        "read_noise": (3e-4, 1e-3),
        "colour_noise": (0.2, 0.5),
        "bit_depth": (12, 14),
    }),
    "extreme": MappingProxyType({
        "exposure_ev": (-6.4, -5.4),
        "temperature": (-0.4, 0.4),
        "tint": (-0.2, 0.2),
        "highlights": (-0.8, -0.4),
        "shadows": (-0.6, -0.2),
        "shot_noise": (5e-4, 2e-3),
        "read_noise": (1e-3, 3e-3),
        "colour_noise": (0.3, 0.6),
        "bit_depth": (12, 14),
    }),
})


LOWLIGHT_CHOICES = ("none", *PRESETS)  # what training and evaluation accept: a preset, or the images as given


def _check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return preset


def sample_params(preset: str, rng: np.random.Generator) -> LowLightParams:
    """One image's settings drawn from a preset's ranges (integers for bit_depth, uniform floats otherwise)."""
    values = {}
    for name, (low, high) in PRESETS[_check_preset(preset)].items():
        values[name] = int(rng.integers(low, high, endpoint=True)) if name == "bit_depth" else rng.uniform(low, high)
    return LowLightParams(**values)


def white_balance_gains(temperature: float, tint: float) -> np.ndarray:
    """Linear R, G, B gains for a white-balance shift, scaled so a grey keeps its luminance.

    Direction: temperature > 0 renders warmer (R up, B down), < 0 cooler; tint > 0 renders more magenta
    (G down), < 0 greener.
    """
    gains = np.exp([_TEMPERATURE_LOG_GAIN * temperature, -_TINT_LOG_GAIN * tint, -_TEMPERATURE_LOG_GAIN * temperature])
    return (gains / (gains @ _LUMINANCE_WEIGHTS.astype(np.float64))).astype(np.float32)


def _channel_mix(weights: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """(H, W) weighted sum of (3, H, W) channel planes, as one matrix-vector product."""
    return (weights @ planes.reshape(3, -1)).reshape(planes.shape[1:])


def _adjust_tones(planes: np.ndarray, highlights: float, shadows: float) -> np.ndarray:
    luminance = np.minimum(_channel_mix(_LUMINANCE_WEIGHTS, planes), np.float32(1))
    # A square root is close enough to perceived lightness for slider weights, and far cheaper than the sRGB curve.
    tone = np.sqrt(luminance)
    rest = 1 - tone
    # Bumps that vanish at black and at white keep both end points fixed, peak at tones 1/4 (shadows) and
    # 3/4 (highlights), barely reach the other end, and keep the curve monotone for sliders in [-1, 1]
    # (the slope is linear in the sliders and >= 0 at all four corners). Cubes as products: ** 3 calls pow.
    adjusted = tone * (1 + np.float32(shadows) * rest * rest * rest + np.float32(highlights) * tone * tone * rest)
    gain = np.divide(adjusted * adjusted, luminance, out=np.ones_like(luminance), where=luminance > 0)
    return planes * gain


def _add_sensor_noise(signal: np.ndarray, params: LowLightParams, grey: bool, rng: np.random.Generator) -> np.ndarray:
    if params.shot_noise == 0 and params.read_noise == 0:
        return signal
    # The noiseless signal is >= 0 (gains and the tone curve are non-negative), so no clipping before the root.
    std = np.sqrt(np.float32(params.shot_noise) * signal + np.float32(params.read_noise**2))
    colour_share = 0.0 if grey else params.colour_noise
    independent = rng.standard_normal(signal.shape, dtype=np.float32)
    channel_mean = _channel_mix(_CHANNEL_MEAN_WEIGHTS, independent)
    # A Gaussian's deviations from its channel mean are independent of that mean; weighting the two parts so
    # gives every channel unit variance and a correlation of 1 - colour_share between channels, from one draw.
    noise = (np.float32(math.sqrt(colour_share)) * (independent - channel_mean)
             + np.float32(math.sqrt(3 - 2 * colour_share)) * channel_mean)
    return signal + std * noise


@functools.lru_cache(maxsize=16)
def _display_table(bit_depth: int, display_gamma: float | None) -> np.ndarray:
    """uint8 display value of every sensor code."""
    linear = np.arange(1 << bit_depth) / ((1 << bit_depth) - 1)
    encoded = linear_to_srgb(linear) if display_gamma is None else linear ** (1 / display_gamma)
    table = np.rint(encoded * 255).astype(np.uint8)
    table.flags.writeable = False
    return table


def simulate_low_light(rgb: np.ndarray, params: LowLightParams, rng: np.random.Generator) -> np.ndarray:
    """The low-light rendering of an (H, W, 3) uint8 sRGB image; the same rng state gives the same bytes."""
    check_rgb(rgb)
    grey = np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])
    # Channel planes (3, H, W): numpy broadcasts a per-channel factor over a whole plane many times faster
    # than over a trailing axis of length 3.
    planes = np.take(_SRGB_TO_LINEAR, rgb.transpose(2, 0, 1))
    if not grey and (params.temperature or params.tint):
        planes *= white_balance_gains(params.temperature, params.tint)[:, None, None]
    if params.highlights or params.shadows:
        # On the scene's own tones, before exposure: the sliders act on what is bright or dark in the picture,
        # as an editor's adaptive sliders do, rather than fading away as the exposure drops.
        planes = _adjust_tones(planes, params.highlights, params.shadows)
    signal = _add_sensor_noise(planes * np.float32(2.0**params.exposure_ev), params, grey, rng)
    levels = (1 << params.bit_depth) - 1
    # Values are >= 0 after clipping, so adding 0.5 and truncating rounds (and is faster than np.rint).
    codes = (np.clip(signal, 0, 1) * np.float32(levels) + np.float32(0.5)).astype(np.int32)
    return np.take(_display_table(params.bit_depth, params.display_gamma), codes.transpose(1, 2, 0))


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def image_rng(seed: int, key: str) -> np.random.Generator:
    """The generator for one image: a stable hash of (seed, key), so the same in every run, order and process."""
    digest = hashlib.sha256(f"{_check_seed(seed)}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


class LowLight:
    """Low-light transform for (H, W, 3) uint8 images: fresh darkening per call, or with `seed` a fixed one per key."""

    def __init__(self, preset: str = "paper", seed: int | None = None) -> None:
        self.preset = _check_preset(preset)
        self.seed = None if seed is None else _check_seed(seed)

    def __call__(self, rgb: np.ndarray, key: str | None = None) -> np.ndarray:
        """The darkened image; with a seed and key = path relative to the dataset root, what convert_folder writes."""
        if self.seed is None:
            # A new OS-seeded generator per call: DataLoader workers forked from one parent must not share a stream.
            rng = np.random.default_rng()
        elif key is None:
            raise ValueError("key is required when LowLight has a seed (e.g. the image's relative path)")
        else:
            rng = image_rng(self.seed, key)
        return simulate_low_light(rgb, sample_params(self.preset, rng), rng)

    def __repr__(self) -> str:
        return f"LowLight(preset={self.preset!r}, seed={self.seed!r})"


@dataclass(frozen=True)
class ConvertReport:
    """What one `convert_folder` run did; `unreadable` holds (relative path, reason) of skipped images."""

    converted: int
    already_done: int
    copied: int
    unreadable: tuple[tuple[str, str], ...]

    def summary(self) -> str:
        """One line for the command line."""
        return (f"{self.converted} converted, {self.already_done} already done, {self.copied} copied, "
                f"{len(self.unreadable)} unreadable")


def _lldif_version() -> str:
    import lldif

    version = getattr(lldif, "__version__", None)
    if version is None:
        from importlib.metadata import version as package_version

        version = package_version("lldif")
    return version


def _check_folders(src: str | os.PathLike, dst: str | os.PathLike) -> tuple[Path, Path]:
    source = Path(src).resolve()
    target = Path(dst).resolve()
    if not source.is_dir():
        raise ValueError(f"SRC {src} is not a directory")
    if target == source:
        raise ValueError(f"DST {dst} is SRC; the low-light copy must go to another folder")
    if source in target.parents:
        raise ValueError(f"DST {dst} is inside SRC {src}; nothing may be written inside SRC")
    if target in source.parents:
        raise ValueError(f"SRC {src} is inside DST {dst}; choose a DST outside SRC")
    if target.exists() and not target.is_dir():
        raise ValueError(f"DST {dst} exists and is not a directory")
    if (source / RECORD_FILE).exists():
        raise ValueError(f"SRC {src} has a {RECORD_FILE}: it is already a low-light conversion")
    return source, target


def _check_resume(target: Path, preset: str, seed: int) -> None:
    record_path = target / RECORD_FILE
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text())
            previous = (record["preset"], record["seed"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"DST {target}: {RECORD_FILE} is not one written by make-lowlight ({error})") from None
        if previous != (preset, seed):
            raise ValueError(f"DST {target} holds a conversion with preset {previous[0]!r}, seed {previous[1]}; "
                             f"resuming with preset {preset!r}, seed {seed} would mix two darkenings "
                             "(use the same preset and seed, or another DST)")
    elif target.exists() and any(target.iterdir()):
        raise ValueError(f"DST {target} is not empty and has no {RECORD_FILE}: not an earlier make-lowlight output")


def _write_record(target: Path, preset: str, seed: int, report: ConvertReport | None) -> None:
    record = {"preset": preset, "seed": seed, "lldif_version": _lldif_version(), "complete": report is not None}
    if report is not None:
        record |= {"converted": report.converted, "already_done": report.already_done, "copied": report.copied,
                   "unreadable": [{"path": path, "reason": reason} for path, reason in report.unreadable]}
    text = json.dumps(record, indent=2) + "\n"
    write_atomic(target / RECORD_FILE, lambda file: file.write(text.encode()))


def _convert_image(job: tuple[Path, Path, str, str, int]) -> str | None:
    """Writes one image's low-light version; returns why the source is unreadable, or None."""
    source, target, key, preset, seed = job
    try:
        rgb = read_rgb(source)
    except ImageReadError as error:
        return error.reason
    write_rgb(target, LowLight(preset, seed)(rgb, key))
    return None


def _convert_images(jobs: list[tuple[Path, Path, str, str, int]], workers: int) -> Iterator[str | None]:
    """`_convert_image` of every job, in order, here or in `workers` processes."""
    if not workers:
        yield from map(_convert_image, jobs)
        return
    # spawn: the parent may hold torch's threads, and forking a threaded process can deadlock.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(_convert_image, jobs, chunksize=8)


def _copy_file(source: Path, target: Path) -> None:
    with source.open("rb") as data:
        write_atomic(target, lambda file: shutil.copyfileobj(data, file))


def convert_folder(src: str | os.PathLike, dst: str | os.PathLike, preset: str = "paper", seed: int = 0,
                   workers: int = 0, progress: bool = True) -> ConvertReport:
    """Writes the low-light version of a dataset folder SRC into DST, resumably, keeping structure and names.

    Images keep their suffix and format (JPEG at quality 95, PNG lossless); every other file (label lists such
    as RAF-DB's EmoLabel/list_patition_label.txt, FERPlus CSVs) is copied unchanged. Each image's darkening
    depends only on (seed, its relative path), so `workers` (0: this process) and order do not change a byte.
    Existing outputs were written atomically and are skipped; DST/lowlight.json records preset, seed, the latest
    run's counts, unreadable images and the lldif version, and a resume with another preset or seed is refused.
    Nothing is ever written inside SRC. Out of scope: pixels stored inside a table (FER2013's CSV) are copied,
    not darkened; such a table needs its own conversion.
    """
    source, target = _check_folders(src, dst)
    _check_preset(preset)
    seed = _check_seed(seed)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be a non-negative integer, got {workers!r}")
    _check_resume(target, preset, seed)
    target.mkdir(parents=True, exist_ok=True)
    _write_record(target, preset, seed, None)

    files = sorted(path.relative_to(source).as_posix() for path in source.rglob("*") if path.is_file())
    pending = [key for key in files if not (target / key).exists()]
    already_done = len(files) - len(pending)
    images = [key for key in pending if is_image_file(key)]
    others = [key for key in pending if not is_image_file(key)]
    converted, unreadable = 0, []
    with tqdm(total=len(files), initial=already_done, disable=not progress, unit="file", desc="make-lowlight") as bar:
        for key in others:
            _copy_file(source / key, target / key)
            bar.update()
        jobs = [(source / key, target / key, key, preset, seed) for key in images]
        for key, reason in zip(images, _convert_images(jobs, workers), strict=True):
            if reason is None:
                converted += 1
            else:
                unreadable.append((key, reason))
            bar.update()
    report = ConvertReport(converted, already_done, len(others), tuple(unreadable))
    _write_record(target, preset, seed, report)
    return report


def add_make_lowlight_command(commands: argparse._SubParsersAction) -> None:
    """Registers `lldif make-lowlight SRC DST [--preset] [--seed] [--workers]`."""
    parser = commands.add_parser(
        "make-lowlight", help="write a low-light copy of a dataset folder (as LL-RAF-DB/LL-FERPlus/LL-KDEF)",
        description=convert_folder.__doc__)
    parser.add_argument("src", metavar="SRC", help="dataset folder to read (never written to)")
    parser.add_argument("dst", metavar="DST", help="folder for the low-light copy; an earlier run there is resumed")
    parser.add_argument("--preset", choices=list(PRESETS), default="paper",
                        help="how dark: paper (mean ~5-15%% of full scale, the paper's look), dark (milder, ~10-30%%), "
                             "extreme (darker, ~1.5-6.5%%); default paper")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the per-image darkening (same seed, same bytes); default 0")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="worker processes (0: convert in this process); output does not depend on it")

    def run(args: argparse.Namespace) -> None:
        try:
            report = convert_folder(args.src, args.dst, args.preset, args.seed, args.workers)
        except ValueError as error:
            parser.error(str(error))
        print(f"make-lowlight: {report.summary()} (details in {Path(args.dst) / RECORD_FILE})")

    parser.set_defaults(run=run)
