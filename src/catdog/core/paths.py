"""Every file the pipeline reads or writes, named once, relative to the project root, and the
user's cache outside every project (``cache_root``).

dvc.yaml declares the same files as the stages' deps, outs, metrics and plots; tests/test_paths.py
checks that the two agree. Kept free of torch and MLflow (predict imports it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The files of an exported model's folder (models/export/, or a registered model's download):
# predict finds the labels and preprocessing beside whichever model.onnx it is given.
ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"
PT2_EXTRA = "catdog.json"  # inside model.pt2 (a torch.export extra file): its arch, for explanations
LABELS_FILE = "labels.json"
PREPROCESS_FILE = "preprocess.json"
CARD_FILE = "MODEL_CARD.md"
INT8_FILE = "model.int8.onnx"  # the int8 variant (catdog.models.variants)
CLASSES_METADATA = "classes"  # model.onnx metadata_props: the class names in output order, as JSON
VARIANTS_FILE = "variants.json"  # the variants that passed export's check against fp32, with each file's md5
CACHE_ENV = "CATDOG_CACHE"


def cache_root() -> Path:
    """The user's catdog cache, outside every project (frozen graphs, features, verified md5s):
    ``$CATDOG_CACHE`` or ``~/.cache/catdog``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "catdog")


def find_root(start: Path) -> Path | None:
    """The project root: ``start`` or the nearest folder above it with a ``dvc.yaml``."""
    start = start.resolve()
    return next((folder for folder in (start, *start.parents) if (folder / "dvc.yaml").is_file()), None)


# The folders the stages write into, relative to the project root.
_PREPARED, _TRAIN, _EVALUATE, _EXPORTED = "data/prepared", "reports/train", "reports/evaluate", "models/export"
_AUDIT = "reports/audit"


def _at(*parts: str, doc: str | None = None) -> property:
    """A ``Paths`` property: the location ``root / parts...``."""
    return property(lambda paths: paths.root.joinpath(*parts), doc=doc)


@dataclass(frozen=True)
class Paths:
    """Each location is a property (``paths.manifest``, ...): tests/test_lineage.py finds the files a
    stage uses from the ``paths.<property>`` it reads, and tests/test_paths.py lists them all."""

    root: Path

    @classmethod
    def under(cls, root: str | Path = ".") -> Paths:
        return cls(Path(root).resolve())

    # the project's own files, logged as a run's lineage
    params_file = _at("params.yaml")
    dvc_yaml = _at("dvc.yaml")
    dvc_lock = _at("dvc.lock")

    # prepare
    prepared = _at(_PREPARED)
    manifest = _at(_PREPARED, "manifest.csv")
    images = _at(_PREPARED, "images.npy")
    prepared_content = _at(
        _PREPARED,
        "content.json",
        doc="Size and md5 of images.npy and manifest.csv, as prepare wrote them (catdog.data.integrity).",
    )
    rejected = _at(_PREPARED, "rejected.csv", doc="Every skipped file and why.")
    prepare_summary = _at(
        _PREPARED,
        "summary.json",
        doc="Counts per split and class, rejects per reason (inside the prepared folder: a DVC output).",
    )
    prepare_metrics = _at("reports/prepare/metrics.json", doc="Headline DVC metrics: images per split.")

    # audit
    audit_metrics = _at(_AUDIT, "metrics.json", doc="Headline DVC metrics: flagged, near-duplicate groups, outliers.")
    label_issues = _at(
        _AUDIT, "label_issues.csv", doc="One row per flagged image, most likely wrong first: path, split, given, ..."
    )
    label_issues_plot = _at(_AUDIT, "label_issues.png", doc="The most likely mislabelled images, given vs suggested.")
    other_issues = _at(
        _AUDIT, "other_issues.csv", doc="Near-duplicate sets and outliers: issue, group, path, split, label."
    )

    # train
    checkpoint = _at("models/checkpoint.pt")
    train_state = _at(
        "models/train_state.pt", doc="Resumable training state, rewritten every epoch (git-ignored, not a DVC output)."
    )
    train_reports = _at(_TRAIN)
    train_metrics = _at(_TRAIN, "metrics.json", doc="Headline DVC metrics: best epoch, its val accuracy and loss.")
    train_history = _at(_TRAIN, "history.csv")
    train_curves = _at(_TRAIN, "curves.png")

    # evaluate
    evaluate_reports = _at(_EVALUATE)
    evaluate_metrics = _at(_EVALUATE, "metrics.json", doc="Headline DVC metrics of the test split.")
    evaluate_details = _at(
        _EVALUATE, "details.json", doc="Every test figure (per class, PR-AUC, ...): a DVC output, not a metric."
    )
    predictions = _at(_EVALUATE, "predictions.csv")
    per_class_report = _at(
        _EVALUATE, "per_class.csv", doc="Precision, recall, F1 and support of every class: details, not DVC metrics."
    )
    roc_points = _at(_EVALUATE, "roc.csv")
    pr_points = _at(_EVALUATE, "pr.csv")
    confusion_matrix_plot = _at(_EVALUATE, "confusion_matrix.png")
    roc_pr_plot = _at(_EVALUATE, "roc_pr_curves.png")
    reliability_plot = _at(_EVALUATE, "reliability.png")
    confidently_wrong_plot = _at(
        _EVALUATE, "confidently_wrong.png", doc="Each image beside its heatmaps for the class said and the true class."
    )
    heatmaps_plot = _at(_EVALUATE, "heatmaps.png", doc="Confidently right test images per class, with heatmaps.")
    most_confused = _at(_EVALUATE, "most_confused.csv", doc="true, predicted, count, share of the true class.")

    # export
    exported = _at(_EXPORTED)
    parity = _at(_EXPORTED, "parity.json", doc="Exported vs eager logits and accuracy on test images.")
    onnx_model = _at(_EXPORTED, ONNX_FILE)
    pt2_model = _at(_EXPORTED, PT2_FILE)
    labels = _at(_EXPORTED, LABELS_FILE)
    preprocess = _at(_EXPORTED, PREPROCESS_FILE)
    model_card = _at(_EXPORTED, CARD_FILE)
    int8_model = _at(_EXPORTED, INT8_FILE)
    variants = _at(_EXPORTED, VARIANTS_FILE, doc="The shipped reduced-precision variants, their files and md5s.")
    variant_speed = _at(
        "models/variant_speed.json",
        doc="Images/s of each precision at export: a timing, so git-ignored and not a DVC output (also in MLflow).",
    )
