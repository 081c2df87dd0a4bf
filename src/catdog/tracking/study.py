"""The parent run of a ``catdog tune`` study: one MLflow run per study, its trials' pipeline runs
nested under it (they tag ``mlflow.parentRunId`` from ``CATDOG_PARENT_RUN_ID``: lineage), holding
the search space, the budget, the best value and params, the study's plots and a CSV of all trials.

A study resumed or shared by several ``catdog tune`` processes keeps one parent: each process looks
for the study's run first; two that both create one keep the earlier and delete their own.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.entities import RunStatus

from catdog.tracking.lineage import PARENT_TAG
from catdog.tracking.runs import client, close_orphans
from catdog.tracking.store import experiment_id

STUDY_TAG = "catdog.study"
SPACE_FILE = "search_space.yaml"


def open_study_run(project_root: Path, experiment_name: str, study: str, space_text: str, tags: dict[str, str]) -> str:
    """The parent run of ``study`` (created, or found and set RUNNING again), tagged with ``tags``; its id.
    Runs of trials whose process was killed are marked KILLED first."""
    store = client(project_root)
    experiment = experiment_id(store, experiment_name, project_root)
    close_orphans(store, experiment)
    found = _study_runs(store, experiment, study)
    if not found:
        own = store.create_run(experiment, run_name=study, tags={STUDY_TAG: study}).info.run_id
        store.log_text(own, space_text, SPACE_FILE)
        found = _study_runs(store, experiment, study)
        for duplicate in found[1:]:  # another process created one at the same moment: the earlier wins
            if duplicate.info.run_id == own:
                store.delete_run(own)
    run_id = found[0].info.run_id
    store.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    for key, value in tags.items():
        store.set_tag(run_id, key, value)
    return run_id


def record_study(project_root: Path, run_id: str, summary: dict, metric: str, figures: dict, trials_csv: str) -> None:
    """The study's state so far on its parent run: ``summary`` (see catdog.search.report) as tags,
    the best ``metric`` value as a metric, the figures (name -> matplotlib figure) and the CSV as artifacts."""
    store = client(project_root)
    best, counts = summary.get("best"), summary["trials"]
    tags = {f"catdog.trials.{state}": str(n) for state, n in counts.items()}
    if best:
        tags.update({"catdog.best.experiment": best["experiment"], "catdog.best.value": str(best["value"])})
        tags.update({f"catdog.best.{key}": json.dumps(value) for key, value in best["params"].items()})
        store.log_metric(run_id, f"best_{metric}", best["value"], step=sum(counts.values()))
    for key, value in tags.items():
        store.set_tag(run_id, key, value)
    store.log_dict(run_id, summary, "study.json")
    store.log_text(run_id, trials_csv, "trials.csv")
    for name, figure in figures.items():
        store.log_figure(run_id, figure, name)


def end_killed_trials(project_root: Path, experiment_name: str, trials: list[str]) -> None:
    """Mark KILLED the runs of ``trials`` (experiment names) whose ``catdog tune`` was killed or
    stopped. A stage that was running ended its run KILLED itself, or ``close_orphans`` did; a trial
    stopped between two stages left its run FINISHED, as the stage before left it, though its
    pipeline never ended."""
    if not trials:
        return
    store = client(project_root)
    experiment = experiment_id(store, experiment_name, project_root)
    for name in trials:
        for run in store.search_runs([experiment], f"attributes.run_name = '{name}'", max_results=10):
            if run.info.status != "KILLED":
                store.set_tag(run.info.run_id, "catdog.stopped", "its catdog tune process was killed")
                store.set_terminated(run.info.run_id, "KILLED")


def end_study_run(project_root: Path, run_id: str, status: str = "FINISHED") -> None:
    client(project_root).set_terminated(run_id, status)


def _study_runs(store, experiment: str, study: str) -> list:
    """The study's parent runs, the earliest first (only one once the race above is settled)."""
    runs = store.search_runs([experiment], f"tags.`{STUDY_TAG}` = '{study}'", max_results=100)
    parents = [run for run in runs if PARENT_TAG not in run.data.tags]
    return sorted(parents, key=lambda run: (run.info.start_time, run.info.run_id))
