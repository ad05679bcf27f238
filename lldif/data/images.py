"""Reading any face image as 8-bit RGB, with one error type for everything that can go wrong, and atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
MIN_IMAGE_SIDE = 16  # below this a face cannot be recognised; such files are reported, not trained on

# Pillow otherwise returns half-decoded truncated JPEGs without complaint.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temporary files are created private (0600); the renamed result gets the mode a plain open() would give.
_NEW_FILE_MODE = 0o666 & ~_process_umask()


class ImageReadError(ValueError):
    """A file that cannot be used as a face image; `reason` says why in a few words."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether the file name has one of the image suffixes the readers accept."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def to_rgb(image: Image.Image) -> np.ndarray:
    """An (H, W, 3) uint8 array from a Pillow image of any mode: grey is repeated, alpha is composited onto
    black, palettes and CMYK are converted, 16-bit and float images are scaled to 8 bits by their full range."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        full = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_rgb(path: str | os.PathLike, min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """The image at `path` as (H, W, 3) uint8 RGB; raises ImageReadError for missing, corrupt, truncated
    or tiny files."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = to_rgb(image)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image Pillow can read (corrupt or unknown format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(path, f"corrupt or truncated image ({error})") from None
    if min(rgb.shape[:2]) < min_side:
        raise ImageReadError(path, f"too small ({rgb.shape[1]}x{rgb.shape[0]}, need at least {min_side} px a side)")
    return rgb


def write_atomic(path: str | os.PathLike, write) -> None:
    """Runs `write(file_object)` on a temporary file beside `path`, syncs it and renames it over `path`, so
    a reader (or a resumed run) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fchmod(file.fileno(), _NEW_FILE_MODE)
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_rgb(rgb: np.ndarray) -> None:
    """Raises ValueError naming `rgb` unless it is an (H, W, 3) uint8 array."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be an (H, W, 3) uint8 array, got {getattr(rgb, 'dtype', type(rgb).__name__)} "
                         f"{getattr(rgb, 'shape', '')}")


def write_rgb(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> None:
    """Writes an (H, W, 3) uint8 array atomically, in the format the suffix names (JPEG at `quality`)."""
    check_rgb(rgb)
    image = Image.fromarray(rgb, "RGB")
    suffix = Path(path).suffix.lower()
    image_format = Image.registered_extensions().get(suffix)
    if image_format is None:
        raise ValueError(f"path has no image suffix Pillow can write: {path}")
    options = {"quality": quality} if image_format == "JPEG" else {}
    write_atomic(path, lambda file: image.save(file, format=image_format, **options))
