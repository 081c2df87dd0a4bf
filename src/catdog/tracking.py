"""Every MLflow call of the project lives here; DVC never has to know about MLflow.

One pipeline run is one MLflow run, found by what DVC tracks rather than by a run id in a file
(a run id differs on every run, so it cannot be in a DVC output of a reproducible pipeline):
train tags its run with the md5 of the checkpoint it wrote (``CHECKPOINT_TAG``); evaluate and
export log into the most recent run with their checkpoint's md5 (``stage_run``). Every run a
pipeline invocation creates holds the full params and results, whichever stages DVC restored:

- a stage whose results that run already holds (only ``evaluate.*`` changed, or a forced rerun)
  starts a new run that copies the run's params, metrics and tags (MLflow params are immutable)
  and tags ``catdog.reused_from``;
- train, when its checkpoint comes out identical to an earlier run's (``dvc repro -f -s train``),
  copies that run's evaluate and export results, which DVC will not recompute
  (``record_checkpoint``).

Tags ``catdog.results.<stage>`` say which stages' results a run holds: ``logged`` by the stage
in this run, or ``copied`` from the run in ``catdog.reused_from``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no store lock
    fcntl = None

import mlflow
import yaml
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from catdog import integrity, lifecycle, outbox
from catdog.errors import CatdogError
from catdog.outbox import Outbox
from catdog.params import Params
from catdog.paths import Paths

ARTIFACTS_DIR = "mlruns"
FAILED_STAGE_TAG = "catdog.failed_stage"
_RUN_OWN_TAGS = {
    "mlflow.runName",
    "mlflow.log-model.history",
    "mlflow.user",  # not copied to a derived run
    lifecycle.HOST_TAG,
    lifecycle.PID_TAG,
    lifecycle.STARTED_TAG,
    "catdog.stage",
    "catdog.stopped",
    FAILED_STAGE_TAG,
}
CHECKPOINT_TAG = "catdog.checkpoint_md5"
CLASSES_PARAM = "catdog.classes"  # JSON list of the class names, as the model outputs them
REUSED_TAG = "catdog.reused_from"
RESULTS_TAG = "catdog.results."  # + stage name: "logged" or "copied"
_LINEAGE_FILES = (
    "src",
    "stages",
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
)  # beside mlflow.db, as MLflow itself does
DB_FILE = "mlflow.db"

# MLflow metric keys are "<section>/<name>": the run page groups its charts by section, beside
# MLflow's own "system/...". What is no measurement (counts, versions, flags, the best epoch) is a
# tag "catdog.<name>" instead (``Run.log_facts``): nothing to chart.
METRIC_SECTIONS = ("train", "val", "test", "export", "schedule")
EPOCH_METRIC_KEYS = {  # a row of train's history (history.csv columns) -> its MLflow key
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "lr": "schedule/lr",
    "lr_backbone": "schedule/lr_backbone",
}
STEP_LOSS_KEY = "train/step_loss"


def store_root(project_root: Path) -> Path:
    """The repository whose store we log to.

    ``dvc exp run --queue`` executes in ``.dvc/tmp/exps/...`` and exports DVC_ROOT pointing at
    the real repository; a path relative to the temp copy would log into a store that is
    thrown away.
    """
    return Path(os.environ.get("DVC_ROOT") or project_root).resolve()


# mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; the defaults we set must not pass for the user's.
_defaults_in_use: set[str] = set()


def tracking_uri(project_root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when the user set it, else the project's sqlite store."""
    user = os.environ.get("MLFLOW_TRACKING_URI")
    if user and user not in _defaults_in_use:
        return user
    return default_tracking_uri(project_root)


def default_tracking_uri(project_root: Path) -> str:
    return f"sqlite:///{store_root(project_root) / DB_FILE}"


@dataclass(frozen=True)
class Score:
    """A model version's test accuracy and which test images gave it (``data.split_digest``):
    accuracies on other test images are not compared."""

    accuracy: float
    test_set: str

    def tags(self) -> dict[str, str]:
        return {"test_accuracy": str(self.accuracy), "test_set": self.test_set}


