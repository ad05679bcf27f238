"""Synthetic expression faces: cartoon RGB faces drawn from 68-point landmark geometry, with exact landmarks
and an English caption per image. This is the embedded default dataset, since no FER dataset ships offline.

A face starts from the mean shape of `face_layout`, is deformed by an identity (face shape, eye spacing and
size, nose, mouth), by facial action units (FACS-like landmark motions mixed per expression and scaled by a
random intensity, plus small noise on every face) and by a pose (yaw as a warp over a curved head, roll,
scale, shift). Every part is drawn from the deformed geometry, so the landmarks are true by construction.
Face `index` of a generator is a pure function of (seed, index, size); its label is `index % 7`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch.utils.data
from PIL import Image, ImageDraw

from ..argtypes import integer_at_least, non_negative_int, positive_int
from .dataset import CAPTIONS_FILE, SPLITS, FaceSample, read_captions
from .face_layout import FLIP_68, MEAN_SHAPE_68_UNIT
from .images import write_atomic, write_rgb
from .labels import EXPRESSIONS, NUM_CLASSES
from .landmark_cache import LANDMARKS_FILE, LandmarkTable, load_landmarks, save_landmarks

MIN_SIZE = 32
# Test faces are drawn at indices from here on, so they never repeat a training face; a multiple of the
# class count keeps face i of either split the same class.
TEST_INDEX_START = NUM_CLASSES * 2**28
# Expression intensity: a share of the expressive faces is subtle, so classes overlap with neutral and each other.
WEAK_FRACTION = 0.3
WEAK_INTENSITY, STRONG_INTENSITY = (0.1, 0.35), (0.35, 1.0)
ACTION_UNIT_NOISE = 0.12  # std of the random action-unit activity on every face, neutral ones included
# Chance that a face also shows a trace (up to BLEND_STRENGTH) of one random action unit, as blended or
# idiosyncratic expressions do.
BLEND_PROBABILITY, BLEND_STRENGTH = 0.3, 0.4
SUPERSAMPLING = 2  # faces are drawn at this multiple of the output size and box-filtered down

# Action units and their landmark motion at full intensity, in unit face coordinates, for image-left points
# and the midline; image-right points mirror them.
ACTION_UNITS: dict[str, dict[int, tuple[float, float]]] = {
    "AU1 inner brow raiser": {21: (0.0, -0.05), 20: (0.0, -0.035), 19: (0.0, -0.015)},
    "AU2 outer brow raiser": {17: (0.0, -0.05), 18: (0.0, -0.045), 19: (0.0, -0.03), 20: (0.0, -0.012)},
    "AU4 brow lowerer": {17: (0.0, 0.01), 18: (0.005, 0.02), 19: (0.012, 0.03), 20: (0.02, 0.038),
                         21: (0.028, 0.042), 37: (0.0, 0.004), 38: (0.0, 0.005)},
    "AU5 upper lid raiser": {37: (0.0, -0.022), 38: (0.0, -0.022), 36: (0.0, -0.003), 39: (0.0, -0.003),
                             40: (0.0, 0.004), 41: (0.0, 0.004)},
    "AU6 cheek raiser": {40: (0.0, -0.012), 41: (0.0, -0.012), 36: (0.0, -0.004), 48: (0.0, -0.006)},
    "AU7 lid tightener": {40: (0.0, -0.012), 41: (0.0, -0.012), 37: (0.0, 0.01), 38: (0.0, 0.01)},
    "AU9 nose wrinkler": {31: (-0.006, -0.02), 32: (0.0, -0.015), 33: (0.0, -0.012), 29: (0.0, -0.01),
                          30: (0.0, -0.012), 21: (0.008, 0.015), 20: (0.0, 0.008), 40: (0.0, -0.006),
                          41: (0.0, -0.006), 49: (0.0, -0.012), 50: (0.0, -0.012), 51: (0.0, -0.01),
                          61: (0.0, -0.008), 62: (0.0, -0.008)},
    "AU10 upper lip raiser": {48: (0.0, -0.008), 49: (0.0, -0.02), 50: (0.0, -0.03), 51: (0.0, -0.025),
                              61: (0.0, -0.025), 62: (0.0, -0.02), 31: (0.0, -0.005)},
    "AU12 lip corner puller": {48: (-0.035, -0.045), 60: (-0.03, -0.04), 49: (-0.015, -0.022),
                               59: (-0.02, -0.025), 61: (-0.01, -0.012), 67: (-0.01, -0.015),
                               50: (0.0, -0.008), 58: (0.0, -0.01), 57: (0.0, 0.005)},
    "AU15 lip corner depressor": {48: (0.005, 0.035), 60: (0.005, 0.03), 49: (0.0, 0.015), 59: (0.0, 0.018),
                                  61: (0.0, 0.008), 67: (0.0, 0.01), 57: (0.0, -0.005)},
    "AU20 lip stretcher": {48: (-0.04, 0.008), 60: (-0.035, 0.006), 49: (-0.02, 0.0), 59: (-0.022, 0.005),
                           61: (-0.01, 0.0), 67: (-0.01, 0.0), 50: (0.0, 0.006), 51: (0.0, 0.006),
                           57: (0.0, -0.006), 58: (0.0, -0.006)},
    "AU24 lip pressor": {48: (0.008, 0.0), 49: (0.0, 0.006), 50: (0.0, 0.01), 51: (0.0, 0.012),
                         57: (0.0, -0.014), 58: (0.0, -0.012), 59: (0.0, -0.006), 61: (0.0, 0.004),
                         62: (0.0, 0.004), 66: (0.0, -0.004), 67: (0.0, -0.004)},
    "AU25 lips part": {66: (0.0, 0.02), 67: (0.0, 0.018), 57: (0.0, 0.015), 58: (0.0, 0.015),
                       61: (0.0, -0.004), 62: (0.0, -0.004)},
    "AU26 jaw drop": {57: (0.0, 0.1), 58: (0.0, 0.095), 59: (0.0, 0.06), 66: (0.0, 0.095), 67: (0.0, 0.085),
                      61: (0.0, -0.008), 62: (0.0, -0.008), 48: (0.012, 0.03), 60: (0.012, 0.03),
                      8: (0.0, 0.09), 7: (0.0, 0.085), 6: (0.0, 0.07), 5: (0.0, 0.05), 4: (0.0, 0.03),
                      3: (0.0, 0.015)},
}
_AU = {name.split()[0]: position for position, name in enumerate(ACTION_UNITS)}

# Each expression's action units as (low, high) weight ranges, drawn per face before scaling by intensity.
PROTOTYPES: dict[str, dict[str, tuple[float, float]]] = {
    "surprise": {"AU1": (0.9, 1.1), "AU2": (0.9, 1.1), "AU5": (0.7, 1.1), "AU26": (0.6, 1.1), "AU25": (0.2, 0.5)},
    "fear": {"AU1": (0.9, 1.1), "AU2": (0.3, 0.7), "AU4": (0.5, 0.8), "AU5": (0.8, 1.1), "AU20": (0.8, 1.1),
             "AU25": (0.3, 0.9)},
    "disgust": {"AU9": (0.8, 1.1), "AU10": (0.8, 1.1), "AU4": (0.4, 0.8), "AU7": (0.2, 0.6), "AU15": (0.1, 0.5),
                "AU25": (0.0, 0.4)},
    "happiness": {"AU6": (0.7, 1.1), "AU12": (0.9, 1.1), "AU25": (0.0, 0.9)},
    "sadness": {"AU1": (0.9, 1.1), "AU4": (0.3, 0.6), "AU15": (0.8, 1.1), "AU5": (-0.5, -0.2), "AU24": (0.0, 0.4)},
    "anger": {"AU4": (0.9, 1.2), "AU7": (0.8, 1.1), "AU24": (0.7, 1.1), "AU5": (0.0, 0.4), "AU10": (0.0, 0.3)},
    "neutral": {},
}

# Caption vocabulary: adjectives per expression, intensity words from weak to strong.
_EXPRESSION_WORDS = {
    "surprise": ("surprised",), "fear": ("afraid", "scared", "fearful"), "disgust": ("disgusted",),
    "happiness": ("happy",), "sadness": ("sad",), "anger": ("angry",), "neutral": ("neutral", "calm"),
}
_INTENSITY_WORDS = (("slightly", "a little", "faintly"), ("", "quite", "moderately"), ("very", "clearly", "strongly"))

_SKIN_TONES = np.array([(250, 222, 200), (236, 192, 160), (214, 164, 122), (186, 130, 88), (138, 90, 58),
                        (92, 58, 40)], dtype=np.float64)
_SKIN_WORDS = ("fair", "light", "medium", "olive", "brown", "dark")
_HAIR_COLOURS = {"black": (28, 24, 24), "dark brown": (62, 42, 30), "brown": (112, 76, 46),
                 "auburn": (140, 62, 36), "blond": (214, 178, 112), "grey": (150, 150, 150),
                 "white": (222, 220, 214)}
_HAIR_STYLES = ("short", "short", "long", "shoulder-length", "bald")
_IRIS_COLOURS = ((70, 44, 28), (40, 28, 22), (72, 110, 150), (80, 116, 70), (110, 86, 50), (105, 112, 120))
_BACKGROUND_COLOURS = {"blue": (70, 110, 170), "green": (90, 140, 90), "grey": (128, 128, 128),
                       "beige": (210, 195, 165), "teal": (60, 140, 140), "purple": (120, 90, 150),
                       "orange": (220, 140, 70), "pink": (220, 160, 175), "white": (232, 232, 228),
                       "dark": (40, 42, 48)}
_BACKGROUND_KINDS = ("plain", "gradient", "mottled", "striped")
_HAIR_NAMES, _BACKGROUND_NAMES = tuple(_HAIR_COLOURS), tuple(_BACKGROUND_COLOURS)
_LIP_TINT, _BLUSH = (150, 50, 60), (235, 120, 120)
# A face's base colours: skin, hair, iris, clothes, background, background pattern, then the fixed tints. The
# first six vary per face by a factor in [0.85, 1.15] per channel raised to this power.
_COLOUR_BASES = ("skin", "hair", "iris", "clothes", "background", "pattern", "lip tint", "blush")
_COLOUR_JITTER = np.array([[1 / 3], [1 / 3], [0], [0], [1], [1]])
# Every colour a face is drawn with, as a mix of its base colours.
_COLOURS: dict[str, dict[str, float]] = {
    "skin": {"skin": 1.0}, "ear": {"skin": 0.92}, "neck": {"skin": 0.78}, "crease": {"skin": 0.55},
    "nose": {"skin": 0.5}, "nostril": {"skin": 0.35}, "cheek": {"skin": 0.85, "blush": 0.15},
    "lips": {"skin": 0.72, "lip tint": 0.28}, "lip_line": {"skin": 0.72 * 0.45, "lip tint": 0.28 * 0.45},
    "hair": {"hair": 1.0}, "back_hair": {"hair": 0.8}, "brow": {"hair": 0.7, "skin": 0.15}, "iris": {"iris": 1.0},
    "clothes": {"clothes": 1.0}, "background": {"background": 1.0}, "background_pattern": {"pattern": 0.8},
}
_COLOUR_NAMES = tuple(_COLOURS)
_COLOUR_MIX = np.array([[mix.get(base, 0.0) for base in _COLOUR_BASES] for mix in _COLOURS.values()])
_BACKGROUND_VARIANTS = 8  # directions of gradients and stripes, blob layouts
_PATTERN_OPACITY = 0.7  # the most a pattern covers the background colour
_FRINGE_SHARE = 0.25  # of the people with hair

# Identity shape: each parameter moves the mean face along a fixed landmark field (see _shape_fields) by an
# amount drawn uniformly from its range; widths and lengths are relative, positions in unit face coordinates.
_SHAPE_RANGES: dict[str, tuple[float, float]] = {
    "face_width": (-0.12, 0.06), "jaw_width": (-0.16, 0.06), "face_length": (-0.08, 0.05),
    "eye_width": (-0.05, 0.2), "eye_height": (0.0, 0.45), "eye_spacing": (-0.02, 0.02), "eye_level": (-0.015, 0.015),
    "brow_level": (-0.02, 0.008), "brow_arch": (0.0, 0.012), "nose_length": (-0.1, 0.1), "nose_width": (-0.2, 0.3),
    "mouth_width": (-0.15, 0.15), "lip_fullness": (-0.4, 0.4), "mouth_level": (-0.015, 0.015),
}
# The rest of the identity, the pose and the lighting, each drawn uniformly (unit face coordinates, radians).
_SCENE_RANGES: dict[str, tuple[float, float]] = {
    "brow_thickness": (0.018, 0.034), "skin_tone": (0.0, len(_SKIN_TONES) - 1), "hair_volume": (0.0, 0.07),
    "hairline": (0.14, 0.21), "fringe": (0.0, 1.0), "gaze": (-0.015, 0.015), "asymmetry": (-0.3, 0.3),
    "yaw": (-0.35, 0.35), "roll": (-0.26, 0.26), "scale": (0.74, 0.92), "shift_x": (-0.06, 0.06),
    "shift_y": (-0.06, 0.06), "light_angle": (0.0, 2 * math.pi), "light_strength": (0.0, 0.3),
    "brightness": (0.8, 1.1), "warmth": (-1.0, 1.0),
}
_RANGE_LOW = np.array([low for low, _ in (*_SHAPE_RANGES.values(), *_SCENE_RANGES.values())])
_RANGE_SPAN = np.array([high - low for low, high in (*_SHAPE_RANGES.values(), *_SCENE_RANGES.values())])
_CHOICES = {"hair_colour": len(_HAIR_COLOURS), "hair_style": len(_HAIR_STYLES),
            "iris": len(_IRIS_COLOURS), "background_colour": len(_BACKGROUND_COLOURS),
            "background_kind": len(_BACKGROUND_KINDS), "background_variant": _BACKGROUND_VARIANTS}

# Head surface for the yaw warp, in unit face coordinates: a parabolic profile across the face plus the nose.
_HEAD_HALF_WIDTH, _HEAD_DEPTH, _NOSE_HEIGHT, _NOSE_HALF_WIDTH = 0.46, 0.25, 0.08, 0.05
# Lids and inner lips that must not cross: (upper, lower) landmark pairs and the smallest gap between them.
_UPPER_EDGE = np.array([37, 38, 43, 44, 61, 62, 63])
_LOWER_EDGE = np.array([41, 40, 47, 46, 67, 66, 65])
_EDGE_GAP = np.array([0.003] * 4 + [0.0] * 3)
_LIP_THICKNESS = 0.004  # least red lip kept outside the inner lip line
# Weight of each brow point in the identity's brow arch (the middle of each brow rises most).
_BROW_ARCH = np.array([0, 1, 1, 0.5, 0, 0, 0.5, 1, 1, 0])
_EYES = np.array([range(36, 42), range(42, 48)])
_BROWS = np.array([range(17, 22), range(22, 27)])
# Half of each brow's thickness along its 13 smoothed points, as (x, y) offsets per unit of thickness: the
# brows thin out towards the temples.
_BROW_TAPERS = np.stack([np.column_stack([np.zeros(13), 0.5 * np.linspace(0.55, 1.0, 13)[::step]])
                         for step in (1, -1)])


def _shape_fields() -> np.ndarray:
    """Landmark motion per unit of each _SHAPE_RANGES parameter, (parameters, 68, 2)."""
    mean = MEAN_SHAPE_68_UNIT
    across, down = mean[:, 0] - 0.5, mean[:, 1]
    fields = {name: np.zeros((68, 2)) for name in _SHAPE_RANGES}
    jaw, brows, nose, nostrils, eyes, mouth = (slice(0, 17), slice(17, 27), slice(27, 36), slice(31, 36),
                                               slice(36, 48), slice(48, 68))
    fields["face_width"][jaw, 0] = across[jaw]
    fields["jaw_width"][jaw, 0] = across[jaw] * np.clip((down[jaw] - 0.4) / 0.52, 0, 1)
    fields["face_length"][jaw, 1] = down[jaw] - 0.4
    for eye in (slice(36, 42), slice(42, 48)):
        fields["eye_width"][eye, 0] = mean[eye, 0] - mean[eye, 0].mean()
        fields["eye_height"][eye, 1] = mean[eye, 1] - mean[eye, 1].mean()
    fields["eye_spacing"][eyes, 0] = np.sign(across[eyes])
    fields["eye_level"][eyes, 1] = 1.0
    fields["brow_level"][brows, 1] = 1.0
    fields["brow_arch"][brows, 1] = -_BROW_ARCH
    fields["nose_length"][nose, 1] = down[nose] - down[27]
    fields["nose_width"][nostrils, 0] = across[nostrils]
    fields["mouth_width"][mouth, 0] = across[mouth]
    # Fuller lips lie further from the inner lip line; the corners stay put.
    outer = [49, 50, 51, 52, 53, 55, 56, 57, 58, 59]
    fields["lip_fullness"][outer, 1] = down[outer] - down[[61, 61, 62, 63, 63, 65, 65, 66, 67, 67]]
    fields["mouth_level"][mouth, 1] = 1.0
    return np.stack(list(fields.values()))


def _action_unit_fields() -> np.ndarray:
    """Landmark motion per unit of each action unit, (units, 68, 2), mirrored onto the image-right half."""
    motions = np.zeros((len(ACTION_UNITS), 68, 2))
    for unit, moves in enumerate(ACTION_UNITS.values()):
        for point, (dx, dy) in moves.items():
            motions[unit, point] = (dx, dy)
            motions[unit, FLIP_68[point]] = (-dx, dy)
    return motions


def _landmark_basis() -> np.ndarray:
    """Rows that map (shape parameters, action units, action units on the image-right half) to landmark motion."""
    right_half = MEAN_SHAPE_68_UNIT[:, 0] > 0.5 + 1e-6
    action_units = _action_unit_fields()
    return np.concatenate([_shape_fields(), action_units * ~right_half[:, None], action_units * right_half[:, None]]
                          ).reshape(-1, 68 * 2)


_LANDMARK_BASIS = _landmark_basis()


@dataclass
class SyntheticFace:
    """One synthetic face: RGB image, class index, its 68 iBUG landmarks in pixels, caption, and the
    expression intensity (0 for neutral)."""

    image: np.ndarray
    label: int
    landmarks: np.ndarray
    caption: str
    intensity: float


@dataclass(frozen=True)
class _Scene:
    """Everything about a face that its expression does not change: identity, colours, pose, light."""

    shape_parameters: np.ndarray  # one value per _SHAPE_RANGES entry
    draws: dict[str, float]  # one value per _SCENE_RANGES entry
    picks: dict[str, int]  # one option index per _CHOICES entry
    colours: dict[str, tuple[int, ...]]


class _Stroke(NamedTuple):
    """A shape to draw: a filled polygon, or a polyline of the given width (unit face coordinates)."""

    points: np.ndarray
    colour: tuple[int, ...]
    width: float = 0.0


@functools.cache
def _spline_matrix(count: int, steps: int, closed: bool) -> np.ndarray:
    """Catmull-Rom interpolation as a matrix: curve points = matrix @ control points."""
    t = np.arange(steps)[:, None] / steps
    basis = 0.5 * np.hstack([-(t**3) + 2 * t**2 - t, 3 * t**3 - 5 * t**2 + 2, -3 * t**3 + 4 * t**2 + t, t**3 - t**2])
    segments = count if closed else count - 1
    matrix = np.zeros((segments * steps + (0 if closed else 1), count))
    for segment in range(segments):
        for offset, column in enumerate(range(segment - 1, segment + 3)):
            column = column % count if closed else min(max(column, 0), count - 1)
            matrix[segment * steps:(segment + 1) * steps, column] += basis[:, offset]
    if not closed:
        matrix[-1, -1] = 1.0
    return matrix


def _smooth(points: np.ndarray, closed: bool, steps: int = 4) -> np.ndarray:
    return _spline_matrix(len(points), steps, closed) @ points


@functools.cache
def _lower_half_order(count: int) -> np.ndarray:
    half = count // 2
    return np.r_[half:count, 0][::-1]


def _upper_and_lower(outline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two halves of a closed outline that starts at its image-left corner, both running left to right."""
    return outline[: len(outline) // 2 + 1], outline[_lower_half_order(len(outline))]


@functools.cache
def _unit_arc(count: int, start: float, stop: float) -> np.ndarray:
    angles = np.linspace(start, stop, count, endpoint=stop - start < 2 * math.pi)
    return np.column_stack([np.cos(angles), -np.sin(angles)])


def _ellipse(centre: np.ndarray, radii: tuple[float, float], count: int = 16, start: float = 0.0,
             stop: float = 2 * math.pi) -> np.ndarray:
    return centre + _unit_arc(count, start, stop) * radii


# Furrow templates in unit face coordinates. Forehead lines: 3 rows of 5 points, x in half-widths from the
# midline, y from the inner brows (each line bows up towards its middle).
_FOREHEAD_X = np.linspace(-1.0, 1.0, 5)
_FOREHEAD_LINES = np.stack([np.column_stack([_FOREHEAD_X, -0.035 - 0.028 * row + 0.015 * _FOREHEAD_X**2])
                            for row in range(3)])
_BROW_FURROWS = np.array([[[-0.016, -0.005], [-0.012, 0.035]], [[0.016, -0.005], [0.012, 0.035]]])
_NOSE_WRINKLE_LEVELS = np.array([0.3, 0.6])[:, None, None]  # down the bridge from point 27 towards 29
_NOSE_WRINKLES = np.array([[-0.035, 0.006], [0.0, 0.0], [0.035, 0.006]])
# Per image side (left, right): cheek apples around (eye corner x, cheek height), nasolabial folds as offsets
# from (nose wing, mouth corner, mouth corner), crow's feet as 3 rays from the outer eye corner.
_CHEEK_APPLES = np.stack([(side * 0.02, 0.0) + _unit_arc(12, 0.0, 2 * math.pi) * (0.065, 0.05) for side in (1, -1)])
_FOLDS = np.array([[[-0.03, -0.015], [-0.035, -0.03], [-0.025, 0.035]],
                   [[0.03, -0.015], [0.035, -0.03], [0.025, 0.035]]])
_CROWS_FEET = np.array([[[(side * 0.012, 0.0), (side * 0.045, dy)] for dy in (-0.013, 0.0, 0.013)]
                        for side in (-1, 1)])

# Iris, pupil and glint outlines around the eye centre, in eye widths.
_EYE_DISCS = np.concatenate([0.2 * _unit_arc(20, 0.0, 2 * math.pi), 0.09 * _unit_arc(12, 0.0, 2 * math.pi),
                             (0.07, -0.07) + 0.04 * _unit_arc(8, 0.0, 2 * math.pi)])
_EYE_DISC_ENDS = [20, 32]


def _with_alpha(colour: tuple[int, ...], alpha: float) -> tuple[int, ...]:
    return (*colour, int(255 * min(max(alpha, 0.0), 1.0)))


def _draw_scene(rng: np.random.Generator) -> _Scene:
    values = _RANGE_LOW + _RANGE_SPAN * rng.random(len(_RANGE_LOW))
    shape_parameters = values[: len(_SHAPE_RANGES)]
    draws = dict(zip(_SCENE_RANGES, values[len(_SHAPE_RANGES):].tolist(), strict=True))
    picks = dict(zip(_CHOICES, rng.integers(0, list(_CHOICES.values())).tolist(), strict=True))
    tone = draws["skin_tone"]
    darker = min(int(tone) + 1, len(_SKIN_TONES) - 1)
    skin = _SKIN_TONES[int(tone)] * (darker - tone) + _SKIN_TONES[darker] * (1 - darker + tone)
    background = _BACKGROUND_COLOURS[_BACKGROUND_NAMES[picks["background_colour"]]]
    bases = np.array([skin, _HAIR_COLOURS[_HAIR_NAMES[picks["hair_colour"]]], _IRIS_COLOURS[picks["iris"]],
                      rng.uniform(20, 230, 3), background, background, _LIP_TINT, _BLUSH])
    bases[:6] *= rng.uniform(0.85, 1.15, (6, 3)) ** _COLOUR_JITTER
    values = np.clip(_COLOUR_MIX @ bases, 0, 255).astype(int).tolist()
    return _Scene(shape_parameters, draws, picks, dict(zip(_COLOUR_NAMES, map(tuple, values), strict=True)))


def _draw_action_units(expression: str, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Action-unit activities of one face and its intensity (0 for neutral)."""
    activity = rng.normal(0, ACTION_UNIT_NOISE, len(ACTION_UNITS))
    if rng.random() < BLEND_PROBABILITY:
        activity[rng.integers(len(ACTION_UNITS))] += rng.uniform(0.0, BLEND_STRENGTH)
    prototype = PROTOTYPES[expression]
    if not prototype:
        return activity, 0.0
    intensity = rng.uniform(*(WEAK_INTENSITY if rng.random() < WEAK_FRACTION else STRONG_INTENSITY))
    weights = rng.random(len(prototype))
    for (unit, (low, high)), weight in zip(prototype.items(), weights.tolist(), strict=True):
        activity[_AU[unit]] += intensity * (low + (high - low) * weight)
    return activity, intensity


def _express(scene: _Scene, activity: np.ndarray) -> np.ndarray:
    """The identity's landmarks moved by the action units, with lids and lips kept from crossing."""
    weights = np.concatenate([scene.shape_parameters, activity, activity * (1 + scene.draws["asymmetry"])])
    shape = MEAN_SHAPE_68_UNIT + (weights @ _LANDMARK_BASIS).reshape(68, 2)
    upper, lower = shape[_UPPER_EDGE, 1], shape[_LOWER_EDGE, 1]
    middle = (upper + lower) / 2
    crossed = lower - upper < _EDGE_GAP
    shape[_UPPER_EDGE, 1] = np.where(crossed, middle - _EDGE_GAP / 2, upper)
    shape[_LOWER_EDGE, 1] = np.where(crossed, middle + _EDGE_GAP / 2, lower)
    shape[50:53, 1] = np.minimum(shape[50:53, 1], shape[61:64, 1] - _LIP_THICKNESS)
    shape[56:59, 1] = np.maximum(shape[56:59, 1], shape[65:68, 1] + _LIP_THICKNESS)
    return shape


def _warp(points: np.ndarray, draws: dict[str, float]) -> np.ndarray:
    """Unit face coordinates turned by yaw (over a curved head with a nose) and roll, around the face centre."""
    across = points[:, 0] - 0.5
    depth = _HEAD_DEPTH * np.clip(1 - (across / _HEAD_HALF_WIDTH) ** 2, 0, None)
    depth += _NOSE_HEIGHT * np.exp(-((across / _NOSE_HALF_WIDTH) ** 2)) * np.interp(
        points[:, 1], [0.38, 0.62, 0.7], [0.0, 1.0, 0.0])
    yaw, roll = draws["yaw"], draws["roll"]
    turned = np.stack([across * math.cos(yaw) + depth * math.sin(yaw), points[:, 1] - 0.5], axis=1)
    return turned @ np.array([[math.cos(roll), math.sin(roll)], [-math.sin(roll), math.cos(roll)]])


def _head_strokes(scene: _Scene, shape: np.ndarray) -> list[_Stroke]:
    """Back hair, shoulders, neck, ears, face and hair front, back to front."""
    colours, d = scene.colours, scene.draws
    left, right = shape[0], shape[16]
    half_width, top = (right[0] - left[0]) / 2, 0.10
    centre = np.array([0.5, (left[1] + right[1]) / 2])
    height = centre[1] - top
    hair_radii = (half_width + 0.02 + d["hair_volume"], height + 0.02 + d["hair_volume"])
    hair_outline = _ellipse(centre, hair_radii, 18, -0.15, math.pi + 0.15)
    style = _HAIR_STYLES[scene.picks["hair_style"]]
    strokes = []
    if style in ("long", "shoulder-length"):
        length = 1.25 if style == "long" else 0.85
        ends = hair_outline[[-1, 0], 0] + [-0.05, 0.05]
        strokes.append(_Stroke(np.concatenate([hair_outline, [(ends[0], length), (ends[1], length)]]),
                               colours["back_hair"]))
    strokes.append(_Stroke(_ellipse(np.array([0.5, 1.42]), (0.75, 0.4), 20, 0, math.pi), colours["clothes"]))
    neck = np.array([shape[4] + [0.06, 0], shape[12] - [0.06, 0], [shape[12, 0] - 0.04, 1.2],
                     [shape[4, 0] + 0.04, 1.2]])
    strokes.append(_Stroke(neck, colours["neck"]))
    strokes.append(_Stroke(_ellipse(left + np.array([0.0, 0.07]), (0.045, 0.075), 12), colours["ear"]))
    strokes.append(_Stroke(_ellipse(right + np.array([0.0, 0.07]), (0.045, 0.075), 12), colours["ear"]))
    forehead = _ellipse(centre, (half_width, height), 14, 0, math.pi)[1:-1]
    strokes.append(_Stroke(np.concatenate([shape[:17], forehead]), colours["skin"]))
    if style != "bald":
        angles = _unit_arc(15, math.pi + 0.12, -0.12)
        # Flattened so the hairline runs level across the forehead and drops at the temples.
        lift = np.sign(angles[:, 1]) * np.abs(angles[:, 1]) ** 0.35
        hairline = np.stack([0.5 + 0.98 * half_width * angles[:, 0], centre[1] + (centre[1] - d["hairline"]) * lift],
                            axis=1)
        if d["fringe"] < _FRINGE_SHARE:
            hairline[3:12, 1] = d["hairline"] + 0.05 + 0.02 * (np.arange(9) % 2)
        strokes.append(_Stroke(np.concatenate([hair_outline, hairline]), colours["hair"]))
    return strokes


def _furrow_strokes(scene: _Scene, shape: np.ndarray, activity: np.ndarray) -> list[_Stroke]:
    """Furrows and cheek shading that make the action units readable beyond the landmark motion."""
    au = {unit: max(activity[position], 0.0) for unit, position in _AU.items()}
    crease, width = scene.colours["crease"], 0.008
    strokes = []
    between_brows = np.array([0.5, min(shape[21, 1], shape[22, 1])])
    raised = max(au["AU1"], au["AU2"])
    if raised > 0.2:
        # Inner brow raising creases the middle of the forehead, outer brow raising its whole width.
        spread = 0.08 + 0.1 * au["AU2"] / (au["AU1"] + au["AU2"])
        lines = _FOREHEAD_LINES * (spread, 1.0) + between_brows
        strokes += [_Stroke(line, _with_alpha(crease, 0.5 * raised), width) for line in lines]
    if au["AU4"] > 0.2:
        lines = _BROW_FURROWS + between_brows
        strokes += [_Stroke(line, _with_alpha(crease, 0.6 * au["AU4"]), width) for line in lines]
    if au["AU9"] > 0.15:
        bridge = shape[29, 1] - shape[27, 1]
        lines = _NOSE_WRINKLES + _NOSE_WRINKLE_LEVELS * (0.0, bridge) + (shape[28, 0], shape[27, 1])
        strokes += [_Stroke(line, _with_alpha(crease, 0.7 * au["AU9"]), width) for line in lines]
    cheek = au["AU6"]
    fold = 0.15 + au["AU12"] + 0.5 * (au["AU6"] + au["AU10"] + au["AU9"])
    apples = _CHEEK_APPLES + shape[[36, 45], None] * (1, 0) + (0, shape[30, 1] - 0.02 - 0.02 * cheek)
    folds = _spline_matrix(3, 4, False) @ (shape[[[31, 48, 48], [35, 54, 54]]] + _FOLDS)
    for apple, fold_line in zip(apples, folds, strict=True):
        strokes += [_Stroke(apple, _with_alpha(scene.colours["cheek"], 0.15 + 0.4 * cheek)),
                    _Stroke(fold_line, _with_alpha(crease, 0.55 * fold), width)]
    if cheek > 0.3:
        rays = shape[[36, 45], None, None] + _CROWS_FEET
        strokes += [_Stroke(ray, _with_alpha(crease, 0.5 * cheek), 0.8 * width) for ray in rays.reshape(-1, 2, 2)]
    return strokes


def _eye_strokes(scene: _Scene, shape: np.ndarray) -> list[_Stroke]:
    """Eye whites, irises, pupils and glints clipped to the lids, lid lines and the brows above."""
    colours = scene.colours
    eyes = shape[_EYES]
    outlines = _spline_matrix(6, 4, True) @ eyes
    uppers, lowers = outlines[:, :13], outlines[:, _lower_half_order(24)]
    centres = (eyes[:, 0] + eyes[:, 3]) / 2 + (scene.draws["gaze"], 0.0)
    discs = centres[:, None] + (eyes[:, 3, 0] - eyes[:, 0, 0])[:, None, None] * _EYE_DISCS
    brows = _spline_matrix(5, 3, False) @ shape[_BROWS]
    half_thickness = scene.draws["brow_thickness"] * _BROW_TAPERS
    brow_shapes = np.concatenate([brows - half_thickness, (brows + half_thickness)[:, ::-1]], axis=1)
    strokes = []
    for outline, upper, lower, disc, brow_shape in zip(outlines, uppers, lowers, discs, brow_shapes, strict=True):
        x = np.clip(disc[:, 0], upper[0, 0], upper[-1, 0])
        y = np.clip(disc[:, 1], np.interp(x, upper[:, 0], upper[:, 1]), np.interp(x, lower[:, 0], lower[:, 1]))
        iris, pupil, glint = np.split(np.column_stack([x, y]), _EYE_DISC_ENDS)
        strokes += [
            _Stroke(outline, (236, 232, 226)), _Stroke(iris, colours["iris"]), _Stroke(pupil, (12, 10, 10)),
            _Stroke(glint, (250, 250, 250, 200)), _Stroke(upper, (30, 22, 20), 0.011),
            _Stroke(lower, _with_alpha(colours["nose"], 0.6), 0.006), _Stroke(brow_shape, colours["brow"]),
        ]
    return strokes


def _nose_and_mouth_strokes(scene: _Scene, shape: np.ndarray) -> list[_Stroke]:
    colours = scene.colours
    shaded_side = -1 if math.cos(scene.draws["light_angle"]) > 0 else 1
    bridge = np.array([shape[28] + [shaded_side * 0.028, 0], shape[29] + [shaded_side * 0.03, 0],
                       shape[31 if shaded_side < 0 else 35]])
    strokes = [
        _Stroke(_smooth(bridge, closed=False), _with_alpha(colours["nose"], 0.35), 0.012),
        _Stroke(_smooth(shape[31:36], closed=False), _with_alpha(colours["nose"], 0.8), 0.01),
        _Stroke(_ellipse(shape[32] + [0, -0.008], (0.013, 0.0065), 10), colours["nostril"]),
        _Stroke(_ellipse(shape[34] + [0, -0.008], (0.013, 0.0065), 10), colours["nostril"]),
        _Stroke(_smooth(shape[48:60], closed=True), colours["lips"]),
    ]
    mouth = _smooth(shape[60:68], closed=True)
    strokes.append(_Stroke(mouth, (40, 12, 16)))
    upper, lower = _upper_and_lower(mouth)
    opening = np.interp(upper[:, 0], lower[:, 0], lower[:, 1]) - upper[:, 1]
    if opening.max() > 0.006:
        # Upper teeth hang from the upper lip and leave most of the opening dark.
        teeth_edge = upper + np.stack([np.zeros(len(opening)), np.minimum(0.022, 0.35 * opening)], axis=1)
        strokes.append(_Stroke(np.concatenate([upper, teeth_edge[::-1]]), (240, 236, 226)))
    strokes.append(_Stroke(np.concatenate([shape[48:49], upper, shape[54:55]]), colours["lip_line"], 0.008))
    return strokes


@functools.cache
def _background_mask(kind: str, variant: int, side: int) -> Image.Image:
    """How much of the pattern colour each background pixel shows: a fixed mask per kind and variant."""
    across = (np.arange(side) + 0.5) / side - 0.5
    if kind == "mottled":
        blobs = np.random.default_rng(variant).random((5, 5)) * _PATTERN_OPACITY * 255
        return Image.fromarray(blobs.astype(np.uint8), "L").resize((side, side), Image.Resampling.BICUBIC)
    angle = 2 * math.pi * variant / _BACKGROUND_VARIANTS
    position = math.cos(angle) * across[None, :] + math.sin(angle) * across[:, None]
    if kind == "gradient":
        field = 0.5 + position
    else:
        field = 0.5 + 2 * np.sin(2 * math.pi * (4 + variant) * position)
    return Image.fromarray((np.clip(field, 0, 1) * _PATTERN_OPACITY * 255).astype(np.uint8), "L")


def _background(scene: _Scene, size: int) -> Image.Image:
    """The background at SUPERSAMPLING times `size`: plain, or two colours mixed by a gradient, blobs or stripes."""
    side = size * SUPERSAMPLING
    kind = _BACKGROUND_KINDS[scene.picks["background_kind"]]
    if kind == "plain":
        return Image.new("RGB", (side, side), scene.colours["background"])
    # Mixed at the output size, where it costs a quarter; the patterns are smooth at that scale.
    base = Image.new("RGB", (size, size), scene.colours["background"])
    pattern = Image.new("RGB", (size, size), scene.colours["background_pattern"])
    mixed = Image.composite(pattern, base, _background_mask(kind, scene.picks["background_variant"], size))
    return mixed.resize((side, side), Image.Resampling.NEAREST)


def _lit(rgb: np.ndarray, draws: dict[str, float]) -> np.ndarray:
    """Directional shading, overall brightness and a warm or cool colour cast."""
    side = rgb.shape[0]
    ramp = np.linspace(-1 + 1 / side, 1 - 1 / side, side, dtype=np.float32)
    angle, strength, warmth = draws["light_angle"], draws["light_strength"], draws["warmth"]
    cast = np.array([1 + 0.08 * warmth, 1.0, 1 - 0.1 * warmth], dtype=np.float32) * draws["brightness"]
    # A gain per column (with the cast, over interleaved RGB, so no numpy loop runs over 3 channels alone)
    # times a gain per row.
    along_x = ((1 + strength * math.cos(angle) * ramp)[:, None] * cast).reshape(-1)
    along_y = (1 + strength * math.sin(angle) * ramp)[:, None]
    lit = rgb.reshape(side, -1) * along_x
    lit *= along_y
    return np.clip(lit, 0, 255, out=lit).astype(np.uint8).reshape(rgb.shape)


def _caption(scene: _Scene, expression: str, intensity: float, rng: np.random.Generator) -> str:
    d, picks = scene.draws, scene.picks
    choice = rng.random(4).tolist()
    words = _EXPRESSION_WORDS[expression]
    adjective = words[int(choice[0] * len(words))]
    if expression == "neutral":
        feeling = ("with a neutral expression", f"looking {adjective}", f"with a {adjective} face")[int(choice[1] * 3)]
    else:
        strength = _INTENSITY_WORDS[0 if intensity < WEAK_INTENSITY[1] else 1 if intensity < 0.7 else 2]
        feeling = " ".join(filter(None, ("looking", strength[int(choice[1] * len(strength))], adjective)))
    style = _HAIR_STYLES[picks["hair_style"]]
    hair = "a bald head" if style == "bald" else f"{style} {_HAIR_NAMES[picks['hair_colour']]} hair"
    if style != "bald" and d["fringe"] < _FRINGE_SHARE:
        hair += " with a fringe"
    skin = _SKIN_WORDS[round(d["skin_tone"])]
    who = (f"a synthetic face of a person with {skin} skin and {hair}",
           f"a synthetic portrait of someone with {hair} and {skin} skin",
           f"synthetic image of a {skin}-skinned person with {hair}")[int(choice[2] * 3)]
    details = [who, feeling]
    if abs(d["roll"]) > 0.1:
        details.append(f"head tilted to the {'right' if d['roll'] > 0 else 'left'}")
    if abs(d["yaw"]) > 0.15:
        details.append(f"turned slightly to the {'right' if d['yaw'] > 0 else 'left'}")
    if d["light_strength"] > 0.2:
        side = ("right", "below", "left", "above")[round(d["light_angle"] / (math.pi / 2)) % 4]
        details.append(f"lit from the {side}")
    if d["brightness"] < 0.85:
        details.append("in dim light")
    if abs(d["warmth"]) > 0.5:
        details.append(f"in {'warm' if d['warmth'] > 0 else 'cool'} light")
    if choice[3] < 0.5:
        colour = _BACKGROUND_NAMES[picks["background_colour"]]
        details.append(f"against a {_BACKGROUND_KINDS[picks['background_kind']]} {colour} background")
    return ", ".join(details)


def _whole_number(name: str, value: object, least: int = 0) -> int:
    """`value` as an int (numpy integers included), or a ValueError naming the argument."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or number < least:
        raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    return number


class SyntheticFaceGenerator:
    """Draws synthetic expression faces: face `index` is a pure function of (seed, index, size) and has
    label `index % 7` (classes in `EXPRESSIONS` order), so any run of 7 consecutive indices is balanced."""

    def __init__(self, seed: int = 0, size: int = 112) -> None:
        self.seed = _whole_number("seed", seed)
        self.size = _whole_number("size", size, MIN_SIZE)

    def render(self, index: int, label: int | None = None) -> SyntheticFace:
        """Face `index`; `label` overrides its expression while keeping its identity, pose and lighting."""
        index = _whole_number("index", index)
        label = index % NUM_CLASSES if label is None else _whole_number("label", label)
        if label >= NUM_CLASSES:
            raise ValueError(f"label must be a class index 0..{NUM_CLASSES - 1}, got {label}")
        scene = _draw_scene(np.random.default_rng([self.seed, index, 0]))
        expression_rng = np.random.default_rng([self.seed, index, 1 + label])
        activity, intensity = _draw_action_units(EXPRESSIONS[label], expression_rng)
        shape = _express(scene, activity)
        strokes = [*_head_strokes(scene, shape), *_furrow_strokes(scene, shape, activity),
                   *_eye_strokes(scene, shape), *_nose_and_mouth_strokes(scene, shape)]

        # One warp for the landmarks and every stroke, so the drawing lands exactly on the landmarks.
        warped = _warp(np.concatenate([shape, *(stroke.points for stroke in strokes)]), scene.draws)
        face_px = scene.draws["scale"] * self.size
        warped *= face_px
        margin = 0.02 * self.size
        shift = np.array([scene.draws["shift_x"], scene.draws["shift_y"]])
        centre = np.clip(self.size / 2 * (1 + shift), margin - warped[:68].min(0),
                         self.size - margin - warped[:68].max(0))
        warped += centre

        canvas = _background(scene, self.size)
        opaque, translucent = ImageDraw.Draw(canvas), ImageDraw.Draw(canvas, "RGBA")
        # PIL puts integer coordinates on pixel centres; the landmark convention puts them on pixel corners.
        flat = (warped * SUPERSAMPLING - 0.5).ravel().tolist()
        start = 2 * 68
        for points, colour, width in strokes:
            end = start + 2 * len(points)
            draw = translucent if len(colour) == 4 else opaque
            if width:
                draw.line(flat[start:end], fill=colour, width=max(1, round(width * face_px * SUPERSAMPLING)))
            else:
                draw.polygon(flat[start:end], fill=colour)
            start = end
        image = _lit(np.asarray(canvas.reduce(SUPERSAMPLING)), scene.draws)
        caption = _caption(scene, EXPRESSIONS[label], intensity, expression_rng)
        return SyntheticFace(image, label, warped[:68].astype(np.float32), caption, intensity)


class SyntheticFaceDataset(torch.utils.data.Dataset):
    """`num_images` synthetic faces of one split; train and test faces come from disjoint generator indices."""

    def __init__(self, num_images: int, split: str = "train", seed: int = 0, size: int = 112) -> None:
        num_images = _whole_number("num_images", num_images)
        if num_images > TEST_INDEX_START:
            raise ValueError(f"num_images must be at most {TEST_INDEX_START}, got {num_images}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.num_images = num_images
        self.split = split
        self.generator = SyntheticFaceGenerator(seed, size)
        self.first_index = TEST_INDEX_START if split == "test" else 0

    def __len__(self) -> int:
        return self.num_images

    @property
    def identity(self) -> str:
        """A name for the faces of this generator (keys are unique across its splits and sizes of the set)."""
        return f"synthetic-seed{self.generator.seed}-{self.generator.size}px"

    def __getitem__(self, item: int) -> FaceSample:
        if not 0 <= item < self.num_images:
            raise IndexError(f"item {item} out of range for {self.num_images} synthetic faces")
        face = self.generator.render(self.first_index + item)
        return FaceSample(face.image, face.label, face.landmarks, face.caption, self.relative_path(item))

    def key(self, item: int) -> str:
        """The key of face `item` (its relative path), without rendering it."""
        return self.relative_path(item)

    def relative_path(self, item: int) -> str:
        """Where `write_synthetic_dataset` puts face `item`, relative to the dataset root."""
        expression = EXPRESSIONS[(self.first_index + item) % NUM_CLASSES]
        return f"{self.split}/{expression}/{self.split}_{item:06d}.png"


def write_synthetic_dataset(root: str | os.PathLike, per_class: int, split: str, seed: int = 0, size: int = 112,
                            progress: bool = True) -> None:
    """Writes `per_class` synthetic faces of each class as root/<split>/<expression>/<split>_<i>.png, and
    merges their landmarks and captions into root/landmarks.npz and root/captions.json; images already
    there are kept, so an interrupted run resumes."""
    from tqdm import tqdm

    per_class = _whole_number("per_class", per_class, 1)
    root = Path(root)
    dataset = SyntheticFaceDataset(per_class * NUM_CLASSES, split, seed, size)
    landmark_path, caption_path = root / LANDMARKS_FILE, root / CAPTIONS_FILE
    landmarks = load_landmarks(landmark_path).as_dict() if landmark_path.exists() else {}
    captions = read_captions(caption_path)
    for item in tqdm(range(len(dataset)), desc=f"synthetic {split} faces", unit="image", disable=not progress):
        relative = dataset.relative_path(item)
        image_path = root / relative
        if image_path.exists() and relative in landmarks and relative in captions:
            continue
        face = dataset[item]
        if not image_path.exists():
            write_rgb(image_path, face.image)
        landmarks[relative] = face.landmarks
        captions[relative] = face.caption
    paths = tuple(sorted(landmarks))
    save_landmarks(landmark_path, LandmarkTable(paths, np.stack([landmarks[path] for path in paths]),
                                                np.ones(len(paths), dtype=bool)))
    text = json.dumps({path: captions[path] for path in sorted(captions)}, indent=1, ensure_ascii=False)
    write_atomic(caption_path, lambda file: file.write(text.encode("utf-8")))


def add_synth_command(commands: argparse._SubParsersAction) -> None:
    """Registers `lldif synth`, which writes a synthetic expression-face dataset (train and test splits)."""
    parser = commands.add_parser(
        "synth", help="write a synthetic expression-face dataset (train and test splits)",
        description="Writes synthetic cartoon expression faces as OUT_DIR/<split>/<expression>/*.png with "
                    "landmarks.npz and captions.json; re-running with the same arguments resumes.")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write the dataset into")
    parser.add_argument("--per-class", type=positive_int, required=True, help="training faces per expression")
    parser.add_argument("--test-per-class", type=non_negative_int, default=None,
                        help="test faces per expression (default: a fifth of --per-class, at least 1; 0 for none)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="generator seed (default 0)")
    parser.add_argument("--size", type=integer_at_least(MIN_SIZE, "pixels"), default=112,
                        help="image side in pixels (default 112)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> None:
        test_per_class = max(1, args.per_class // 5) if args.test_per_class is None else args.test_per_class
        for split, per_class in (("train", args.per_class), ("test", test_per_class)):
            if not per_class:
                continue
            try:
                write_synthetic_dataset(args.out_dir, per_class, split, args.seed, args.size, not args.quiet)
            except (OSError, ValueError) as error:
                parser.error(f"OUT_DIR {args.out_dir}: {error}")

    parser.set_defaults(run=run)
