"""data/prepared for any classes, written the way prepare writes it (images.npy, manifest.csv,
content.json through catdog.data.integrity), without decoding files: the training tests of N classes
start from prepare's outputs, whatever prepare's own naming rules read.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from catdog.core.paths import Paths
from catdog.data import integrity


def class_colour(index: int, count: int) -> np.ndarray:
    """Mean colours spread round the hue circle: any number of classes stays separable."""
    angle = 2 * np.pi * index / count
    return 128 + 90 * np.array([np.cos(angle), np.cos(angle - 2 * np.pi / 3), np.cos(angle + 2 * np.pi / 3)])


def write_prepared(root: Path, counts: dict[str, int], size: int = 32, seed: int = 0) -> Paths:
    """``counts[name]`` noisy images of each class at ``size`` px; of each class, every fifth image is
    val and every fifth (offset by one) test, the rest train. Returns the project's Paths."""
    paths = Paths.under(root)
    paths.prepared.mkdir(parents=True, exist_ok=True)
    classes = sorted(counts)
    rng = np.random.default_rng(seed)
    images, rows = [], []
    for index, name in enumerate(classes):
        for number in range(counts[name]):
            pixels = class_colour(index, len(classes)) + rng.normal(0, 25, (size, size, 3))
            image = np.clip(pixels, 0, 255).astype(np.uint8)
            split = {0: "val", 1: "test"}.get(number % 5, "train")
            images.append(image)
            rows.append([f"{name}/{number}.png", name, split, hashlib.md5(image.tobytes()).hexdigest()])
    np.save(paths.images, np.stack(images))
    with paths.manifest.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "split", "pixel_md5"])
        writer.writerows(rows)
    integrity.record(paths, classes)
    return paths