@dataclass(frozen=True)
class Registration:
    version: str
    promoted: bool  # the champion alias moved to this version
    incomparable_champion: str | None = None  # asked to promote: the champion, if scored on other test images


class Run:
    """The active run of one stage. Its writes go to the store, or, while an http(s) tracking
    server is unreachable, to the run's :class:`~catdog.outbox.Outbox`: the stage goes on and the
    writes are sent when the server is back (by this stage, the next one, or ``catdog sync``)."""

    def __init__(self, run_id: str, store: Path):
        self.run_id = run_id
        self.progress: dict[str, str] = {}  # tags set only if the stage is stopped (how far it got)
        self.outbox = Outbox(store, run_id, mlflow.get_tracking_uri())
        self.holding = False  # the server is lost: writes go to the outbox
        self._unconfirmed: list[tuple[dict, object]] = []  # asynchronous writes and their RunOperations

    def _write(self, op: str, payload: dict) -> None:
        if not self.holding:
            try:
                _apply(MlflowClient(), self.run_id, op, payload)
                return
            except Exception as exc:
                self._hold(exc)
        self.outbox.add(op, payload)

    def _write_metrics_async(self, values: dict[str, float], step: int) -> None:
        payload = _metrics_payload(values, step)
        if self.holding:
            self.outbox.add("metrics", payload)
            return
        metrics = [Metric(**m) for m in payload["metrics"]]
        self._unconfirmed.append((payload, MlflowClient().log_batch(self.run_id, metrics=metrics, synchronous=False)))

    def _hold(self, exc: Exception) -> None:
        """Re-raises ``exc`` unless the tracking server is unreachable; then holds the writes."""
        uri = mlflow.get_tracking_uri()
        problem = _lost_server(uri)
        if problem is None:
            raise exc
        if not self.holding:
            print(
                f"catdog: lost the MLflow tracking server {uri} ({problem}): the stage goes on, "
                f"its tracking writes wait in {self.outbox.journal} until the server is back",
                file=sys.stderr,
                flush=True,
            )
        self.holding = True

    def confirm(self) -> None:
        """Waits for the asynchronous writes so far (what the server did not take goes to the
        outbox); while holding, sends the outbox if the server is back. Train calls it after each
        epoch, before saving its state: a resumed run does not redo the steps the state says are done."""
        unconfirmed, self._unconfirmed = self._unconfirmed, []
        for payload, operations in unconfirmed:
            try:
                operations.wait()
            except Exception as exc:
                self._hold(exc)
                self.outbox.add("metrics", payload)
        if self.holding and _server_problem(self.outbox.uri, timeout=2) is None:
            self.holding = not _send(MlflowClient(), self.outbox)

    def end(self, status: str) -> None:
        """Mark the run terminated, or hold that for the outbox (MLflow's own end_run marks it otherwise)."""
        self._write("end", {"status": status})

    def finish(self, stage: str) -> None:
        """At the end of the stage: a lost server gets ``CATDOG_TRACKING_GRACE_SECONDS`` (default
        30) to come back; after that the stage ends anyway, with its writes kept in the outbox."""
        self.confirm()
        deadline = time.monotonic() + float(os.environ.get("CATDOG_TRACKING_GRACE_SECONDS", "30"))
        while self.holding and time.monotonic() < deadline:
            time.sleep(1)
            self.confirm()
        if self.holding:
            self.end("FINISHED")
            print(
                f"{stage}: warning: the MLflow tracking server {self.outbox.uri} is still unreachable: "
                f"{self.outbox.summary()} of run {self.run_id} wait in {self.outbox.journal}; "
                "the next stage that reaches the server sends them, or run `catdog sync`",
                file=sys.stderr,
                flush=True,
            )

    def log_pyfunc_model(self, model: dict, name: str | None, score: Score, promote: bool) -> Registration | None:
        """Log ``model`` (``mlflow.pyfunc.log_model`` arguments, e.g. from
        :func:`catdog.serving.pyfunc_model`) as the run's ``classifier``. With ``name``, register it
        as a new version; ``candidate`` always moves to it, ``champion`` only if ``promote`` and it
        beats the current champion's test accuracy on the same test images."""
        import mlflow.pyfunc

        info = mlflow.pyfunc.log_model(name="classifier", registered_model_name=name, **model)
        if not name:
            return None
        version = str(info.registered_model_version)
        client = MlflowClient()
        for key, value in score.tags().items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, "candidate", version)
        if not promote:
            return Registration(version, False)
        if promote_champion(client, name, version, score):
            return Registration(version, True)
        champion = _champion(client, name)
        elsewhere = champion is not None and not _same_test_set(champion, score)
        return Registration(version, False, str(champion.version) if elsewhere else None)

    def log_metrics(self, section: str, metrics: dict[str, float], step: int = 0) -> None:
        """``{name: value}`` logged as ``<section>/<name>``."""
        if section not in METRIC_SECTIONS:
            raise ValueError(f"metric section {section!r} is none of {METRIC_SECTIONS}")
        self._write("metrics", _metrics_payload({f"{section}/{k}": float(v) for k, v in metrics.items()}, step))

    def log_epoch(self, row: dict[str, float]) -> None:
        """One row of train's history, at step ``row["epoch"]``; asynchronous, off the training's path."""
        values = {key: float(row[column]) for column, key in EPOCH_METRIC_KEYS.items() if column in row}
        self._write_metrics_async(values, step=row["epoch"])

    def log_step_loss(self, loss: float, step: int) -> None:
        self._write_metrics_async({STEP_LOSS_KEY: loss}, step=step)

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
        self.set_tags({f"catdog.{k}": _param_value(v) for k, v in facts.items()})

    def log_params(self, params: dict[str, object]) -> None:
        self._write("params", {k: _param_value(v) for k, v in params.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not path.is_file():
            raise CatdogError(f"cannot log {path} to MLflow: the file is not there (the stage should have written it)")
        self._write("artifact", {"path": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write("tags", dict(tags))

    def record_checkpoint(self, checkpoint: Path) -> None:
        """Tag the run with the checkpoint's md5 (see :func:`_record_checkpoint`)."""
        self._write("checkpoint", {"md5": integrity.file_md5(checkpoint)})

    def log_pytorch_model(self, model, example_input) -> None:
        """The model with signature and input example, loadable with ``mlflow.pytorch.load_model``
        (MLflow's default pt2 format: a torch.export program, no pickle; call it, no ``.eval()``).
        pt2 needs the example, which MLflow stores as JSON (megabytes at 224 px): only logged when
        ``tracking.log_pytorch_model`` asks."""
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        model = model.cpu().eval()
        with torch.inference_mode():
            example_output = model(torch.from_numpy(example_input)).numpy()
        mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(example_input, example_output.astype(np.float32)),
            input_example=example_input,
            # Written out rather than inferred: inference re-imports the model in a subprocess.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "efficientnet-lite-pytorch==0.1.0"],
        )


@contextlib.contextmanager
def start_run(params: Params, paths: Paths) -> Iterator[Run]:
    """Create the pipeline's run (train stage); ``record_checkpoint`` ties it to the checkpoint."""
    client = _client(paths.root)
    experiment_id = _experiment_id(client, params.tracking.experiment_name, paths.root)
    tags = lineage_tags(params, paths)
    _close_orphans(client, experiment_id)
    run = client.create_run(experiment_id, run_name=run_name(params), tags=tags)
    with _opened(run.info.run_id, "train", store_root(paths.root), log_system_metrics=True) as active:
        active.log_params(params.flat("data", "train", "tracking"))
        if paths.prepared_content.is_file():  # the classes prepare resolved, in model output order
            active.log_params({CLASSES_PARAM: json.dumps(integrity.recorded_classes(paths))})
        if paths.manifest.is_file():
            mlflow.log_input(prepared_dataset(params, paths), context="training")
        yield active


@contextlib.contextmanager
def reopen_train_run(paths: Paths, run_id: str) -> Iterator[Run]:
    """Reopen the train run ``run_id`` after a killed train stage: the same run, params already logged."""
    client = _client(paths.root)
    _close_orphans(client, client.get_run(run_id).info.experiment_id)
    with _opened(run_id, "train", store_root(paths.root), log_system_metrics=True) as active:
        yield active


def run_exists(project_root: Path, run_id: str) -> bool:
    """Whether ``run_id`` is a live run in the project's store (a deleted run cannot be resumed)."""
    try:
        return _client(project_root).get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def _record_checkpoint(client: MlflowClient, run_id: str, md5: str) -> None:
    """Tag run ``run_id`` with its checkpoint's md5. When an earlier run produced the same checkpoint,
    copy its downstream results (evaluate, export): DVC will not rerun those stages for it."""
    experiment_id = client.get_run(run_id).info.experiment_id
    earlier = _pipeline_run(client, experiment_id, md5)
    client.set_tag(run_id, RESULTS_TAG + "train", "logged")
    if earlier is not None and earlier.info.run_id != run_id:
        _copy_missing(client, earlier, run_id)
    client.set_tag(run_id, CHECKPOINT_TAG, md5)  # last: from now on evaluate and export find this run


def _metrics_payload(values: dict[str, float], step: int) -> dict:
    """A "metrics" write (see :func:`_apply`), stamped now: a replay keeps when they were measured."""
    timestamp = int(time.time() * 1000)
    return {"metrics": [{"key": k, "value": v, "timestamp": timestamp, "step": step} for k, v in values.items()]}


def _apply(client: MlflowClient, run_id: str, op: str, payload: dict) -> None:
    """One write of a run (see :class:`~catdog.outbox.Outbox` for the ops), live or replayed."""
    if op == "metrics":
        client.log_batch(run_id, metrics=[Metric(**m) for m in payload["metrics"]])
    elif op == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in payload.items()])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload.items()])
    elif op == "artifact":
        client.log_artifact(run_id, payload["path"], payload["artifact_path"])
    elif op == "checkpoint":
        _record_checkpoint(client, run_id, payload["md5"])
    elif op == "end":
        client.set_terminated(run_id, payload["status"])
    else:
        raise ValueError(f"unknown tracking write {op!r}")


