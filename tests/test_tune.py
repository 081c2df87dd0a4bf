"""``catdog tune`` for real: Optuna studies whose trials are ``dvc exp run --temp`` experiments of a
throwaway copy of the project (tests/dvc_project.py, tiny images) and MLflow runs under the study's
parent run, in the project's sqlite stores and on a throwaway PostgreSQL server.

Each trial is as cheap as the pipeline allows: frozen features with the logistic head (``head: auto``,
one fit, no epochs), no audit, no int8/bf16 variants, a one-image heatmap gallery; the space samples
the head's C. One project serves the module (DVC's run-cache keeps prepare from running more than
once or twice), one study per test: bad spaces and refused combinations first (no run at all), then
two processes sharing a study on sqlite, a study killed (SIGKILL) during a trial and started again,
two processes sharing a study on PostgreSQL, and Ctrl-C's clean stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import test_tracking_server

import dvc_project as dp
from dvc_project import TINY_PARAMS, Project, tool

pytestmark = pytest.mark.slow
postgres = test_tracking_server.postgres  # the throwaway PostgreSQL cluster (skips without Debian's binaries)

C_SPACE = "train.logistic_c: {low: 0.01, high: 10.0, log: true}\n"  # the logistic head's one knob
TUNE_TIMEOUT = 600


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    params = {
        **TINY_PARAMS,
        "audit": {"enabled": False},  # the label audit: tests/test_audit.py
        "train": {**TINY_PARAMS["train"], "head": "auto", "logistic_c": 0.1, "epochs": 1},  # one logistic fit
        "evaluate": {**TINY_PARAMS["evaluate"], "gallery_size": 1},  # one Grad-CAM heatmap, not 16
        # no registry: the trials' runs are what is checked; no int8/bf16 variants (TINY_PARAMS)
        "export": {**TINY_PARAMS["export"], "registered_model_name": None},
    }
    proj = dp.copy_project(tmp_path_factory.mktemp("tune") / "project", params)
    (proj.root / "c.yaml").write_text(C_SPACE)  # untracked: --temp experiments carry the workspace's changes
    return proj


def space_starting_at(proj: Project, name: str, c: float) -> str:
    """C_SPACE with a start point of its own: a C no other study here runs, or DVC's run-cache would
    restore that trial instead of running it (no stage, no MLflow run)."""
    (proj.root / name).write_text(f"{C_SPACE}start:\n  - {{train.logistic_c: {c}}}\n")
    return name


def tune(proj: Project, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = proj.run(tool("catdog"), "tune", *args, check=False, timeout=TUNE_TIMEOUT, env=env)
    if check and proc.returncode != 0:
        pytest.fail(dp.describe(proc), pytrace=False)
    return proc


def start_tune(proj: Project, log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [tool("catdog"), "tune", *args],
            cwd=proj.root,
            env=env or proj.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a kill reaches only it: the test's own process group stays out
        )


def wait(process: subprocess.Popen, log: Path) -> str:
    try:
        code = process.wait(TUNE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"catdog tune still running after {TUNE_TIMEOUT} s\n{dp.tail(log.read_text())}", pytrace=False)
    output = log.read_text()
    assert code == 0, f"catdog tune exited with {code}\n{dp.tail(output)}"
    return output


def study(proj: Project, name: str, storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{proj.root}/optuna.db")


def experiments(proj: Project) -> dict[str, dict]:
    """``dvc exp show``'s experiments: name -> their params.yaml."""
    shown = json.loads(proj.dvc("exp", "show", "--json").stdout)
    found = {}
    for baseline in shown:
        for exp_range in baseline.get("experiments") or []:
            for rev in exp_range["revs"]:
                data = rev.get("data") or {}
                found[exp_range.get("name") or rev.get("name")] = data["params"]["params.yaml"]["data"]
    return found


