"""``catdog tune``: an Optuna study over a search space, each trial a DVC experiment and an MLflow run.

The study lives in Optuna's RDB storage (``optuna.db`` beside ``mlflow.db``, or ``--storage URL``,
e.g. PostgreSQL for a team), so a killed ``catdog tune`` started again with the same ``--study``
continues and several processes share one study. A trial whose process is gone is marked FAILED
when the next process starts: at once on this host (its PID is recorded), after Optuna's heartbeat
grace period from another host. Params validation refusing a combination prunes the trial without a
run; a failed ``dvc exp run`` fails it with its last error line; neither stops the study.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
import yaml
from optuna.trial import TrialState

from catdog import tracking
from catdog.core import lifecycle
from catdog.core.errors import CatdogError
from catdog.core.params import ParamsError, parse_params
from catdog.search.report import close_figures, study_figures, summarise
from catdog.search.space import Entry, Space, load_space, sample, with_values
from catdog.search.trials import TrialFailed, check_visible, forget_killed, run_trial
from catdog.tracking import study as study_run
from catdog.tracking.store import sqlite_lock

OPTUNA_DB = "optuna.db"  # beside mlflow.db: git-ignored, like it
HEARTBEAT_S, GRACE_S = 30, 120  # a trial without a heartbeat for GRACE_S is stale (killed on another host)
SQLITE_WAIT_S = 60
_CREATE_TRIES = 5
_ALL_DONE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class Search:
    """What ``catdog tune`` was asked for."""

    root: Path
    space: Path
    study: str
    trials: int | None  # the study's total, over every process and restart
    timeout_min: float | None  # this process's
    metric: str
    direction: str
    storage: str | None
    seed: int


def default_storage(root: Path) -> str:
    return f"sqlite:///{tracking.store_root(root) / OPTUNA_DB}"


def tune(search: Search) -> optuna.Study:
    """Run the study within its budget (recorded on its parent run at the end, even when stopped)."""
    base = yaml.safe_load((search.root / "params.yaml").read_text()) or {}
    params = parse_params(base)
    space = load_space(search.space, base)
    check_visible(search.root, params.data.source)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial prints its own line, Ctrl-C no traceback
    study = _open_study(search, space)
    killed = _fail_killed_trials(study, search.root)
    parent = study_run.open_study_run(
        search.root, params.tracking.experiment_name, search.study, search.space.read_text(), _budget_tags(search)
    )
    study_run.end_killed_trials(search.root, params.tracking.experiment_name, killed)
    objective = _Objective(search, space.entries, base, params.flat(), parent)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C
    status = "FINISHED"
    try:
        _optimize(study, objective, search)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        summary, figures = summarise(study), study_figures(study)
        study_run.record_study(search.root, parent, summary, search.metric, figures, _csv(study))
        study_run.end_study_run(search.root, parent, status)
        close_figures(figures)
    return study


@dataclass(frozen=True)
class _Objective:
    """One trial: its params sampled, checked (pruned when refused or already tried), run, its value."""

    search: Search
    entries: list[Entry]
    base: dict  # params.yaml as read
    base_flat: dict[str, object]  # the same, validated, by dotted key
    parent_run_id: str

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("process", lifecycle.process_tags())
        name = f"{self.search.study}-{trial.number}"
        trial.set_user_attr("experiment", name)
        overrides = sample(trial, self.entries, self.base_flat)
        trial.set_user_attr("params", overrides)  # params.yaml keys (a set choice expanded)
        _prune_if_refused(trial, self.base, overrides, name)
        _prune_if_duplicate(trial, name)
        print(f"tune: {name} running: " + " ".join(f"{k}={v}" for k, v in overrides.items()), flush=True)
        log = self.search.root / ".dvc" / "tmp" / "tune" / self.search.study / f"{name}.log"
        try:
            result = run_trial(self.search.root, name, overrides, self.parent_run_id, log)
        except TrialFailed as failed:
            return _failed(trial, name, str(failed))
        except KeyboardInterrupt:  # dvc and the stage have ended (trials.run_trial waits for them)
            trial.set_user_attr("error", "interrupted: catdog tune was stopped")
            study_run.end_killed_trials(self.search.root, str(self.base_flat["tracking.experiment_name"]), [name])
            raise
        trial.set_user_attr("test", result.evaluate)
        metric = self.search.metric
        if metric not in result.train:
            return _failed(trial, name, f"{metric} not in reports/train/metrics.json ({sorted(result.train)})")
        print(f"tune: {name} {metric} {result.train[metric]}", flush=True)
        return result.train[metric]


def _failed(trial: optuna.Trial, name: str, error: str) -> float:
    trial.set_user_attr("error", error)
    print(f"tune: {name} failed: {error}", flush=True)
    return math.nan  # Optuna marks the trial FAILED and the study goes on


def _open_study(search: Search, space: Space) -> optuna.Study:
    url = search.storage or default_storage(search.root)
    sqlite = url.startswith("sqlite:")  # wait for another process's write instead of failing at sqlite's 5 s
    engine = {"connect_args": {"timeout": SQLITE_WAIT_S}} if sqlite else None
    sampler = optuna.samplers.TPESampler(seed=search.seed, constant_liar=True)  # liar: shared studies spread out
    # Two processes meeting a new sqlite file both create its tables ("table studies already exists").
    with sqlite_lock(url), warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = _storage(url, engine)
        try:
            study = optuna.create_study(
                storage=storage, study_name=search.study, sampler=sampler, direction=search.direction
            )
            for point in space.start:  # a new study only: a resumed one has them already
                study.enqueue_trial(point)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=search.study, storage=storage, sampler=sampler)
            # Resumed, or a second process: a seed of its own, or it would draw the first process's trials again.
            sampler.reseed_rng()
    if study.direction.name.lower() != search.direction:
        raise CatdogError(f"study {search.study!r} {study.direction.name.lower()}s its objective: pass --direction")
    return study


def _storage(url: str, engine: dict | None) -> optuna.storages.RDBStorage:
    """Optuna's storage at ``url``, its tables created on first use. Two processes creating them on one
    database server at once collide (PostgreSQL: duplicate type "studydirection"): the one that loses
    finds them made when it tries again."""

    def create() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
        )

    for attempt in range(_CREATE_TRIES - 1):
        try:
            return create()
        except sqlalchemy.exc.SQLAlchemyError:
            time.sleep(1 + attempt)
    return create()


def _fail_killed_trials(study: optuna.Study, root: Path) -> list[str]:
    """RUNNING trials whose ``catdog tune`` process (on this host) is gone become FAILED now, their DVC
    experiment's leftovers removed; those of other hosts once their heartbeat is older than the grace
    period (Optuna). Optuna has no public call to fail one trial: its storage's, as fail_stale_trials.
    The experiment names of this host's, whose MLflow runs are then marked KILLED."""
    killed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        process = trial.user_attrs.get("process", {})
        if process.get(lifecycle.HOST_TAG) == socket.gethostname() and lifecycle.process_gone(process):
            study._storage.set_trial_user_attr(trial._trial_id, "error", "its catdog tune process was killed")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            killed.append(trial.user_attrs.get("experiment", ""))
            forget_killed(root, killed[-1])
            print(f"tune: trial {trial.number} marked FAILED: its catdog tune process was killed", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return killed


def _optimize(study: optuna.Study, objective, search: Search) -> None:
    left = None if search.trials is None else search.trials - len(study.trials)
    if left is not None and left <= 0:
        print(f"tune: study {search.study!r} already has {len(study.trials)} trial(s) of {search.trials}")
        return
    callbacks = [optuna.study.MaxTrialsCallback(search.trials, states=None)] if search.trials else []
    timeout = None if search.timeout_min is None else search.timeout_min * 60
    study.optimize(objective, n_trials=left, timeout=timeout, callbacks=callbacks)


def _prune_if_refused(trial: optuna.Trial, base: dict, overrides: dict, name: str) -> None:
    try:
        parse_params(with_values(base, overrides), source=name)
    except ParamsError as refused:
        _prune(trial, f"{refused}", name)


def _prune_if_duplicate(trial: optuna.Trial, name: str) -> None:
    """The same params as a finished or running trial: its result is known (or will be), no second run."""
    states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL)
    for other in trial.study.get_trials(deepcopy=False, states=states):
        if other.number != trial.number and other.params == trial.params:
            _prune(trial, f"same params as trial {other.number} ({other.user_attrs.get('experiment')})", name)


def _prune(trial: optuna.Trial, reason: str, name: str) -> None:
    trial.set_user_attr("reason", reason)
    print(f"tune: {name} pruned: {reason}", flush=True)
    raise optuna.TrialPruned(reason)


def _budget_tags(search: Search) -> dict[str, str]:
    return {
        "catdog.space": str(search.space),
        "catdog.budget.trials": str(search.trials),
        "catdog.budget.timeout_min": str(search.timeout_min),
        "catdog.objective": f"{search.direction} {search.metric} (reports/train/metrics.json)",
        "catdog.storage": _without_password(search.storage or default_storage(search.root)),
        "catdog.sampler": f"TPE, seed {search.seed}",
        "catdog.tune_pid": str(os.getpid()),
    }


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url  # Optuna's RDB storage is SQLAlchemy's

    return make_url(url).render_as_string(hide_password=True)


def _csv(study: optuna.Study) -> str:
    frame = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
    return frame.to_csv(index=False)