def _send(client: MlflowClient, box: Outbox) -> bool:
    """Replays an outbox in order; True when all of it is sent. What failed and what follows stay."""
    with box.locked():
        ops = box.ops()
        for done, (op, payload) in enumerate(ops):
            try:
                _apply(client, box.run_id, op, payload)
            except Exception:
                box.keep_only(ops[done:])
                return False
        box.keep_only([])
    return True


def send_held_back(project_root: Path) -> list[str]:
    """Sends what outages held back for this project's tracking URI (``catdog sync``); the run ids."""
    return _send_outboxes(_client(project_root, send_outboxes=False), store_root(project_root))


def _send_outboxes(client: MlflowClient, store: Path) -> list[str]:
    sent = []
    for box in outbox.pending(store, client.tracking_uri):
        summary = box.summary()
        if not _send(client, box):
            raise CatdogError(f"could not send {box.journal} to {client.tracking_uri}: {box.summary()} left")
        print(f"catdog: sent the tracking writes an outage held back ({summary}) to run {box.run_id}", file=sys.stderr)
        sent.append(box.run_id)
    return sent


@contextlib.contextmanager
def stage_run(params: Params, paths: Paths, stage: str) -> Iterator[Run]:
    """The run of ``stage`` (evaluate, export): the most recent run of this checkpoint, or a new run
    copied from it when that one already holds this stage's results or other ``stage`` params."""
    client = _client(paths.root)
    md5 = integrity.file_md5(paths.checkpoint)
    experiment_id = _experiment_id(client, params.tracking.experiment_name, paths.root)
    _close_orphans(client, experiment_id)
    found = _pipeline_run(client, experiment_id, md5)
    if found is None:
        raise CatdogError(
            f"no MLflow run of {paths.checkpoint.name} (md5 {md5}) in experiment "
            f"{params.tracking.experiment_name!r} at {client.tracking_uri}: rerun train "
            "(dvc repro -f -s train) to log one"
        )
    values = {k: _param_value(v) for k, v in params.flat(stage).items()}
    conflict = any(found.data.params.get(k, v) != v for k, v in values.items())
    run_id = found.info.run_id
    if conflict or found.data.tags.get(RESULTS_TAG + stage) == "logged":
        run_id = _derive_run(client, run_id, drop=set(values), params_digest=params_hash(params))
    logged = client.get_run(run_id).data.params
    with _opened(run_id, stage, store_root(paths.root)) as active:
        active.log_params({k: v for k, v in values.items() if k not in logged})
        yield active
        active.set_tags({RESULTS_TAG + stage: "logged"})


