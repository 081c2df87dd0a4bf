"""Write scikit-learn's handwritten digits as an image folder: a real 10-class set that installs offline.

    python scripts/make_digits.py data/digits      # then: python -m catdog.core.recipe digits --run

The UCI optical-recognition digits (1,797 images of 8x8 grey levels 0..16, 43 writers) ship inside
scikit-learn, so no download is needed. Each becomes ``<folder>/<digit>/<n>.png``, white ink on black,
scaled up to 32x32 with nearest-neighbour (the pixels stay the originals) so it passes
``data.min_image_size``; the folder layout is the class-folder layout any user's own images can have.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SCALE = 4  # 8x8 -> 32x32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write <digit>/<n>.png")
    folder = parser.parse_args().folder
    digits = load_digits()
    for index, (pixels, digit) in enumerate(zip(digits.images, digits.target)):
        grey = np.round(pixels * (255 / 16)).astype(np.uint8).repeat(SCALE, 0).repeat(SCALE, 1)
        (folder / str(digit)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey).save(folder / str(digit) / f"{index}.png")
    print(f"wrote {len(digits.target)} images of {len(digits.target_names)} classes to {folder}")


if __name__ == "__main__":
    main()
