"""Expected failures end a stage in one line (``<stage>: error: ...``), leave its outputs as they
were, and tag the pipeline's run with the stage that failed; the rerun finishes the run."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from catdog.pipeline import train

from conftest import REPO_ROOT, SMALL_OVERRIDES, client_for, prepared_project, repo_params_raw
from dvc_project import free_port

TRAIN = {"train.mode": "full", "train.arch": "simple_cnn", "train.pretrained": False, "train.epochs": 1}


@pytest.fixture
def project(tmp_path, mlflow_template):
    paths, params = prepared_project(tmp_path / "project", mlflow_template, **TRAIN)
    return paths, params


def _stage(name: str, paths, env: dict[str, str] | None = None, **overrides) -> subprocess.CompletedProcess:
    raw = repo_params_raw()
    for key, value in {**SMALL_OVERRIDES, **TRAIN, "data.source": "unused.zip", **overrides}.items():
        section, field = key.split(".")
        raw[section][field] = value
    params_file = paths.root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**{k: v for k, v in os.environ.items() if k != "CATDOG_DEBUG"}, **(env or {})}
    return subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "stages" / f"{name}.py"),
            "--root",
            str(paths.root),
            "--params",
            str(params_file),
        ],
        cwd=paths.root,
        env={**env, "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _runs(paths):
    client = client_for(paths.root)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _one_error_line(proc: subprocess.CompletedProcess, stage: str) -> str:
    assert proc.returncode not in (0, None), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{stage}: error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'pwned'}",))


def test_malicious_weights_are_refused_in_one_line_without_running_them(project):
    paths, _ = project
    weights = paths.root / "evil.pt"
    weights.write_bytes(pickle.dumps({"state_dict": _Payload()}))
    line = _one_error_line(
        _stage("train", paths, **{"train.arch": "resnet18", "train.pretrained": True, "train.weights": str(weights)}),
        "train",
    )
    assert "not a plain PyTorch weights file" in line
    assert not (paths.root / "pwned").exists()


@contextlib.contextmanager
def _small_filesystem(folder: Path, size: str, read_only: bool = False):
    """A real tmpfs mounted over ``folder`` (needs root; skipped otherwise), its files copied in."""
    kept = {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("needs permission to mount a tmpfs (root)")
    try:
        for name, data in kept.items():
            (folder / name).write_bytes(data)
        if read_only:
            subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.slow  # real processes: run by make test, not make check
@pytest.mark.parametrize("problem", ["disk_full", "read_only"])
def test_an_unwritable_report_folder_fails_in_one_line_and_leaves_the_old_outputs(project, problem):
    paths, params = project
    train.run(params(), paths)
    reports = paths.evaluate_reports
    reports.mkdir(parents=True)
    (reports / "metrics.json").write_text('{"accuracy": "from an earlier run"}\n')
    with _small_filesystem(reports, "32k", read_only=problem == "read_only"):
        line = _one_error_line(_stage("evaluate", paths), "evaluate")
        assert ("No space left on device" if problem == "disk_full" else "Read-only file system") in line
        assert (reports / "metrics.json").read_text() == '{"accuracy": "from an earlier run"}\n'
        # whatever got written is whole: no empty PNG, no temporary file left behind
        assert not [p.name for p in reports.iterdir() if p.stat().st_size == 0 or ".tmp" in p.name]
    if problem == "disk_full":  # the run was reopened before the write failed
        (run,) = _runs(paths)
        assert run.info.status == "FAILED" and run.data.tags["catdog.failed_stage"] == "evaluate"

    rerun = _stage("evaluate", paths)
    assert rerun.returncode == 0, rerun.stderr
    (run,) = _runs(paths)
    assert run.info.status == "FINISHED" and "catdog.failed_stage" not in run.data.tags
    assert "accuracy" in (reports / "metrics.json").read_text()


@pytest.mark.slow  # real processes: run by make test, not make check
def test_an_unreachable_tracking_server_fails_the_stage_in_one_line_within_30_seconds(project):
    paths, _ = project
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import catdog.pipeline.train"], check=True, timeout=300)
    startup = time.monotonic() - started  # imports alone (torch, mlflow): seconds, more on a loaded machine
    started = time.monotonic()
    proc = _stage("train", paths, env={"MLFLOW_TRACKING_URI": uri})
    assert time.monotonic() - started - startup < 30
    line = _one_error_line(proc, "train")
    assert f"MLflow tracking server {uri} is unreachable" in line and "MLFLOW_TRACKING_URI" in line