def _pipeline_run(client: MlflowClient, experiment_id: str, checkpoint_md5: str):
    """The most recent live run tagged with this checkpoint md5, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{CHECKPOINT_TAG}` = '{checkpoint_md5}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _copy_missing(client: MlflowClient, source, target_id: str, skip_params: set[str] = frozenset()) -> None:
    """Params (less ``skip_params``), metric histories and tags of ``source`` that run ``target_id``
    lacks; the stage results copied are marked ``copied``."""
    target = client.get_run(target_id).data
    tags = {
        k: ("copied" if k.startswith(RESULTS_TAG) else v)
        for k, v in source.data.tags.items()
        if k not in target.tags and k not in _RUN_OWN_TAGS and k not in _DVC_EXP_TAGS.values()
    }
    tags[REUSED_TAG] = source.info.run_id
    params = {k: v for k, v in source.data.params.items() if k not in target.params and k not in skip_params}
    history = [
        m
        for key in source.data.metrics
        if key not in target.metrics
        for m in client.get_metric_history(source.info.run_id, key)
    ]
    _log_batches(client, target_id, history, params, tags)


def _log_batches(
    client: MlflowClient, run_id: str, history: list, params: dict[str, str], tags: dict[str, str]
) -> None:
    for start in range(0, max(len(history), 1), 900):  # log_batch takes at most 1000 metrics
        client.log_batch(
            run_id,
            metrics=[Metric(m.key, m.value, m.timestamp, m.step) for m in history[start : start + 900]],
            params=[Param(k, v) for k, v in params.items()] if start == 0 else [],
            tags=[RunTag(k, v) for k, v in tags.items()] if start == 0 else [],
        )


@contextlib.contextmanager
def _opened(run_id: str, stage: str, store: Path, **start_kwargs) -> Iterator[Run]:
    """The run made active for ``stage``, tagged with this process; a stop signal ends it KILLED
    (tagged with the stage and ``Run.progress``) instead of FAILED."""
    active, client, ended = Run(run_id, store), MlflowClient(), False
    if FAILED_STAGE_TAG in client.get_run(run_id).data.tags:  # this attempt may well succeed
        client.delete_tag(run_id, FAILED_STAGE_TAG)
    try:
        with mlflow.start_run(run_id=run_id, **start_kwargs):
            mlflow.set_tags({**lifecycle.process_tags(), "catdog.stage": stage})
            yield active
            active.finish(stage)
            ended = True
    except lifecycle.StageStopped as stop:  # also when it interrupts MLflow's own end_run
        active.set_tags({"catdog.stopped": f"{stop.signal_name} during {stage}", **active.progress})
        active.end("KILLED")
        raise
    except Exception as exc:  # MLflow marked the run FAILED; say which stage (unless the store is the problem)
        if ended and active.holding:
            return  # MLflow could not mark the run FINISHED: the outbox's "end" will
        with contextlib.suppress(Exception):
            client.set_tag(run_id, FAILED_STAGE_TAG, stage)
        uri = mlflow.get_tracking_uri()
        if problem := _lost_server(uri):
            raise CatdogError(
                f"lost the MLflow tracking server {uri} during {stage} ({problem}; "
                f"{type(exc).__name__}): the files written so far stay; rerun the stage "
                "(dvc repro) once the server is back"
            ) from None
        raise


def _close_orphans(client: MlflowClient, experiment_id: str) -> None:
    """Mark KILLED the RUNNING runs of the experiment whose stage process (on this host) is gone:
    a SIGKILLed stage cannot close its own run."""
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    orphans = [run for run in running if lifecycle.process_gone(run.data.tags)]
    for run in orphans:
        client.set_tag(run.info.run_id, "catdog.stopped", "its process is gone (killed)")
        client.set_terminated(run.info.run_id, "KILLED")
    if orphans:
        names = ", ".join(f"{run.info.run_name} ({run.info.run_id[:8]})" for run in orphans)
        print(
            f"catdog: marked {len(orphans)} MLflow run(s) KILLED whose stage process is gone: {names}", file=sys.stderr
        )


def download_registered_model(uri: str, project_root: Path) -> Path:
    """The local folder of a registry model (``models:/<name>@<alias>``) from the project's store."""
    import logging

    if not os.environ.get("MLFLOW_TRACKING_URI") and not (project_root / DB_FILE).is_file():
        raise CatdogError(
            f"no MLflow store for {uri}: run from the project root (where {DB_FILE} is) or set MLFLOW_TRACKING_URI"
        )
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # keep stderr to our one line
    mlflow.set_tracking_uri(tracking_uri(project_root))
    try:
        return Path(mlflow.artifacts.download_artifacts(uri))
    except mlflow.exceptions.MlflowException as exc:
        raise CatdogError(f"cannot load {uri} from {mlflow.get_tracking_uri()}: {exc.message}") from None


