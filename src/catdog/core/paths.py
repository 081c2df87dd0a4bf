"""Every file the pipeline reads or writes, named once, relative to the project root.

dvc.yaml declares the same files as the stages' deps, outs, metrics and plots; tests/test_paths.py
checks that the two agree. Kept free of torch and MLflow (predict imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The files of an exported model's folder (models/export/, or a registered model's download):
# predict finds the labels and preprocessing beside whichever model.onnx it is given.
ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"
LABELS_FILE = "labels.json"
PREPROCESS_FILE = "preprocess.json"
CARD_FILE = "MODEL_CARD.md"


def find_root(start: Path) -> Path | None:
    """The project root: ``start`` or the nearest folder above it with a ``dvc.yaml``."""
    start = start.resolve()
    return next((folder for folder in (start, *start.parents) if (folder / "dvc.yaml").is_file()), None)


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def under(cls, root: str | Path = ".") -> Paths:
        return cls(Path(root).resolve())

    # the project's own files, logged as a run's lineage
    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def dvc_yaml(self) -> Path:
        return self.root / "dvc.yaml"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"

    # prepare
    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def manifest(self) -> Path:
        return self.prepared / "manifest.csv"

    @property
    def images(self) -> Path:
        return self.prepared / "images.npy"

    @property
    def prepared_content(self) -> Path:
        """Size and md5 of images.npy and manifest.csv, as prepare wrote them (catdog.data.integrity)."""
        return self.prepared / "content.json"

    @property
    def rejected(self) -> Path:
        """Every skipped file and why."""
        return self.prepared / "rejected.csv"

    @property
    def prepare_summary(self) -> Path:
        """Counts per split and class, rejects per reason (inside the prepared folder: a DVC output)."""
        return self.prepared / "summary.json"

    @property
    def prepare_metrics(self) -> Path:
        """Headline DVC metrics: images per split."""
        return self.root / "reports" / "prepare" / "metrics.json"

    # train
    @property
    def checkpoint(self) -> Path:
        return self.root / "models" / "checkpoint.pt"

    @property
    def train_state(self) -> Path:
        """Resumable training state, rewritten every epoch (git-ignored, not a DVC output)."""
        return self.root / "models" / "train_state.pt"

    @property
    def train_reports(self) -> Path:
        return self.root / "reports" / "train"

    @property
    def train_metrics(self) -> Path:
        """Headline DVC metrics: best epoch, its val accuracy and loss."""
        return self.train_reports / "metrics.json"

    @property
    def train_history(self) -> Path:
        return self.train_reports / "history.csv"

    @property
    def train_curves(self) -> Path:
        return self.train_reports / "curves.png"

    # evaluate
    @property
    def evaluate_reports(self) -> Path:
        return self.root / "reports" / "evaluate"

    @property
    def evaluate_metrics(self) -> Path:
        """Headline DVC metrics of the test split."""
        return self.evaluate_reports / "metrics.json"

    @property
    def evaluate_details(self) -> Path:
        """Every test figure (per class, PR-AUC, ...): a DVC output, not a metric."""
        return self.evaluate_reports / "details.json"

    @property
    def predictions(self) -> Path:
        return self.evaluate_reports / "predictions.csv"

    @property
    def per_class_report(self) -> Path:
        """Precision, recall, F1 and support of every class: details, not DVC metrics."""
        return self.evaluate_reports / "per_class.csv"

    @property
    def roc_points(self) -> Path:
        return self.evaluate_reports / "roc.csv"

    @property
    def pr_points(self) -> Path:
        return self.evaluate_reports / "pr.csv"

    @property
    def confusion_matrix_plot(self) -> Path:
        return self.evaluate_reports / "confusion_matrix.png"

    @property
    def roc_pr_plot(self) -> Path:
        return self.evaluate_reports / "roc_pr_curves.png"

    @property
    def reliability_plot(self) -> Path:
        return self.evaluate_reports / "reliability.png"

    @property
    def confidently_wrong_plot(self) -> Path:
        return self.evaluate_reports / "confidently_wrong.png"

    # export
    @property
    def exported(self) -> Path:
        return self.root / "models" / "export"

    @property
    def parity(self) -> Path:
        """Exported vs eager logits and accuracy on test images."""
        return self.exported / "parity.json"

    @property
    def onnx_model(self) -> Path:
        return self.exported / ONNX_FILE

    @property
    def pt2_model(self) -> Path:
        return self.exported / PT2_FILE

    @property
    def labels(self) -> Path:
        return self.exported / LABELS_FILE

    @property
    def preprocess(self) -> Path:
        return self.exported / PREPROCESS_FILE

    @property
    def model_card(self) -> Path:
        return self.exported / CARD_FILE
