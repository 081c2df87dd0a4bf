"""One pipeline run is one MLflow run, found by what DVC tracks rather than by a run id in a file
(a run id differs on every run, so it cannot be in a DVC output of a reproducible pipeline):
train tags its run with the md5 of the checkpoint it wrote (``CHECKPOINT_TAG``); evaluate and
export log into the most recent run with their checkpoint's md5 (``runs.stage_run``). Every run a
pipeline invocation creates holds the full params and results, whichever stages DVC restored:

- a stage whose results that run already holds (only ``evaluate.*`` changed, or a forced rerun)
  starts a new run that copies the run's params, metrics and tags (MLflow params are immutable)
  and tags ``catdog.reused_from`` (:func:`derive_run`);
- train, when its checkpoint comes out identical to an earlier run's (``dvc repro -f -s train``),
  copies that run's evaluate and export results, which DVC will not recompute
  (:func:`record_checkpoint`).

Tags ``catdog.results.<stage>`` say which stages' results a run holds: ``logged`` by the stage
in this run, or ``copied`` from the run in ``catdog.reused_from``.
"""

from __future__ import annotations

import os

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from catdog.tracking.lineage import CHECKPOINT_TAG, RESULTS_TAG, REUSED_TAG, copied_tag, dvc_exp_tags

_BATCH = 900  # log_batch takes at most 1000 metrics


def pipeline_run(client: MlflowClient, experiment_id: str, checkpoint_md5: str):
    """The most recent live run tagged with this checkpoint md5, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{CHECKPOINT_TAG}` = '{checkpoint_md5}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def record_checkpoint(client: MlflowClient, run_id: str, md5: str) -> None:
    """Tag run ``run_id`` with its checkpoint's md5. When an earlier run produced the same checkpoint,
    copy its downstream results (evaluate, export): DVC will not rerun those stages for it."""
    experiment_id = client.get_run(run_id).info.experiment_id
    earlier = pipeline_run(client, experiment_id, md5)
    client.set_tag(run_id, RESULTS_TAG + "train", "logged")
    if earlier is not None and earlier.info.run_id != run_id:
        copy_missing(client, earlier, run_id)
    client.set_tag(run_id, CHECKPOINT_TAG, md5)  # last: from now on evaluate and export find this run


def derive_run(client: MlflowClient, source_id: str, drop: set[str], params_digest: str | None = None) -> str:
    """A new run with ``source_id``'s params (less ``drop``), metrics and tags, tagged ``catdog.reused_from``."""
    source = client.get_run(source_id)
    tags = {k: v for k, v in source.data.tags.items() if copied_tag(k) and not k.startswith(RESULTS_TAG)}
    tags.update(dvc_exp_tags())  # this run's experiment, not the source's
    if params_digest:
        tags["catdog.params_hash"] = params_digest
    run = client.create_run(
        source.info.experiment_id, run_name=os.environ.get("DVC_EXP_NAME") or f"{source.info.run_name}-re", tags=tags
    )
    copy_missing(client, source, run.info.run_id, skip_params=drop)  # the stage logs those anew
    if source.inputs and source.inputs.dataset_inputs:  # the same data, still shown in the runs table
        client.log_inputs(run.info.run_id, datasets=source.inputs.dataset_inputs)
    return run.info.run_id


def copy_missing(client: MlflowClient, source, target_id: str, skip_params: set[str] = frozenset()) -> None:
    """Params (less ``skip_params``), metric histories and tags of ``source`` that run ``target_id``
    lacks; the stage results copied are marked ``copied``."""
    target = client.get_run(target_id).data
    tags = {
        k: ("copied" if k.startswith(RESULTS_TAG) else v)
        for k, v in source.data.tags.items()
        if k not in target.tags and copied_tag(k)
    }
    tags[REUSED_TAG] = source.info.run_id
    params = {k: v for k, v in source.data.params.items() if k not in target.params and k not in skip_params}
    history = [
        m
        for key in source.data.metrics
        if key not in target.metrics
        for m in client.get_metric_history(source.info.run_id, key)
    ]
    for start in range(0, max(len(history), 1), _BATCH):
        client.log_batch(
            target_id,
            metrics=[Metric(m.key, m.value, m.timestamp, m.step) for m in history[start : start + _BATCH]],
            params=[Param(k, v) for k, v in params.items()] if start == 0 else [],
            tags=[RunTag(k, v) for k, v in tags.items()] if start == 0 else [],
        )
