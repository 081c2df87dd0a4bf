"""Labelled image sets of real JPEG and PNG files, in every layout prepare reads, as a folder or a zip.

    from image_sets import build_image_set
    images = build_image_set(tmp_path / "set", "class_folders", ["Golden Retriever", "cat", "Élan"], 8)
    params = build_params({**images.params, "data.min_per_class": 4})

Each class has its own hue (and a darker blob placed at random), so a tiny model learns them in an epoch
or two; images alternate JPEG and PNG and vary a little in size. Layouts (see catdog.data.layouts):
``kaggle_names`` (``train/<class>.<n>.jpg``), ``class_folders`` (``<class>/<n>.jpg``),
``split_folders`` (``train|val|test/<class>/<n>.jpg``; ``splits`` says which folders, the images of a
class dealt round-robin over them) and ``csv`` (``images/<n>.jpg`` with ``labels.csv``).
"""

from __future__ import annotations

import colorsys
import csv
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

LAYOUTS = ("kaggle_names", "class_folders", "split_folders", "csv")


@dataclass
class ImageSet:
    source: Path  # the folder or the zip: data.source
    classes: list[str]
    files: dict[str, bytes]  # every image: relative path -> bytes
    labels: dict[str, str]  # relative path -> class
    splits: dict[str, str] = field(default_factory=dict)  # relative path -> given split (split_folders)
    params: dict[str, object] = field(default_factory=dict)  # the data.* overrides that read it


def colour_of(class_index: int, n_classes: int) -> tuple[int, int, int]:
    """Evenly spaced hues: far apart for any number of classes."""
    red, green, blue = colorsys.hsv_to_rgb(class_index / n_classes, 0.75, 0.85)
    return round(red * 255), round(green * 255), round(blue * 255)


def image_bytes(class_index: int, n_classes: int, index: int, fmt: str = "JPEG", size=(64, 56)) -> bytes:
    """A seeded noisy image in its class's hue, encoded as ``fmt`` (JPEG or PNG)."""
    rng = np.random.default_rng([class_index, n_classes, index])
    width, height = size
    pixels = np.array(colour_of(class_index, n_classes), np.float32) + rng.normal(0, 12, (height, width, 3))
    y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
    pixels[y : y + height // 3, x : x + width // 3] *= 0.7
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def class_images(classes: list[str], n_per_class: int, start: int = 0) -> list[tuple[str, int, str, bytes]]:
    """(class, index, suffix, bytes) for ``n_per_class`` images of each class, JPEG and PNG in turn."""
    images = []
    for class_index, label in enumerate(classes):
        for index in range(start, start + n_per_class):
            fmt, suffix = ("JPEG", ".jpg") if index % 2 == 0 else ("PNG", ".png")
            size = (64 + (index % 3) * 8, 56 + (index % 2) * 8)
            images.append((label, index, suffix, image_bytes(class_index, len(classes), index, fmt, size)))
    return images


def layout_files(
    layout: str, classes: list[str], n_per_class: int, splits: tuple[str, ...] = ("train", "val", "test")
) -> tuple[dict[str, bytes], dict[str, str], dict[str, str]]:
    """(files, labels, given splits) of a set in ``layout``: relative path -> bytes / class / split."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    files, labels, given = {}, {}, {}
    for label, index, suffix, data in class_images(classes, n_per_class):
        if layout == "kaggle_names":
            name = f"train/{label}.{index}{suffix}"
        elif layout == "class_folders":
            name = f"{label}/{index}{suffix}"
        elif layout == "split_folders":
            given_split = splits[index % len(splits)]
            name = f"{given_split}/{label}/{index}{suffix}"
            given[name] = given_split
        else:  # csv: one flat folder, the labels only in labels.csv
            name = f"images/{classes.index(label)}-{index}{suffix}"
        files[name], labels[name] = data, label
    if layout == "csv":
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([("path", "label"), *labels.items()])
        files["labels.csv"] = text.getvalue().encode()
    return files, labels, given


def write_source(path: Path, files: dict[str, bytes], as_zip: bool = False) -> Path:
    """``files`` as a folder at ``path``, or as the zip ``path`` (deflated, as most zips are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_zip:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return path
    for name, data in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return path


def build_image_set(
    path: Path,
    layout: str,
    classes: list[str],
    n_per_class: int,
    as_zip: bool = False,
    splits: tuple[str, ...] = ("train", "val", "test"),
) -> ImageSet:
    """An image set written at ``path`` (a folder, or a zip with ``as_zip``); ``params`` points prepare at it."""
    files, labels, given = layout_files(layout, classes, n_per_class, splits)
    source = write_source(path.with_suffix(".zip") if as_zip else path, files, as_zip)
    params = {"data.source": str(source), "data.labels": "labels.csv" if layout == "csv" else None}
    images = {name: data for name, data in files.items() if name in labels}
    return ImageSet(source, list(classes), images, labels, given, params)
