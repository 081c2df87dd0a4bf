"""Figures a person would rather look at than read: training curves and confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


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


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