def promote_champion(client: MlflowClient, name: str, version: str, score: Score) -> bool:
    """Move ``champion`` to ``version`` if its test accuracy beats the current champion's on the
    same test images (a champion scored on other images stays: the two are not comparable).

    Concurrent exports must not interleave the compare and the set (a worse version would win
    the last write): on a sqlite store the pair runs under the store's file lock; a server offers
    no lock, so there the alias is set, then checked again until it holds still (a better version
    set meanwhile wins, a worse one is overwritten)."""
    with _sqlite_lock(client.tracking_uri) as locked:
        if locked:
            if not _beats_champion(client, name, score):
                return False
            client.set_registered_model_alias(name, "champion", version)
            return True
    return _set_until_it_holds(client, name, version, score)


def _set_until_it_holds(
    client: MlflowClient, name: str, version: str, score: Score, settle_seconds: float = 1.0, attempts: int = 20
) -> bool:
    """True once ``version`` is still champion a settle period after it was set: longer than any
    competitor's gap between reading the champion and setting it, so no stale set can follow."""
    for _ in range(attempts):
        champion = _champion(client, name)
        if champion is None or champion.version != version:
            if not _beats_champion(client, name, score):
                return False  # a better (or as good, or incomparable) version holds it
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # two first sets can collide
                client.set_registered_model_alias(name, "champion", version)
        time.sleep(settle_seconds * random.uniform(0.5, 1.0))
        champion = _champion(client, name)
        if champion is not None and champion.version == version:
            return True
    return False


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:  # no champion yet
        return None


