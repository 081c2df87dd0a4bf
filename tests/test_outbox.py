"""A tracking-server outage mid-run: a real ``mlflow server`` on 127.0.0.1, killed by the test
while the real train stage trains, and brought back (or not).

The stage finishes its outputs either way. Its writes while the server was down wait in the
run's outbox (``mlflow-outbox/``) and reach the server when it is back: from the stage itself,
or later from ``catdog sync``. Either way the run ends FINISHED with every epoch, step, tag and
artifact exactly once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from catdog.core.paths import Paths
from catdog.data import integrity
from catdog.tracking.outbox import DIRECTORY

from conftest import REPO_ROOT, SMALL_OVERRIDES, prepared_project, repo_params_raw
from dvc_project import free_port, start_mlflow, stop, tool

pytestmark = pytest.mark.slow  # real server and stage processes

EPOCHS, STEPS_PER_EPOCH, LOG_EVERY = 30, 3, 2  # 10 + 10 images, 20% val, 20% test: 12 train images / 4
TRAIN = {
    "train.mode": "full",
    "train.arch": "simple_cnn",
    "train.pretrained": False,
    "train.epochs": EPOCHS,
    "train.batch_size": 4,
    "train.lr": 0.01,
    "train.log_every_n_steps": LOG_EVERY,
}


class Server:
    """``mlflow server`` on a sqlite store in ``root``, stopped and started again on the same port."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        store = ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        artifacts = ["--artifacts-destination", str(self.root / "artifacts")]
        self.proc = start_mlflow("server", [*store, *artifacts], self.port, self.root / "server.log", self.root)

    def stop(self) -> None:
        stop(self.proc)

    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path / "server")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def project(tmp_path, mlflow_template) -> Paths:
    paths, _ = prepared_project(tmp_path / "project", mlflow_template, **SMALL_OVERRIDES)
    raw = repo_params_raw()
    for key, value in {**SMALL_OVERRIDES, **TRAIN, "data.source": "unused.zip"}.items():
        section, name = key.split(".")
        raw[section][name] = value
    (paths.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(REPO_ROOT / "dvc.yaml", paths.root)  # what makes it a project for `catdog sync`
    return paths


def _env(server: Server, grace_seconds: int) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": server.uri,
        "CATDOG_TRACKING_GRACE_SECONDS": str(grace_seconds),
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",  # its thread surely meets the server down
    }


def _train_through_an_outage(paths: Paths, server: Server, grace_seconds: int, restart: bool):
    """The train stage, the server killed after its second epoch (and restarted if ``restart``);
    returns the finished process and the seconds from the kill to the stage's end."""
    command = [sys.executable, str(REPO_ROOT / "stages" / "train.py"), "--root", str(paths.root)]
    command += ["--params", str(paths.params_file)]
    proc = subprocess.Popen(
        command,
        cwd=paths.root,
        env=_env(server, grace_seconds),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not _epoch_saved(paths) >= 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no second epoch in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)  # the server goes down mid-run on a fast machine too
        server.stop()
        killed = time.monotonic()
        proc.send_signal(signal.SIGCONT)
        if restart:  # once the stage holds writes back: a quick restart is bridged by MLflow's own retries
            while not list((paths.root / DIRECTORY).glob("*.jsonl")):
                assert proc.poll() is None and time.monotonic() < deadline, "the stage never held a write back"
                time.sleep(0.1)
            server.start()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr), time.monotonic() - killed


def _epoch_saved(paths: Paths) -> int:
    try:
        return torch.load(paths.train_state, weights_only=True)["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):  # not yet there, or being replaced
        return 0


def _assert_the_run_is_whole(server: Server, paths: Paths) -> None:
    client = server.client()
    (run,) = client.search_runs([client.get_experiment_by_name("catdog").experiment_id])
    assert run.info.status == "FINISHED"
    for key, steps in {
        "val/loss": list(range(1, EPOCHS + 1)),
        "train/step_loss": list(range(LOG_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, LOG_EVERY)),
    }.items():
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == steps, key
    assert run.data.tags["catdog.checkpoint_md5"] == integrity.file_md5(paths.checkpoint)
    assert run.data.tags["catdog.epochs_trained"] == str(EPOCHS)
    logged = {a.path for folder in ("plots", "reports") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"plots/curves.png", "reports/history.csv"} <= logged, logged
    assert not list((paths.root / DIRECTORY).glob("*.jsonl")), "the outbox is not empty"


def test_a_server_back_before_the_stage_ends_gets_every_write_from_the_stage(project, server):
    proc, _ = _train_through_an_outage(project, server, grace_seconds=120, restart=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lost = [line for line in proc.stderr.splitlines() if "lost the MLflow tracking server" in line]
    assert len(lost) == 1 and server.uri in lost[0], proc.stderr
    assert "warning" not in proc.stderr.splitlines()[-1], proc.stderr
    assert project.checkpoint.is_file() and project.train_metrics.is_file()
    _assert_the_run_is_whole(server, project)


def test_a_server_down_to_the_end_leaves_the_outputs_and_catdog_sync_sends_the_rest(project, server):
    proc, after_kill = _train_through_an_outage(project, server, grace_seconds=5, restart=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert after_kill < 60 + 5, f"the outage delayed the stage: {after_kill:.0f} s after the kill"
    assert " mlflow." not in proc.stderr, "MLflow's threads repeat the outage: " + proc.stderr
    warning = proc.stderr.splitlines()[-1]
    assert warning.startswith("train: warning: the MLflow tracking server") and "catdog sync" in warning, warning
    assert f"{DIRECTORY}/" in warning and "run end" in warning, warning
    assert project.checkpoint.is_file() and project.train_metrics.is_file()

    server.start()
    sync = subprocess.run(
        [tool("catdog"), "sync"], cwd=project.root, env=_env(server, 5), capture_output=True, text=True, timeout=120
    )
    assert sync.returncode == 0, sync.stderr
    assert "1 run(s) brought up to date" in sync.stdout, sync.stdout + sync.stderr
    _assert_the_run_is_whole(server, project)
