"""Figures a person would rather look at than read: training curves, confusion matrix, curves, gallery."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

from catdog.core import atomic

CELL_TEXT_MAX = 20  # classes up to which the confusion matrix prints a number in each cell
LEGEND_MAX = 10  # one-vs-rest curves up to which each class has a legend entry


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


def confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Counts and row-normalised (each row: where that class's images went), legible up to ~50 classes:
    figure and font scale with the class count, x labels turn vertical, cells lose their numbers past
    ``CELL_TEXT_MAX`` classes (a colour bar reads them then)."""
    n = len(classes)
    side = float(np.clip(0.24 * n + 2.5, 4.5, 13))  # inches per panel: 2 classes 4.5, 50 classes 13
    font = float(np.clip(11 - n / 5, 5, 10))
    support = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, support, out=np.zeros(matrix.shape), where=support > 0)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 0.5, side), constrained_layout=True)
    panels = ((matrix, "d", "Counts", None), (normalised, ".2f", "Row-normalised (recall on the diagonal)", (0, 1)))
    for ax, (values, fmt, name, limits) in zip(axes, panels):
        ConfusionMatrixDisplay(values, display_labels=classes).plot(
            ax=ax,
            cmap="Blues",
            include_values=n <= CELL_TEXT_MAX,
            values_format=fmt,
            colorbar=n > CELL_TEXT_MAX,
            xticks_rotation="vertical" if n > 4 else "horizontal",
            im_kw=dict(zip(("vmin", "vmax"), limits or ())),
            text_kw={"fontsize": font},
        )
        ax.tick_params(labelsize=font)
        ax.set_title(name, fontsize=max(font, 9))
    fig.suptitle(title)
    _save(fig, path)


def roc_pr_curves(
    curves: list[tuple[str, np.ndarray, np.ndarray]],
    path: Path,
    titles: tuple[str, str],
    pooled: tuple[str, np.ndarray, np.ndarray] | None = None,
) -> None:
    """One-vs-rest ROC and PR curves, one per ``(class, is_that_class, score)``; ``pooled`` (the micro-average)
    is drawn bold on top. Past ``LEGEND_MAX`` curves, only the pooled one is in the legend."""
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.5), constrained_layout=True)
    thin = {"linewidth": 1, "alpha": 0.6} if pooled else None
    for display, ax in ((RocCurveDisplay, roc_ax), (PrecisionRecallDisplay, pr_ax)):
        for index, (name, truth, scores) in enumerate(curves):
            last = pooled is None and index == len(curves) - 1
            display.from_predictions(
                truth, scores, ax=ax, name=f"{name} vs rest", curve_kwargs=thin, plot_chance_level=last
            )
        if pooled:
            name, truth, scores = pooled
            bold = {"linewidth": 2.5, "color": "black"}
            display.from_predictions(truth, scores, ax=ax, name=name, curve_kwargs=bold, plot_chance_level=True)
            # many classes: the legend names the micro-average and the chance level (the last two lines)
            ax.legend(handles=ax.lines[-2:] if len(curves) > LEGEND_MAX else None, fontsize="small")
        ax.grid(alpha=0.3)
    roc_ax.set_title(titles[0])
    pr_ax.set_title(titles[1])
    _save(fig, path)


def reliability_diagram(
    outcomes: np.ndarray,
    scores: np.ndarray,
    path: Path,
    bins: int,
    ece: float,
    name: str,
    axis_labels: tuple[str, str] | None = None,
) -> None:
    """Fraction of ``outcomes`` that are 1 per bin of ``scores``: P(positive) for two classes, the
    top-class confidence against being right for more."""
    fig, ax = plt.subplots(figsize=(5, 5), constrained_layout=True)
    CalibrationDisplay.from_predictions(outcomes, scores, n_bins=bins, ax=ax, name=name)
    if axis_labels:
        ax.set(xlabel=axis_labels[0], ylabel=axis_labels[1])
    ax.set_title(f"Reliability diagram (ECE {ece:.3f})")
    ax.grid(alpha=0.3)
    _save(fig, path)


def gallery(
    images: list[np.ndarray | None],
    captions: list[str],
    path: Path,
    title: str,
    columns: int = 4,
    panel_inches: float = 3.0,
    empty: str = "No misclassified test images",
) -> None:
    """A grid of images (HxWx3, or HxW drawn in a colour map) with captions, ``columns`` a row; a None
    leaves its place blank; the note ``empty`` when there is nothing to show."""
    if not images:
        fig, ax = plt.subplots(figsize=(6, 1.5), constrained_layout=True)
        ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=13)
        ax.axis("off")
        _save(fig, path)
        return
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(panel_inches * columns, panel_inches * 1.1 * rows),
        squeeze=False,
        constrained_layout=True,
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        if image is not None:
            ax.imshow(image)
            ax.set_title(caption, fontsize=9)
    fig.suptitle(title)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic.replacing(path) as temporary:
        fig.savefig(temporary, dpi=120, metadata={"Software": None})  # the same figure, the same bytes
    plt.close(fig)
