"""Reading prepare's outputs: the manifest and the decoded image cache."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from catdog.core.errors import CatdogError
from catdog.core.paths import Paths
from catdog.core.seeding import seed_worker
from catdog.data.integrity import recorded_classes


@dataclass(frozen=True)
class Split:
    name: str
    rows: np.ndarray  # row numbers into images.npy
    labels: np.ndarray  # class indices into ``classes``
    paths: list[str]
    classes: list[str]  # prepare's class names, in model output order


def load_split(paths: Paths, name: str) -> Split:
    if not paths.manifest.is_file():
        raise CatdogError(f"{paths.manifest} not found: run the prepare stage first (dvc repro prepare)")
    classes = recorded_classes(paths)
    rows, labels, files = [], [], []
    with paths.manifest.open(newline="") as handle:
        for row_number, row in enumerate(csv.DictReader(handle)):
            if row["split"] == name:
                rows.append(row_number)
                labels.append(classes.index(row["label"]))
                files.append(row["path"])
    if not rows:
        raise CatdogError(f"the {name} split is empty: add images or change data.*_fraction")
    return Split(name, np.asarray(rows), np.asarray(labels), files, classes)


def split_digest(split: Split) -> str:
    """Which images (source paths and labels) make up ``split``: equal digests, comparable scores."""
    members = sorted(f"{path}\t{split.classes[label]}" for path, label in zip(split.paths, split.labels))
    return hashlib.md5("\n".join(members).encode()).hexdigest()


class CachedImages(Dataset):
    """Images of one split straight from the uint8 memmap: no JPEG decode per epoch."""

    def __init__(self, paths: Paths, split: Split, transform):
        self.images_file = paths.images
        self.split = split
        self.transform = transform
        self._images = None  # opened lazily so each DataLoader worker maps the file itself

    def __len__(self) -> int:
        return len(self.split.rows)

    def __getitem__(self, index: int):
        if self._images is None:
            self._images = np.load(self.images_file, mmap_mode="r")
        pixels = torch.from_numpy(np.array(self._images[self.split.rows[index]])).permute(2, 0, 1)
        return self.transform(pixels), int(self.split.labels[index])


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    pin_memory: bool = False,
    sampler: Sampler | None = None,
    persistent_workers: bool = True,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        worker_init_fn=seed_worker,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and workers > 0,
    )
