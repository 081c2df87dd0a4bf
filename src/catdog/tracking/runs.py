"""The run a stage logs into: train's new pipeline run (or its run reopened after a kill), the
pipeline run evaluate and export find by the checkpoint's md5 (or a copy of it), and the runs of
killed stages closed."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from catdog.core import lifecycle
from catdog.core.errors import CatdogError
from catdog.core.params import Params
from catdog.core.paths import Paths
from catdog.data import integrity
from catdog.tracking.copies import derive_run, pipeline_run
from catdog.tracking.datasets import prepared_dataset
from catdog.tracking.lineage import (
    CLASSES_PARAM,
    FAILED_STAGE_TAG,
    RESULTS_TAG,
    lineage_tags,
    param_value,
    params_hash,
    run_name,
)
from catdog.tracking.run import Run
from catdog.tracking.store import connect, experiment_id, lost_server, store_root
from catdog.tracking.writes import send_outboxes

_outboxes_sent: set[str] = set()


def client(project_root: Path) -> MlflowClient:
    """The client of the project's store; the first time, it sends what an outage held back."""
    connected = connect(project_root)
    if connected.tracking_uri not in _outboxes_sent:
        send_outboxes(connected, store_root(project_root))
        _outboxes_sent.add(connected.tracking_uri)
    return connected


def send_held_back(project_root: Path) -> list[str]:
    """Sends what outages held back for this project's tracking URI (``catdog sync``); the run ids."""
    return send_outboxes(connect(project_root), store_root(project_root))


@contextlib.contextmanager
def start_run(params: Params, paths: Paths) -> Iterator[Run]:
    """Create the pipeline's run (train stage); ``record_checkpoint`` ties it to the checkpoint."""
    store = client(paths.root)
    experiment = experiment_id(store, params.tracking.experiment_name, paths.root)
    tags = lineage_tags(params, paths)
    close_orphans(store, experiment)
    run = store.create_run(experiment, run_name=run_name(params), tags=tags)
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
    store = client(paths.root)
    close_orphans(store, store.get_run(run_id).info.experiment_id)
    with _opened(run_id, "train", store_root(paths.root), log_system_metrics=True) as active:
        yield active


def run_exists(project_root: Path, run_id: str) -> bool:
    """Whether ``run_id`` is a live run in the project's store (a deleted run cannot be resumed)."""
    try:
        return client(project_root).get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


@contextlib.contextmanager
def stage_run(params: Params, paths: Paths, stage: str) -> Iterator[Run]:
    """The run of ``stage`` (evaluate, export): the most recent run of this checkpoint, or a new run
    copied from it when that one already holds this stage's results or other ``stage`` params."""
    store = client(paths.root)
    md5 = integrity.file_md5(paths.checkpoint)
    experiment = experiment_id(store, params.tracking.experiment_name, paths.root)
    close_orphans(store, experiment)
    found = pipeline_run(store, experiment, md5)
    if found is None:
        raise CatdogError(
            f"no MLflow run of {paths.checkpoint.name} (md5 {md5}) in experiment "
            f"{params.tracking.experiment_name!r} at {store.tracking_uri}: rerun train "
            "(dvc repro -f -s train) to log one"
        )
    values = {k: param_value(v) for k, v in params.flat(stage).items()}
    conflict = any(found.data.params.get(k, v) != v for k, v in values.items())
    run_id = found.info.run_id
    if conflict or found.data.tags.get(RESULTS_TAG + stage) == "logged":
        run_id = derive_run(store, run_id, drop=set(values), params_digest=params_hash(params))
    logged = store.get_run(run_id).data.params
    with _opened(run_id, stage, store_root(paths.root)) as active:
        active.log_params({k: v for k, v in values.items() if k not in logged})
        yield active
        active.set_tags({RESULTS_TAG + stage: "logged"})


@contextlib.contextmanager
def _opened(run_id: str, stage: str, store: Path, **start_kwargs) -> Iterator[Run]:
    """The run made active for ``stage``, tagged with this process; a stop signal ends it KILLED
    (tagged with the stage and ``Run.progress``) instead of FAILED."""
    active, mlflow_client, ended = Run(run_id, store), MlflowClient(), False
    if FAILED_STAGE_TAG in mlflow_client.get_run(run_id).data.tags:  # this attempt may well succeed
        mlflow_client.delete_tag(run_id, FAILED_STAGE_TAG)
    try:
        with mlflow.start_run(run_id=run_id, **start_kwargs):
            mlflow.set_tags({**lifecycle.process_tags(), "catdog.stage": stage})
            yield active
            active.finish(stage)
            ended = True
    except lifecycle.StageStopped as stop:  # also when it interrupts MLflow's own end_run
        _end_stopped(active, stop, stage)
        raise
    except Exception as exc:  # MLflow marked the run FAILED; say which stage (unless the store is the problem)
        if (stop := lifecycle.stop_behind(exc)) is not None:  # a clean-up failed as the stop unwound through it
            _end_stopped(active, stop, stage)
            raise stop from None
        if ended and active.holding:
            return  # MLflow could not mark the run FINISHED: the outbox's "end" will
        with contextlib.suppress(Exception):
            mlflow_client.set_tag(run_id, FAILED_STAGE_TAG, stage)
        _raise_if_server_lost(stage, exc)
        raise


def _end_stopped(active: Run, stop: lifecycle.StageStopped, stage: str) -> None:
    active.set_tags({"catdog.stopped": f"{stop.signal_name} during {stage}", **active.progress})
    active.end("KILLED")


def _raise_if_server_lost(stage: str, exc: Exception) -> None:
    uri = mlflow.get_tracking_uri()
    if problem := lost_server(uri):
        raise CatdogError(
            f"lost the MLflow tracking server {uri} during {stage} ({problem}; "
            f"{type(exc).__name__}): the files written so far stay; rerun the stage "
            "(dvc repro) once the server is back"
        ) from None


def close_orphans(store: MlflowClient, experiment: str) -> None:
    """Mark KILLED the RUNNING runs of the experiment whose stage process (on this host) is gone:
    a SIGKILLed stage cannot close its own run."""
    running = store.search_runs([experiment], "attributes.status = 'RUNNING'", max_results=1000)
    orphans = [run for run in running if lifecycle.process_gone(run.data.tags)]
    for run in orphans:
        store.set_tag(run.info.run_id, "catdog.stopped", "its process is gone (killed)")
        store.set_terminated(run.info.run_id, "KILLED")
    if orphans:
        names = ", ".join(f"{run.info.run_name} ({run.info.run_id[:8]})" for run in orphans)
        print(
            f"catdog: marked {len(orphans)} MLflow run(s) KILLED whose stage process is gone: {names}", file=sys.stderr
        )
