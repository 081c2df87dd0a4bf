"""Stopping a stage: real stage processes and a real ``dvc repro`` signalled mid-training.

SIGTERM/SIGINT end the stage in one line with exit 130 and its run KILLED; a SIGKILLed stage's
run is closed by the next stage of the experiment; a killed ``dvc repro`` takes its stage with it,
and the rerun resumes into one FINISHED run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import REPO_ROOT, SMALL_OVERRIDES, client_for, prepared_project, repo_params_raw
from dvc_project import copy_project, tool

STAGE = REPO_ROOT / "stages" / "train.py"
SLOW_TRAIN = {
    "train.mode": "full",
    "train.arch": "simple_cnn",
    "train.pretrained": False,
    "train.epochs": 30,
    "train.batch_size": 4,
    "train.lr": 0.01,
    "data.cache_size": 32,
    "train.image_size": 32,
}


def _write_params(root: Path, source: Path, **overrides) -> Path:
    raw = repo_params_raw()
    for key, value in {**SMALL_OVERRIDES, **SLOW_TRAIN, "data.source": str(source), **overrides}.items():
        section, name = key.split(".")
        raw[section][name] = value
    file = root / "params.yaml"
    file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return file


@pytest.fixture
def project(tmp_path, mlflow_template) -> Path:
    root = tmp_path / "project"
    prepared_project(root, mlflow_template, **{k: v for k, v in SLOW_TRAIN.items() if k.startswith("data.")})
    _write_params(root, root / "raw" / "train.zip")
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def _command(root: Path) -> list[str]:
    return [sys.executable, str(STAGE), "--root", str(root), "--params", str(root / "params.yaml")]


def _start(root: Path) -> subprocess.Popen:
    return subprocess.Popen(
        _command(root), cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _run(root: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(root), cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _paused_after_first_epoch(root: Path, proc: subprocess.Popen, timeout: float = 180) -> psutil.Process:
    """The train stage (``proc`` or its descendant), SIGSTOPped once its first epoch's state is saved.

    The stage runs only in short slices granted here, at the lowest priority: however late this
    test is scheduled, the stage cannot train on to its end first (a fast machine trains 30 epochs in 3 s).
    """
    state = root / "models" / "train_state.pt"
    deadline = time.monotonic() + timeout
    stage = None
    while True:
        assert proc.poll() is None, f"the stage ended before its first epoch:\n{proc.communicate()}"
        assert time.monotonic() < deadline, "no epoch finished in time"
        if stage is None and (stage := _train_stage(proc)):
            stage.nice(19)
        if stage:
            stage.suspend()
            if state.is_file():
                return stage
            stage.resume()
        time.sleep(0.02)


def _train_stage(proc: subprocess.Popen) -> psutil.Process | None:
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        # the python process itself, not a `sh -c "python stages/train.py"` wrapper (dash does not exec)
        return next(
            (p for p in tree if any(Path(arg).parts[-2:] == ("stages", "train.py") for arg in p.cmdline())), None
        )
    except psutil.NoSuchProcess:  # a short-lived process of dvc's
        return None


def _runs(root: Path):
    client = client_for(root)
    return client.search_runs(
        [client.get_experiment_by_name("catdog").experiment_id], order_by=["attributes.start_time ASC"]
    )


def test_a_stop_inside_a_failing_clean_up_still_exits_130_in_one_line(tmp_path):
    """A stop that lands inside torch.save makes its zip writer fail as it unwinds ("unexpected pos",
    seen in CI): that error must not turn the stop into a crash."""
    script = tmp_path / "stage.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import signal
            from catdog.core.lifecycle import StageStopped
            from catdog.pipeline.stage import main

            class FailingClose:
                def __enter__(self):
                    return self

                def __exit__(self, *exc_info):
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

            def run(params, paths):
                with FailingClose():
                    raise StageStopped(signal.SIGTERM)

            main("demo", run, ["--params", {str(REPO_ROOT / "params.yaml")!r}, "--root", {str(tmp_path)!r}])
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("demo: stopped by SIGTERM: its MLflow run is marked KILLED")


@pytest.mark.parametrize("working_thread", [False, True])
def test_a_finished_stage_script_ends_after_its_exit_handlers_without_teardown(tmp_path, working_thread):
    """The stage scripts skip the interpreter's teardown (seconds of every trial), never what comes
    before it: a thread still at work is waited for, the exit handlers (MLflow's flushes) run."""
    script = tmp_path / "stage.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import atexit, sys, threading, time
            from pathlib import Path
            from catdog.pipeline.stage import main

            class TornDown:
                def __del__(self):
                    sys.stderr.write("torn down\\n")

            kept = TornDown()  # the interpreter's teardown deletes it

            def late_write():
                time.sleep(0.5)
                Path({str(tmp_path / "thread.txt")!r}).write_text("done")

            def run(params, paths):
                atexit.register(Path({str(tmp_path / "handler.txt")!r}).write_text, "ran")
                if {working_thread}:
                    threading.Thread(target=late_write).start()
                return {{"answer": 42}}

            main("demo", run, ["--params", {str(REPO_ROOT / "params.yaml")!r}, "--root", {str(tmp_path)!r}],
                 ends_process=True)
            print("after main")
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["demo: answer 42"]  # nothing after main
    assert (tmp_path / "handler.txt").read_text() == "ran"
    assert (tmp_path / "thread.txt").is_file() == working_thread
    assert "torn down" not in proc.stderr


def test_a_stage_script_imports_without_collections_and_still_collects_cycles_after(tmp_path):
    """stage_imports: no collection walks the objects the imports make (0.5-0.9 s of each stage
    process), and the run's reference cycles are still collected."""
    script = tmp_path / "stage.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import gc, weakref
            from catdog.pipeline.stage import STAGE_GC_THRESHOLD, main, stage_imports

            def collections():
                return sum(generation["collections"] for generation in gc.get_stats())

            before = collections()
            with stage_imports():
                import sklearn.linear_model  # tens of thousands of objects: many collections by default
                during = collections() - before

            class Node:
                pass

            def run(params, paths):
                node = Node()
                node.itself = node
                collected = weakref.ref(node)
                del node
                kept = [[] for _ in range(3 * STAGE_GC_THRESHOLD)]  # allocations that stay: young collections
                return {{"during_imports": during, "frozen": gc.get_freeze_count() > 10_000,
                        "threshold": gc.get_threshold()[0], "cycle_collected": collected() is None}}

            main("demo", run, ["--params", {str(REPO_ROOT / "params.yaml")!r}, "--root", {str(tmp_path)!r}],
                 ends_process=True)
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["demo: during_imports 0, frozen True, threshold 50000, cycle_collected True"]


@pytest.mark.slow  # real processes: run by make test, not make check
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_stage_marks_its_run_killed_in_one_line_and_the_rerun_resumes(project, signum):
    proc = _start(project)
    stage = _paused_after_first_epoch(project, proc)
    proc.send_signal(signum)
    stage.resume()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert (
        f"train: stopped by {signal.Signals(signum).name}: its MLflow run is marked KILLED" in stderr.splitlines()[-1]
    )
    (run,) = _runs(project)
    assert run.info.status == "KILLED"
    assert 1 <= int(run.data.tags["catdog.epoch_reached"]) < SLOW_TRAIN["train.epochs"]
    assert run.data.tags["catdog.stopped"] == f"{signal.Signals(signum).name} during train"

    assert "resuming after epoch" in _run(project).stdout
    (run,) = _runs(project)
    assert run.info.status == "FINISHED"


@pytest.mark.slow  # real processes: run by make test, not make check
def test_a_sigkilled_stages_run_is_closed_by_the_next_stage_whatever_its_params(project):
    proc = _start(project)
    _paused_after_first_epoch(project, proc)
    proc.kill()
    proc.wait()
    (orphan,) = _runs(project)
    assert orphan.info.status == "RUNNING"
    assert orphan.data.tags["catdog.pid"] == str(proc.pid)

    _write_params(project, project / "raw" / "train.zip", **{"train.epochs": 2, "train.lr": 0.02})
    other = _run(project)
    notes = [line for line in other.stderr.splitlines() if "KILLED" in line]
    assert len(notes) == 1 and orphan.info.run_id[:8] in notes[0], other.stderr
    statuses = {run.info.run_id: run.info.status for run in _runs(project)}
    assert statuses.pop(orphan.info.run_id) == "KILLED"
    assert list(statuses.values()) == ["FINISHED"]


@pytest.mark.slow
# dvc runs a stage through `$SHELL -c`: bash execs the command, dash (Debian's /bin/sh) stays in between
@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_killing_dvc_repro_stops_the_stage_and_the_rerun_resumes_into_one_finished_run(tmp_path, shell):
    proj = copy_project(
        tmp_path / "project",
        {
            "data": {"source": "data/tiny.zip", "cache_size": 32, "min_per_class": 4, "workers": 1},
            "train": {**{k.split(".")[1]: v for k, v in SLOW_TRAIN.items() if k.startswith("train.")}, "workers": 0},
            "evaluate": {"batch_size": 16},
        },
    )
    dvc = subprocess.Popen(
        [tool("dvc"), "repro"],
        cwd=proj.root,
        env={**proj.env, "SHELL": shell},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        stage = _paused_after_first_epoch(proj.root, dvc, timeout=400)  # paused while dvc dies
        os.kill(dvc.pid, signal.SIGTERM)  # dvc alone, as a scheduler or `kill` would
        dvc.wait(30)
        stage.resume()  # its watcher thread sees dvc gone within a second and stops it
        gone_in = _seconds_until_gone(stage, limit=10)
        output = dvc.communicate(timeout=30)[0]  # the stage writes into dvc's stdout until it ends
    finally:
        if dvc.poll() is None:
            os.killpg(dvc.pid, signal.SIGKILL)
    assert gone_in is not None, "the train stage outlived dvc by more than 10 s"
    (killed,) = proj.runs()
    assert killed.info.status == "KILLED", output
    assert "train: stopped by SIGTERM" in output

    output = proj.repro()
    assert "resuming after epoch" in output
    (run,) = proj.runs()
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"


def _seconds_until_gone(process: psutil.Process, limit: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                return time.monotonic() - start
        except psutil.NoSuchProcess:  # ended between the two checks
            return time.monotonic() - start
        time.sleep(0.1)
    return None