def _beats_champion(client: MlflowClient, name: str, score: Score) -> bool:
    champion = _champion(client, name)
    if champion is None:
        return True
    return _same_test_set(champion, score) and score.accuracy > float(champion.tags["test_accuracy"])


def _same_test_set(version, score: Score) -> bool:
    """Whether model ``version`` was scored on the test images of ``score``: else not comparable."""
    return version.tags.get("test_set") == score.test_set


def _derive_run(client: MlflowClient, source_id: str, drop: set[str], params_digest: str | None = None) -> str:
    """A new run with ``source_id``'s params (less ``drop``), metrics and tags, tagged ``catdog.reused_from``."""
    source = client.get_run(source_id)
    tags = {
        k: v
        for k, v in source.data.tags.items()
        if k not in _RUN_OWN_TAGS and k not in _DVC_EXP_TAGS.values() and not k.startswith(RESULTS_TAG)
    }
    tags.update(_dvc_exp_tags())  # this run's experiment, not the source's
    if params_digest:
        tags["catdog.params_hash"] = params_digest
    run = client.create_run(
        source.info.experiment_id, run_name=os.environ.get("DVC_EXP_NAME") or f"{source.info.run_name}-re", tags=tags
    )
    _copy_missing(client, source, run.info.run_id, skip_params=drop)  # the stage logs those anew
    if source.inputs and source.inputs.dataset_inputs:  # the same data, still shown in the runs table
        client.log_inputs(run.info.run_id, datasets=source.inputs.dataset_inputs)
    return run.info.run_id


