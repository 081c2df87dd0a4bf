"""Where each stage reads and writes, relative to the project root (mirrors dvc.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def find_root(start: Path) -> Path | None:
    """The project root: ``start`` or the nearest folder above it with a ``dvc.yaml``."""
    start = start.resolve()
    return next((folder for folder in (start, *start.parents) if (folder / "dvc.yaml").is_file()), None)


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def under(cls, root: str | Path = ".") -> "Paths":
        return cls(Path(root).resolve())

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
        """Size and md5 of images.npy and manifest.csv, as prepare wrote them (catdog.integrity)."""
        return self.prepared / "content.json"

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

    # export
    @property
    def exported(self) -> Path:
        return self.root / "models" / "export"

    @property
    def parity(self) -> Path:
        """Exported vs eager logits and accuracy on test images."""
        return self.exported / "parity.json"
