"""catdog.core.plots: the evaluate figures are written as PNGs whose size follows the number of classes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from catdog.core import plots

from conftest import PNG_SIGNATURE


def confusion(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    matrix = rng.integers(0, 3, size=(n, n))
    matrix[np.arange(n), np.arange(n)] += 10
    return matrix


@pytest.mark.parametrize("n", [2, 3, 50])
def test_confusion_matrix_png_is_legible_in_size(tmp_path, n):
    path = tmp_path / "confusion.png"
    plots.confusion_matrix(confusion(n), [f"class_{i:02d}" for i in range(n)], path, title=f"{n} classes")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    width, height = Image.open(path).size
    # two square panels side by side: 0.24 inch (29 px at 120 dpi) per class past 2 classes, capped at 13 inches
    assert 1.8 * height <= width <= 2.4 * height
    assert 500 <= height <= 1600
    assert height >= 1500 if n == 50 else height <= 700  # 50 classes get ~30 px per cell


def test_confusion_matrix_of_a_class_no_test_image_has(tmp_path):
    matrix = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 4]])  # the second class has no test image: its row is 0
    path = tmp_path / "confusion.png"
    plots.confusion_matrix(matrix, ["a", "b", "c"], path, title="a row of zeros")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_roc_pr_curves_for_many_classes(tmp_path):
    rng = np.random.default_rng(0)
    n = 12
    targets = np.repeat(np.arange(n), 4)
    scores = rng.random((len(targets), n))
    scores[np.arange(len(targets)), targets] += 0.5
    one_hot = np.eye(n, dtype=int)[targets]
    curves = [(f"c{i}", one_hot[:, i], scores[:, i]) for i in range(n)]
    path = tmp_path / "curves.png"
    plots.roc_pr_curves(curves, path, ("ROC", "PR"), pooled=("micro-average", one_hot.ravel(), scores.ravel()))
    assert Image.open(path).size == (1200, 540)  # 10 x 4.5 inches at 120 dpi, whatever the class count
