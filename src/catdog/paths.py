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
        return self.root / "reports" / "prepare" / "summary.json"

    # train
    @property
    def checkpoint(self) -> Path:
        return self.root / "models" / "checkpoint.pt"

    @property
    def train_state(self) -> Path:
        """Resumable training state, rewritten every epoch (git-ignored, not a DVC output)."""
        return self.root / "models" / "train_state.pt"

    @property
    def train_run(self) -> Path:
        return self.root / "models" / "mlflow_run.json"

    @property
    def train_reports(self) -> Path:
        return self.root / "reports" / "train"

    # evaluate
    @property
    def evaluate_reports(self) -> Path:
        return self.root / "reports" / "evaluate"

    # export
    @property
    def exported(self) -> Path:
        return self.root / "models" / "export"

    @property
    def export_reports(self) -> Path:
        return self.root / "reports" / "export"
