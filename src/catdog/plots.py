"""Figures a person would rather look at than read: training curves and confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

from catdog import atomic


def training_curves(history: list[dict], best_epoch: int, path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, metric, title in ((loss_ax, "loss", "Cross-entropy loss"), (acc_ax, "accuracy", "Accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], marker="o", ms=3, label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], marker="o", ms=3, label="val")
        ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def confusion_matrix(matrix: np.ndarray, classes: tuple[str, ...], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 4.5), constrained_layout=True)
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(title)
    _save(fig, path)


def roc_pr_curves(targets: np.ndarray, scores: np.ndarray, path: Path, positive: str) -> None:
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.5), constrained_layout=True)
    RocCurveDisplay.from_predictions(targets, scores, ax=roc_ax, name=f"{positive} vs rest", plot_chance_level=True)
    PrecisionRecallDisplay.from_predictions(
        targets, scores, ax=pr_ax, name=f"{positive} vs rest", plot_chance_level=True
    )
    roc_ax.set_title("ROC curve (test split)")
    pr_ax.set_title("Precision-recall curve (test split)")
    for ax in (roc_ax, pr_ax):
        ax.grid(alpha=0.3)
    _save(fig, path)


def reliability_diagram(
    targets: np.ndarray, scores: np.ndarray, path: Path, bins: int, ece: float, positive: str
) -> None:
    fig, ax = plt.subplots(figsize=(5, 5), constrained_layout=True)
    CalibrationDisplay.from_predictions(targets, scores, n_bins=bins, ax=ax, name=f"P({positive})")
    ax.set_title(f"Reliability diagram (ECE {ece:.3f})")
    ax.grid(alpha=0.3)
    _save(fig, path)


def gallery(images: list[np.ndarray], captions: list[str], path: Path, title: str, columns: int = 4) -> None:
    """A grid of images with captions; a short note when there is nothing to show."""
    if not images:
        fig, ax = plt.subplots(figsize=(6, 1.5), constrained_layout=True)
        ax.text(0.5, 0.5, "No misclassified test images", ha="center", va="center", fontsize=13)
        ax.axis("off")
        _save(fig, path)
        return
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False, constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image)
        ax.set_title(caption, fontsize=9)
    fig.suptitle(title)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic.replacing(path) as temporary:
        fig.savefig(temporary, dpi=120, metadata={"Software": None})  # the same figure, the same bytes
    plt.close(fig)
