"""Landmark layouts: the 68-point iBUG order, MTCNN's 5 points, their mirror maps and a mean face shape.

Points are (x, y) in pixels of the image they belong to, x to the right and y down, continuous: pixel (i, j)
covers [i, i+1) x [j, j+1), so its centre is (i + 0.5, j + 0.5). "Left" means image left. A mean shape is given
in unit coordinates of a square face crop and scaled with `mean_shape`.
"""

from __future__ import annotations

import numpy as np
import torch

# Index of each point's mirror image under a horizontal flip.
FLIP_68 = np.array(
    [*range(16, -1, -1),                       # jaw 0..16
     26, 25, 24, 23, 22, 21, 20, 19, 18, 17,   # brows 17..26
     27, 28, 29, 30, 35, 34, 33, 32, 31,       # nose bridge, nostrils 31..35
     45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,  # eyes 36..47
     54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,  # outer lip 48..59
     64, 63, 62, 61, 60, 67, 66, 65],          # inner lip 60..67
    dtype=np.int64,
)
FLIP_5 = np.array([1, 0, 2, 4, 3], dtype=np.int64)  # left eye, right eye, nose, left and right mouth corner

# The image-left half (and the midline) of a neutral frontal face in a unit square crop; the right half is
# its mirror image, so the shape is symmetric by construction.
_LEFT_HALF_68 = {
    **{k: (0.5 - 0.40 * np.cos(np.pi * k / 16), 0.40 + 0.52 * np.sin(np.pi * k / 16)) for k in range(9)},
    17: (0.17, 0.315), 18: (0.23, 0.29), 19: (0.30, 0.285), 20: (0.37, 0.29), 21: (0.44, 0.305),
    27: (0.50, 0.40), 28: (0.50, 0.47), 29: (0.50, 0.54), 30: (0.50, 0.61),
    31: (0.42, 0.65), 32: (0.46, 0.665), 33: (0.50, 0.67),
    36: (0.255, 0.41), 37: (0.305, 0.385), 38: (0.355, 0.385), 39: (0.405, 0.41), 40: (0.355, 0.432),
    41: (0.305, 0.432),
    48: (0.37, 0.77), 49: (0.41, 0.745), 50: (0.455, 0.735), 51: (0.50, 0.74), 57: (0.50, 0.82),
    58: (0.455, 0.815), 59: (0.41, 0.80),
    60: (0.39, 0.77), 61: (0.45, 0.765), 62: (0.50, 0.767), 66: (0.50, 0.777), 67: (0.45, 0.775),
}


def _mean_shape_unit() -> np.ndarray:
    shape = np.full((68, 2), np.nan)
    for index, point in _LEFT_HALF_68.items():
        shape[index] = point
        shape[FLIP_68[index]] = (1.0 - point[0], point[1])
    assert not np.isnan(shape).any()
    return shape


MEAN_SHAPE_68_UNIT: np.ndarray = _mean_shape_unit()


def mean_shape(width: int, height: int, points: int = 68) -> np.ndarray:
    """The mean face's landmarks (68 or 5 points) for an aligned face crop of the given size, float32."""
    shape = MEAN_SHAPE_68_UNIT * np.array([width, height], dtype=np.float64)
    if points == 5:
        shape = five_from_68(shape)
    elif points != 68:
        raise ValueError(f"points must be 68 or 5, got {points}")
    return shape.astype(np.float32)


def five_from_68(points: np.ndarray) -> np.ndarray:
    """MTCNN's five points (eye centres, nose tip, mouth corners) from 68 iBUG points, shape (..., 5, 2); numpy
    arrays and torch tensors alike."""
    if points.shape[-2:] != (68, 2):
        raise ValueError(f"points must have shape (..., 68, 2), got {tuple(points.shape)}")
    stack = torch.stack if isinstance(points, torch.Tensor) else np.stack
    return stack(
        [points[..., 36:42, :].mean(-2), points[..., 42:48, :].mean(-2), points[..., 30, :],
         points[..., 48, :], points[..., 54, :]],
        -2,
    )


def flip_landmarks(points: np.ndarray, width: int) -> np.ndarray:
    """Landmarks of the horizontally flipped image: x mirrored and points renumbered (68 or 5 points)."""
    count = points.shape[-2]
    order = {68: FLIP_68, 5: FLIP_5}.get(count)
    if order is None or points.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 68 or 5, 2), got {tuple(points.shape)}")
    flipped = points[..., order, :].copy()
    flipped[..., 0] = width - flipped[..., 0]
    return flipped