def children(proj: Project, parent_id: str) -> dict[str, object]:
    runs = proj.client().search_runs([proj.experiment_id()], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {run.info.run_name: run for run in runs}


def parent_run(proj: Project, name: str):
    runs = [r for r in proj.runs() if r.data.tags.get("catdog.study") == name]
    assert len(runs) == 1, f"{len(runs)} parent runs of study {name!r}"
    return runs[0]


# --------------------------------------------------------------------------- no run at all


def test_a_bad_space_stops_before_any_trial(project):
    """Every kind of bad entry: tests/test_search_space.py; here the command's exit code and one line."""
    (project.root / "bad.yaml").write_text("train.lr: [0.001]\ntrain.lrr: [0.1]\n")
    proc = tune(project, "--space", "bad.yaml", "--trials", "1", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "bad.yaml: train.lrr: unknown key" in lines[0], dp.describe(
        proc
    )
    assert not (project.root / "optuna.db").exists(), "a study was opened for a bad space"


def test_a_combination_params_refuse_is_pruned_without_a_run(project):
    (project.root / "refused.yaml").write_text("train.head: [logistic]\ntrain.epochs: [2]\n")  # logistic: epochs 1
    proc = tune(project, "--space", "refused.yaml", "--trials", "2", "--json")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {"study": "refused", "best": None, "trials": {"complete": 0, "failed": 0, "pruned": 2}}
    for trial in study(project, "refused").trials:  # params validation's own line, naming the key
        assert trial.user_attrs["reason"].startswith(f"refused-{trial.number}: train.head 'logistic' is fitted once")
    assert not children(project, parent_run(project, "refused").info.run_id)
    assert not experiments(project)


# --------------------------------------------------------------------------- real trials


def test_two_processes_share_one_study_of_dvc_experiments_and_mlflow_runs(project, tmp_path):
    params_before = (project.root / "params.yaml").read_bytes()
    args = ("--space", space_starting_at(project, "shared.yaml", 0.5), "--study", "shared", "--trials", "2", "--json")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    processes = [start_tune(project, log, *args) for log in logs]
    outputs = [wait(process, log) for process, log in zip(processes, logs, strict=True)]

    trials = study(project, "shared").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], outputs
    assert trials[0].params == {"train.logistic_c": 0.5}, "the space's start point was not tried first"
    names = {t.user_attrs["experiment"] for t in trials}
    assert names == {"shared-0", "shared-1"}
    shown = experiments(project)
    for trial in trials:  # each trial is a DVC experiment with its params
        c = shown[trial.user_attrs["experiment"]]["train"]["logistic_c"]
        assert c == pytest.approx(trial.params["train.logistic_c"])
    assert (project.root / "params.yaml").read_bytes() == params_before, "the workspace's params.yaml changed"

    parent = parent_run(project, "shared")
    runs = children(project, parent.info.run_id)
    assert set(runs) == names and all(run.info.status == "FINISHED" for run in runs.values())
    assert project.artifacts(parent.info.run_id) >= {
        "search_space.yaml",
        "trials.csv",
        "study.json",
        "optimization_history.png",
        "param_importances.png",
    }
    best = min(trials, key=lambda t: t.value)
    assert parent.data.tags["catdog.best.experiment"] == best.user_attrs["experiment"]
    # the process that ends last (either of them) sees both trials: its summary names the best
    last = max(range(2), key=lambda i: logs[i].stat().st_mtime_ns)
    summary = json.loads(outputs[last].strip().splitlines()[-1])
    assert summary["best"]["experiment"] == best.user_attrs["experiment"], outputs
    assert summary["trials"] == {"complete": 2, "failed": 0, "pruned": 0}
    assert f"dvc exp apply {best.user_attrs['experiment']}" in outputs[last]


def stop_after_train(proj: Project, process: subprocess.Popen, log: Path, experiment: str, signum: int) -> int:
    """Send ``signum`` to the tune process (only it) once ``experiment``'s train stage has ended: its
    MLflow run reads FINISHED, as each stage leaves it, while evaluate has yet to reopen it."""
    deadline = time.monotonic() + TUNE_TIMEOUT

    def trained() -> bool:  # the store exists once the trial runs (reading it earlier races its creation)
        if f"tune: {experiment} running" not in log.read_text():
            return False
        runs = {r.info.run_name: r for r in proj.runs()}
        return experiment in runs and runs[experiment].info.status == "FINISHED"

    while not trained():
        assert process.poll() is None and time.monotonic() < deadline, dp.tail(log.read_text())
        time.sleep(0.2)  # evaluate takes seconds to start (its imports): caught before it reopens the run
    process.send_signal(signum)
    return process.wait(120)


def test_a_killed_study_continues_without_running_a_trial_twice(project, tmp_path):
    """SIGKILL, the hard case: no clean-up at all, so the next process must find the stale trial, and
    mark KILLED its MLflow run, which the finished train stage left FINISHED."""
    # its start point is not queued again on resume: it would be a duplicate of the killed trial, pruned
    space = space_starting_at(project, "killed.yaml", 0.37)
    args = ("--space", space, "--study", "killed", "--trials", "2", "--seed", "7")
    log = tmp_path / "killed.log"
    stop_after_train(project, start_tune(project, log, *args), log, "killed-0", signal.SIGKILL)
    # (dvc and the stage follow it: PR_SET_PDEATHSIG, catdog.core.lifecycle)

    proc = tune(project, *args, "--json")
    trials = study(project, "killed").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"], proc.stdout
    assert trials[0].user_attrs["error"] == "its catdog tune process was killed"
    assert [t.user_attrs["experiment"] for t in trials] == ["killed-0", "killed-1"]
    shown = experiments(project)
    assert "killed-0" not in shown and "killed-1" in shown
    runs = children(project, parent_run(project, "killed").info.run_id)
    assert runs["killed-0"].info.status == "KILLED" and runs["killed-1"].info.status == "FINISHED"
    assert json.loads(proc.stdout.strip().splitlines()[-1])["trials"] == {"complete": 1, "failed": 1, "pruned": 0}


def test_ctrl_c_stops_the_study_and_marks_the_trial_and_its_runs(project, tmp_path):
    """SIGINT (Ctrl-C; SIGTERM alike), after train: the stop is passed to dvc, the trial is marked
    FAILED by the process itself, and its MLflow run (left FINISHED by train) and the parent KILLED."""
    args = ("--space", space_starting_at(project, "stopped.yaml", 0.29), "--study", "stopped", "--trials", "2")
    log = tmp_path / "stopped.log"
    code = stop_after_train(project, start_tune(project, log, *args), log, "stopped-0", signal.SIGINT)
    assert code == 130 and "catdog: tune stopped" in log.read_text(), dp.tail(log.read_text())
    (trial,) = study(project, "stopped").trials
    assert trial.state.name == "FAIL" and trial.user_attrs["error"] == "interrupted: catdog tune was stopped"
    parent = parent_run(project, "stopped")
    assert parent.info.status == "KILLED"
    assert children(project, parent.info.run_id)["stopped-0"].info.status == "KILLED"


def test_two_processes_share_a_study_on_postgresql(project, postgres, tmp_path):
    args = ("--space", "c.yaml", "--study", "pg", "--trials", "2", "--storage", postgres, "--seed", "3")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    processes = [start_tune(project, log, *args) for log in logs]
    for process, log in zip(processes, logs, strict=True):
        wait(process, log)
    trials = study(project, "pg", storage=postgres).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert {t.user_attrs["experiment"] for t in trials} == {"pg-0", "pg-1"}
    assert set(children(project, parent_run(project, "pg").info.run_id)) == {"pg-0", "pg-1"}
    password = postgres.split(":")[2].split("@")[0]
    assert password not in parent_run(project, "pg").data.tags["catdog.storage"]


def test_the_budget_and_study_name_are_checked_by_the_cli(project):
    proc = tune(project, "--space", "c.yaml", check=False)
    assert proc.returncode == 2 and "needs a budget" in proc.stderr
    proc = tune(project, "--space", "c.yaml", "--trials", "1", "--study", "no good", check=False)
    assert proc.returncode == 2 and "--study" in proc.stderr