class _PreparedImages(MetaDataset):
    """The prepared data as MLflow sees it: a name, a digest and a profile (no rows to load)."""

    def __init__(self, source: str, name: str, digest: str, profile: dict):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": a local file it is
            resolved = resolve_dataset_source(source)
        super().__init__(resolved, name=name, digest=digest)
        self._profile = profile

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def prepared_dataset(params: Params, paths: Paths) -> _PreparedImages:
    """``data/prepared`` as an MLflow dataset: named after ``data.source``, DVC's md5 as digest,
    the image count per split and, per split, per class as profile."""
    per_class: dict[str, Counter] = {}
    with paths.manifest.open(newline="") as handle:
        for row in csv.DictReader(handle):
            per_class.setdefault(row["split"], Counter())[row["label"]] += 1
    splits = {split: sum(counts.values()) for split, counts in per_class.items()}
    source = Path(params.data.source)
    return _PreparedImages(
        str(source if source.is_absolute() else paths.root / source),
        source.name,
        prepared_digest(paths),
        {
            "images": sum(splits.values()),
            **splits,
            "per_class": {split: dict(sorted(counts.items())) for split, counts in per_class.items()},
        },
    )


def prepared_digest(paths: Paths) -> str:
    """DVC's md5 of ``data/prepared``: as dvc.lock records prepare's output, else computed the
    way DVC does (md5 of the sorted file list with each file's md5, plus ``.dir``), taking the
    md5s prepare recorded in content.json (which the stages verify) instead of hashing again."""
    lock = paths.dvc_lock
    if lock.is_file():
        outs = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("prepare", {}).get("outs", [])
        for out in outs:
            if out.get("path") == paths.prepared.relative_to(paths.root).as_posix() and "md5" in out:
                return out["md5"]
    recorded = json.loads(paths.prepared_content.read_text()) if paths.prepared_content.is_file() else {}
    entries = [
        {
            "md5": recorded.get(f.name, {}).get("md5") or integrity.file_md5(f),
            "relpath": f.relative_to(paths.prepared).as_posix(),
        }
        for f in sorted(paths.prepared.rglob("*"))
        if f.is_file()
    ]
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True)
    return hashlib.md5(listing.encode()).hexdigest() + ".dir"


def lineage_tags(params: Params, paths: Paths) -> dict[str, str]:
    """Git commit, data hash (of data/prepared's recorded content: catdog.integrity), DVC experiment."""
    tags = {"catdog.params_hash": params_hash(params)}
    commit = _git(paths.root, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        # Only code and params count: dvc repro itself rewrites dvc.lock and metrics before train runs.
        tags["git.dirty"] = str(bool(_git(paths.root, "status", "--porcelain", "--", *_LINEAGE_FILES)))
    if paths.prepared_content.is_file():
        tags["data.hash"] = integrity.data_hash(paths)
    tags.update(_dvc_exp_tags())
    return tags


# Set by DVC for every stage of `dvc exp run`, in the workspace and in queued runs (.dvc/tmp/exps);
# not by a plain `dvc repro`.
_DVC_EXP_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}


def _dvc_exp_tags() -> dict[str, str]:
    return {tag: os.environ[env] for env, tag in _DVC_EXP_TAGS.items() if os.environ.get(env)}


