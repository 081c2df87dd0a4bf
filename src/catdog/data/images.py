"""Decoding one image file into the uint8 RGB array every stage and `catdog predict` use.

Kept free of torch so the predict CLI starts fast.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A 200x200 photo is ~40k pixels; anything past this is a decompression bomb, not a pet.
Image.MAX_IMAGE_PIXELS = 64_000_000


class BadImage(ValueError):
    """The bytes are not a usable image; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def check_size(size: int, max_bytes: int) -> None:
    """BadImage ``too_large`` for an image of more than ``max_bytes`` (``data.max_image_bytes``)."""
    if size > max_bytes:
        raise BadImage("too_large", f"{size} bytes > {max_bytes} (data.max_image_bytes)")


def read_bounded(stream: BinaryIO, declared_size: int, max_bytes: int) -> bytes:
    """The bytes of ``stream``, refused before reading when its declared size is over the cap,
    and stopped at the cap when it holds more than it declared (a zip member that lies)."""
    check_size(declared_size, max_bytes)
    data = stream.read(max_bytes + 1)
    check_size(len(data), max_bytes)
    return data


def read_file(path: str | Path, max_bytes: int) -> bytes:
    with open(path, "rb") as handle:
        return read_bounded(handle, os.fstat(handle.fileno()).st_size, max_bytes)


def decode_image(data: bytes, size: int, min_size: int = 1) -> np.ndarray:
    """Fully decode ``data`` to a ``size`` x ``size`` x 3 uint8 RGB array.

    EXIF orientation is applied, any mode (grayscale, CMYK, palette, RGBA) becomes RGB,
    and the image is squashed to a square so no part of the animal is cropped away.
    """
    if not data:
        raise BadImage("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; a bomb is a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if min(image.size) < min_size:
                    raise BadImage("too_small", f"{image.size[0]}x{image.size[1]} < {min_size}px")
                # JPEG: decode big photos at 1/2, 1/4 or 1/8 scale, still >= 2x size, so the resize
                # below keeps antialiasing (a no-op for photos under 4x size, e.g. Kaggle's)
                image.draft(None, (2 * size, 2 * size))
                image = ImageOps.exif_transpose(image)  # a full decode, so truncation shows here
                if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                    image = _flatten_alpha(image)
                image = image.convert("RGB").resize((size, size), Image.BILINEAR)
                return np.asarray(image, dtype=np.uint8)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise BadImage("not_an_image", "unrecognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage("corrupt", str(exc)) from None


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite on white: transparent pixels carry arbitrary colours otherwise."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba)


def resize(array: np.ndarray, size: int) -> np.ndarray:
    """Resize an already decoded HxWx3 array (the cache) to the model's input size."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR), dtype=np.uint8)
