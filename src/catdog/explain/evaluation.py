"""Evaluate's views of where a model fails: heatmap galleries of test images and the most-confused pairs.

``confidently_wrong.png``: each of the most confidently wrong test images beside its map for the class the
model said and for the true class (what misled it, and what it missed). ``heatmaps.png``: the most
confidently right test images of each class (up to ``HEATMAP_CLASSES`` classes) with their maps: what it
looks at when it is right. ``most_confused``: every (true, predicted) pair of the confusion matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from catdog.core import plots
from catdog.data.dataset import CachedImages
from catdog.explain.cam import activation_maps, overlay, to_pixels

HEATMAP_CLASSES = 20  # heatmaps.png shows the first classes, in model output order
HEATMAPS_PER_CLASS = 3
MOST_CONFUSED_COLUMNS = ("true", "predicted", "count", "share")


def most_confused(matrix: np.ndarray, classes: list[str]) -> list[dict]:
    """Every off-diagonal cell that holds an image, largest count first (then the larger share of its true
    class, then output order): ``MOST_CONFUSED_COLUMNS``, the share of the true class's test images."""
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    cells = [(t, p) for t in range(len(classes)) for p in range(len(classes)) if t != p and matrix[t, p]]
    cells.sort(key=lambda cell: (-matrix[cell], -shares[cell], cell))
    return [
        {"true": classes[t], "predicted": classes[p], "count": int(matrix[t, p]), "share": float(shares[t, p])}
        for t, p in cells
    ]


def heatmap_galleries(
    model: nn.Module,
    arch: str,
    images: CachedImages,
    targets: np.ndarray,
    probabilities: np.ndarray,
    method: str,
    gallery_size: int,
    figures: tuple[Path, Path],
) -> None:
    """confidently_wrong.png and heatmaps.png (``figures``) of the test ``images`` (the split's dataset, model
    input) with their class activation maps (``method``), from the predicted ``probabilities``."""
    classes, predicted = images.split.classes, probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != targets)
    worst = wrong[np.argsort(-probabilities[wrong].max(1), kind="stable")][:gallery_size].tolist()
    captions = [
        f"{Path(images.split.paths[i]).name}\ntrue {classes[targets[i]]}, said {classes[predicted[i]]} "
        f"({probabilities[i].max():.0%})"
        for i in worst
    ]
    title = f"Most confidently wrong test images ({len(wrong)} wrong of {len(targets)}), where the model saw each class"
    confidently_wrong(
        model,
        arch,
        _batch(images, worst),
        captions,
        [int(predicted[i]) for i in worst],
        [int(targets[i]) for i in worst],
        classes,
        method,
        figures[0],
        title,
    )
    right = right_choices(targets, probabilities, len(classes))
    right_per_class(
        model,
        arch,
        _batch(images, right),
        [int(targets[i]) for i in right],
        [float(probabilities[i].max()) for i in right],
        classes,
        method,
        figures[1],
    )


def _batch(images: CachedImages, indices: list[int]) -> torch.Tensor:
    """The model input of ``images[indices]``, [N, 3, H, W] (N may be 0)."""
    return torch.stack([images[i][0] for i in indices]) if indices else torch.zeros(0, *images[0][0].shape)


def confidently_wrong(
    model: nn.Module,
    arch: str,
    images: torch.Tensor,
    captions: list[str],
    said: list[int],
    true: list[int],
    classes: list[str],
    method: str,
    path: Path,
    title: str,
) -> None:
    """``images`` (model input) with their maps for the class said and for the true one, two images a row."""
    pixels = to_pixels(images)
    said_maps = activation_maps(model, arch, images, said, method)
    true_maps = activation_maps(model, arch, images, true, method)
    panels, texts = [], []
    for image, caption, s, t, said_map, true_map in zip(pixels, captions, said, true, said_maps, true_maps):
        panels += [image, overlay(image, said_map), overlay(image, true_map)]
        texts += [caption, f"where it saw {classes[s]}", f"where it saw {classes[t]}"]
    plots.gallery(panels, texts, path, title, columns=6, panel_inches=2.4)


def right_per_class(
    model: nn.Module,
    arch: str,
    images: torch.Tensor,
    labels: list[int],
    confidences: list[float],
    classes: list[str],
    method: str,
    path: Path,
) -> None:
    """``images`` (model input, correctly classified, labels given) beside their maps, one row per class."""
    pixels = to_pixels(images)
    maps = activation_maps(model, arch, images, labels, method)
    rows: dict[int, list] = {}
    for image, label, confidence, heatmap in zip(pixels, labels, confidences, maps):
        rows.setdefault(label, []).extend(
            [(image, f"{classes[label]} ({confidence:.0%})"), (overlay(image, heatmap), "")]
        )
    panels, texts = [], []
    for label in sorted(rows):
        row = rows[label] + [(None, "")] * (2 * HEATMAPS_PER_CLASS - len(rows[label]))
        panels += [panel for panel, _ in row]
        texts += [text for _, text in row]
    shown = f" (first {HEATMAP_CLASSES} of {len(classes)} classes)" if len(classes) > HEATMAP_CLASSES else ""
    plots.gallery(
        panels,
        texts,
        path,
        f"Most confident right test images per class, with where the model saw it{shown}",
        columns=2 * HEATMAPS_PER_CLASS,
        panel_inches=2.0,
        empty="No correctly classified test images",
    )


def right_choices(targets: np.ndarray, probabilities: np.ndarray, classes: int) -> list[int]:
    """Indices of the ``HEATMAPS_PER_CLASS`` most confident right predictions of each of the first
    ``HEATMAP_CLASSES`` classes."""
    predicted = probabilities.argmax(1)
    order = np.argsort(-probabilities.max(1), kind="stable")
    chosen = []
    for label in range(min(classes, HEATMAP_CLASSES)):
        chosen += [int(i) for i in order if targets[i] == label and predicted[i] == label][:HEATMAPS_PER_CLASS]
    return chosen
