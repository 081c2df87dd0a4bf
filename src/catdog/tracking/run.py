"""What a stage logs into its run: grouped metrics, facts, params, artifacts, models."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from catdog.core.errors import CatdogError
from catdog.data import integrity
from catdog.tracking import registry
from catdog.tracking.lineage import param_value
from catdog.tracking.writes import Writes, metrics_payload

# MLflow metric keys are "<section>/<name>": the run page groups its charts by section, beside
# MLflow's own "system/...". What is no measurement (counts, versions, flags, the best epoch) is a
# tag "catdog.<name>" instead (``Run.log_facts``): nothing to chart.
METRIC_SECTIONS = ("train", "val", "test", "export", "schedule", "audit")
EPOCH_METRIC_KEYS = {  # a row of train's history (history.csv columns) -> its MLflow key
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "lr": "schedule/lr",
    "lr_backbone": "schedule/lr_backbone",
}
STEP_LOSS_KEY = "train/step_loss"


class Run:
    """The active run of one stage. Its writes go to the store, or to the run's outbox while an
    http(s) tracking server is unreachable (:class:`~catdog.tracking.writes.Writes`)."""

    def __init__(self, run_id: str, store: Path):
        self.run_id = run_id
        self.progress: dict[str, str] = {}  # tags set only if the stage is stopped (how far it got)
        self.writes = Writes(run_id, store)

    @property
    def holding(self) -> bool:
        """The server is lost: the writes wait in the outbox."""
        return self.writes.holding

    def confirm(self) -> None:
        """The writes so far reached the store or the outbox. Train calls it after each epoch, before
        saving its state: a resumed run does not redo the steps the state says are done."""
        self.writes.confirm()

    def end(self, status: str) -> None:
        """Mark the run terminated, or hold that for the outbox (MLflow's own end_run marks it otherwise)."""
        self.writes.write("end", {"status": status})

    def finish(self, stage: str) -> None:
        self.writes.finish(stage)

    def log_metrics(self, section: str, metrics: dict[str, float], step: int = 0) -> None:
        """``{name: value}`` logged as ``<section>/<name>``."""
        if section not in METRIC_SECTIONS:
            raise ValueError(f"metric section {section!r} is none of {METRIC_SECTIONS}")
        self.writes.write("metrics", metrics_payload({f"{section}/{k}": float(v) for k, v in metrics.items()}, step))

    def log_epoch(self, row: dict[str, float]) -> None:
        """One row of train's history, at step ``row["epoch"]``; asynchronous, off the training's path."""
        values = {key: float(row[column]) for column, key in EPOCH_METRIC_KEYS.items() if column in row}
        self.writes.write_metrics_async(values, step=row["epoch"])

    def log_step_loss(self, loss: float, step: int) -> None:
        self.writes.write_metrics_async({STEP_LOSS_KEY: loss}, step=step)

    def logged_epochs(self) -> set[int]:
        """The epochs already logged (a resumed run skips those)."""
        return self._steps(EPOCH_METRIC_KEYS["val_loss"])

    def last_logged_step(self) -> int:
        """The last training step whose loss was logged, 0 if none."""
        return max(self._steps(STEP_LOSS_KEY), default=0)

    def _steps(self, key: str) -> set[int]:
        return {m.step for m in MlflowClient().get_metric_history(self.run_id, key)}

    def log_facts(self, facts: dict[str, object]) -> None:
        """Figures that are no measurement, as tags ``catdog.<name>``."""
        self.set_tags({f"catdog.{k}": param_value(v) for k, v in facts.items()})

    def log_params(self, params: dict[str, object]) -> None:
        self.writes.write("params", {k: param_value(v) for k, v in params.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not path.is_file():
            raise CatdogError(f"cannot log {path} to MLflow: the file is not there (the stage should have written it)")
        self.writes.write("artifact", {"path": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        self.writes.write("tags", dict(tags))

    def record_checkpoint(self, checkpoint: Path) -> None:
        """Tag the run with the checkpoint's md5 (see :func:`catdog.tracking.copies.record_checkpoint`)."""
        self.writes.write("checkpoint", {"md5": integrity.file_md5(checkpoint)})

    def log_pyfunc_model(
        self, model: dict, name: str | None, score: registry.Score, promote: bool
    ) -> registry.Registration | None:
        """See :func:`catdog.tracking.registry.log_classifier`."""
        return registry.log_classifier(model, name, score, promote)

    def log_pytorch_model(self, model, example_input) -> None:
        """See :func:`catdog.tracking.registry.log_pytorch_model`."""
        registry.log_pytorch_model(model, example_input)