def run_name(params: Params) -> str:
    """The DVC experiment name when there is one, else arch/mode and a short params hash."""
    return os.environ.get("DVC_EXP_NAME") or (f"{params.train.arch}-{params.train.mode}-{params_hash(params)[:6]}")


def params_hash(params: Params) -> str:
    return hashlib.md5(json.dumps(params.flat(), sort_keys=True, default=str).encode()).hexdigest()


def _client(project_root: Path, send_outboxes: bool = True) -> MlflowClient:
    """The client of the project's store; the first time, it sends what an outage held back."""
    uri = tracking_uri(project_root)
    if uri == default_tracking_uri(project_root):
        _defaults_in_use.add(uri)
    mlflow.set_tracking_uri(uri)
    check_server(project_root)
    _prepare_sqlite_store(uri)
    if send_outboxes and uri not in _outboxes_sent:
        _send_outboxes(MlflowClient(), store_root(project_root))
        _outboxes_sent.add(uri)
    return MlflowClient()


_outboxes_sent: set[str] = set()


SERVER_CHECK_SECONDS = 10
# MLflow's own defaults retry a dead server for minutes (7 retries, backoff factor 2, 120 s timeout);
# these bound every request to well under a minute. A value the user exported wins.
_HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_reachable_servers: set[str] = set()


def check_server(project_root: Path) -> None:
    """Fail fast, in one line, when an http(s) tracking server does not answer its /health
    (stages call it first thing, before any slow work)."""
    uri = tracking_uri(project_root)
    if not uri.startswith(("http://", "https://")) or uri in _reachable_servers:
        return
    for name, value in _HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)
    problem = _server_problem(uri)
    if problem:
        raise CatdogError(
            f"MLflow tracking server {uri} is unreachable ({problem}): "
            f"start it, or unset MLFLOW_TRACKING_URI to log to the project's {DB_FILE}"
        )
    _reachable_servers.add(uri)


def _lost_server(uri: str) -> str | None:
    """Why the tracking server at ``uri`` does not answer, or None (also for a local store)."""
    return _server_problem(uri) if uri.startswith(("http://", "https://")) else None


def _server_problem(uri: str, timeout: float = SERVER_CHECK_SECONDS) -> str | None:
    """Why an http(s) server does not answer its /health within ``timeout`` seconds, or None."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: whatever /health says, the API calls will tell
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


_prepared_stores: set[str] = set()


def _prepare_sqlite_store(uri: str) -> None:
    """Let MLflow create/migrate a sqlite store's schema under an exclusive file lock, once per process.

    MLflow builds a new sqlite store's schema on first use, unguarded: the stages of parallel
    experiments (``dvc queue start -j 2``) that meet a fresh ``mlflow.db`` together fail with
    "duplicate column name" or alembic's "expected to match one row". Once the schema exists,
    concurrent writers are fine: MLflow sets ``PRAGMA busy_timeout = 20000`` on every session.
    """
    if uri in _prepared_stores:
        return
    with _sqlite_lock(uri):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # tracking tables and migrations
        client.search_registered_models(max_results=1)  # model registry tables
    _prepared_stores.add(uri)


@contextlib.contextmanager
def _sqlite_lock(uri: str) -> Iterator[bool]:
    """An exclusive lock on a file beside a sqlite store (yields True), or nothing (False)."""
    db = Path(uri.removeprefix("sqlite:///").split("?")[0])
    if fcntl is None or not uri.startswith("sqlite:///") or db.name in ("", ":memory:"):
        yield False
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield True


def _experiment_id(client: MlflowClient, name: str, project_root: Path) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if client.tracking_uri == default_tracking_uri(project_root):  # a server decides for itself
        location = (store_root(project_root) / ARTIFACTS_DIR).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created by a parallel run meanwhile
        return client.get_experiment_by_name(name).experiment_id


def _param_value(value: object) -> str:
    return "null" if value is None else str(value)


def _git(cwd: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
