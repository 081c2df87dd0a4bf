"""Resuming training: the real train stage killed with SIGKILL mid-run and started again.

The resumed run must continue after the last saved epoch, in the same MLflow run, and end with
exactly the weights, history and per-epoch metrics of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from catdog.core.paths import Paths
from catdog.data import integrity
from catdog.pipeline import prepare, train, train_state

from conftest import REPO_ROOT, build_dataset, build_params, client_for, seed_store
from prepared_classes import write_prepared

STAGE = REPO_ROOT / "stages" / "train.py"
EPOCH_KEYS = ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "schedule/lr")

# Tiny: 12 + 12 images at 32 px, 4 epochs; between them every mode, with and without augmentation
# and head warm-up, both schedulers, and DataLoader workers (persistent val workers draw their seed
# from the RNGs at their first use only: a resumed run's first validation once shifted the RNG
# that dropout draws from).
_TINY = {"train.epochs": 4, "train.batch_size": 4}
_LITE_FULL = {**_TINY, "train.mode": "full", "train.lr": 0.01, "train.backbone_lr_factor": 0.1}
RECIPES = {
    "features": {**_TINY, "train.mode": "features", "train.lr": 0.02, "train.workers": 1},
    "head-augment-cosine": {
        **_TINY,
        "train.mode": "head",
        "train.augment": True,
        "train.scheduler": "cosine",
        "train.warmup_epochs": 1,
        "train.workers": 1,
    },
    "top-warmup-cosine": {
        **_TINY,
        "train.mode": "top",
        "train.head_warmup_epochs": 1,
        "train.scheduler": "cosine",
        "train.workers": 1,
    },
    "top-augment-warmup": {
        **_TINY,
        "train.mode": "top",
        "train.unfreeze_blocks": 2,
        "train.augment": True,
        "train.head_warmup_epochs": 2,
        "train.workers": 2,
    },
    "full": {**_LITE_FULL, "train.workers": 2},  # the case of issue 21
    "full-4-classes-weighted-augment-warmup-cosine": {
        **_LITE_FULL,
        "train.class_weights": "balanced",
        "train.augment": True,
        "train.head_warmup_epochs": 1,
        "train.scheduler": "cosine",
        "train.optimizer": "sgd",
        "train.workers": 1,
    },
    "full-scratch-augment": {
        **_TINY,
        "train.mode": "full",
        "train.arch": "simple_cnn",
        "train.pretrained": False,
        "train.lr": 0.01,
        "train.augment": True,
    },
}


FOUR_CLASSES = {"ant": 12, "bee": 10, "cow": 6, "owl": 6}  # 18 train images: no batch of one (BatchNorm)


@pytest.fixture(scope="module")
def prepared_four_classes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared-4")
    write_prepared(root, FOUR_CLASSES)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """data/prepared of 12 + 12 synthetic images at 32 px, made once for the module."""
    root = tmp_path_factory.mktemp("prepared")
    data = build_dataset(root / "raw", n_per_class=12)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        prepare.run(_params({"data.source": str(data.zip)}), Paths.under(root))
    return root


def _params(overrides: dict):
    return build_params(
        {
            "data.cache_size": 32,
            "data.val_fraction": 0.2,
            "data.test_fraction": 0.2,
            "train.image_size": 32,
            "train.log_every_n_steps": 2,
            **overrides,
        }
    )


def _project(prepared: Path, root: Path, mlflow_template: Path, overrides: dict) -> Path:
    """A project root with the prepared data, an empty store and its own params file."""
    shutil.copytree(prepared / "data" / "prepared", root / "data" / "prepared")
    seed_store(mlflow_template, root)
    params = _params({"data.source": str(prepared / "raw" / "train.zip"), **overrides})
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    return root


def _stage(root: Path) -> list[str]:
    return [sys.executable, str(STAGE), "--params", str(root / "params.yaml"), "--root", str(root)]


def _env() -> dict[str, str]:
    # One intra-op thread: a fresh-clone CI run (2 cores, full fine-tuning) once saw the killed run's
    # first epoch differ from the reference's on two threads, before any resume: a multi-threaded sum
    # split differently. This test is about resuming, so the kernels add in one order in both runs.
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
    }  # system metrics even in a short run


def run_stage(root: Path) -> str:
    proc = subprocess.run(_stage(root), cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def run_stage_killed_after_its_first_epoch(root: Path, timeout: float = 180) -> dict:
    """Start the stage and SIGKILL it once its first epoch's state is saved; the state it left.

    The stage runs only in short slices granted here (SIGSTOP/SIGCONT): it is killed while stopped,
    as soon as the state exists, so however late this test is scheduled it cannot train on first.
    """
    state_file, log = Paths.under(root).train_state, root / "killed.log"
    with log.open("w") as output:
        proc = subprocess.Popen(_stage(root), cwd=root, env=_env(), stdout=output, stderr=subprocess.STDOUT)
        stage = psutil.Process(proc.pid)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                stage.suspend()
                if state_file.is_file():
                    proc.send_signal(signal.SIGKILL)
                    break
                stage.resume()
                time.sleep(0.01)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"not killed (exit {proc.returncode}):\n{log.read_text()}"
    return torch.load(state_file, weights_only=True)


def epoch_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow  # kills and reruns the real stage
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_killed_train_resumes_in_the_same_run_and_ends_like_an_uninterrupted_one(
    recipe, prepared, prepared_four_classes, tmp_path, mlflow_template
):
    overrides, epochs = RECIPES[recipe], RECIPES[recipe]["train.epochs"]
    if "4-classes" in recipe:
        prepared = prepared_four_classes
    killed = _project(prepared, tmp_path / "killed", mlflow_template, overrides)
    reference = _project(prepared, tmp_path / "reference", mlflow_template, overrides)

    state = run_stage_killed_after_its_first_epoch(killed)
    assert not state["complete"] and state["epoch"] == 1
    assert [row["epoch"] for row in state["history"]] == [1]
    assert not (killed / "models" / "checkpoint.pt").exists()

    output = run_stage(killed)
    assert f"resuming after epoch 1 of {epochs}" in output, output
    run_stage(reference)

    # the same single MLflow run, every epoch and every logged step exactly once
    client = client_for(killed)
    (run,) = client.search_runs([client.get_experiment_by_name("catdog").experiment_id])
    assert run.info.run_id == state["run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["catdog.resumed_from_epoch"] == "1"
    reference_client = client_for(reference)
    (reference_run,) = reference_client.search_runs([reference_client.get_experiment_by_name("catdog").experiment_id])
    for key in (*EPOCH_KEYS, "train/step_loss"):
        resumed = epoch_history(client, run.info.run_id, key)
        steps = [step for step, _ in resumed]
        assert steps == sorted(set(steps)), f"{key}: a step logged twice: {steps}"
        assert resumed == epoch_history(reference_client, reference_run.info.run_id, key), key
    assert [step for step, _ in epoch_history(client, run.info.run_id, "val/loss")] == list(range(1, epochs + 1))
    assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)

    # the same weights and history as the uninterrupted run
    resumed_weights = torch.load(killed / "models" / "checkpoint.pt", weights_only=True)["state_dict"]
    reference_weights = torch.load(reference / "models" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert resumed_weights.keys() == reference_weights.keys()
    assert all(torch.equal(resumed_weights[k], reference_weights[k]) for k in resumed_weights)
    history = (killed / "reports" / "train" / "history.csv").read_text()
    assert history == (reference / "reports" / "train" / "history.csv").read_text()
    assert len(list(csv.DictReader(history.splitlines()))) == epochs
    final = torch.load(killed / "models" / "train_state.pt", weights_only=True)
    assert final["complete"] and final["epoch"] == epochs
    reference_final = torch.load(reference / "models" / "train_state.pt", weights_only=True)["model"]
    assert all(torch.equal(final["model"][k], reference_final[k]) for k in reference_final)  # the last epoch's


# --- in-process: when a state is resumed and when not --------------------------------------------


@pytest.fixture
def project(prepared, tmp_path, mlflow_template):
    root = tmp_path / "project"
    _project(prepared, root, mlflow_template, {})
    return root


def _train(root: Path, **overrides) -> dict:
    params = _params(
        {
            "data.source": "unused.zip",
            "train.mode": "full",
            "train.arch": "simple_cnn",
            "train.pretrained": False,
            "train.epochs": 2,
            "train.batch_size": 4,
            **overrides,
        }
    )
    return train.run(params, Paths.under(root))


def _runs(root: Path):
    client = client_for(root)
    return client, client.search_runs(
        [client.get_experiment_by_name("catdog").experiment_id], order_by=["attributes.start_time ASC"]
    )


def _mark_incomplete(state_file: Path) -> dict:
    """What a kill after the last epoch's save but before the outputs leaves behind."""
    state = torch.load(state_file, weights_only=True)
    train_state.save(state_file, {**state, "complete": False})
    return state


def test_a_completed_state_is_not_resumed(project):
    _train(project)
    state_file = Paths.under(project).train_state
    assert torch.load(state_file, weights_only=True)["complete"]
    _train(project)
    client, runs = _runs(project)
    assert len(runs) == 2
    assert [step for step, _ in epoch_history(client, runs[1].info.run_id, "val/loss")] == [1, 2]
    assert not list(state_file.parent.glob("*.tmp"))  # atomic saves leave no temp file


def test_an_incomplete_state_at_its_last_epoch_only_writes_the_outputs(project):
    first = _train(project)
    state = _mark_incomplete(Paths.under(project).train_state)
    checkpoint = project / "models" / "checkpoint.pt"
    checkpoint.unlink()
    again = _train(project)
    client, runs = _runs(project)
    assert [r.info.run_id for r in runs] == [state["run_id"]]  # the same run, reopened
    assert [step for step, _ in epoch_history(client, state["run_id"], "val/loss")] == [1, 2]  # nothing retrained
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    assert checkpoint.is_file()


def test_a_state_from_other_params_starts_afresh(project, capsys):
    _train(project)
    _mark_incomplete(Paths.under(project).train_state)
    _train(project, **{"train.lr": 0.002})
    assert "from other params or data: starting afresh" in capsys.readouterr().out
    _, runs = _runs(project)
    assert len(runs) == 2 and runs[1].data.params["train.lr"] == "0.002"
    assert "catdog.resumed_from_epoch" not in runs[1].data.tags


def test_a_state_whose_mlflow_run_was_deleted_starts_afresh(project, capsys):
    _train(project)
    state = _mark_incomplete(Paths.under(project).train_state)
    client_for(project).delete_run(state["run_id"])
    _train(project)
    assert "MLflow run of train_state.pt is gone: starting afresh" in capsys.readouterr().out
    _, runs = _runs(project)
    assert [r.info.run_id for r in runs] != [state["run_id"]] and len(runs) == 1


def test_an_unreadable_state_starts_afresh(project, capsys):
    state_file = Paths.under(project).train_state
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_bytes(b"not a torch file")
    _train(project)
    assert "train_state.pt is unreadable" in capsys.readouterr().out
    assert torch.load(state_file, weights_only=True)["complete"]


def test_fingerprint_follows_train_and_tracking_params_and_the_data(project):
    paths = Paths.under(project)
    params = _params({"data.source": "a.zip"})
    base = train_state.fingerprint(params, paths, world_size=1)
    assert train_state.fingerprint(_params({"data.source": "b.zip"}), paths, 1) == base  # prepare's business
    assert train_state.fingerprint(_params({"data.source": "a.zip", "train.lr": 0.5}), paths, 1) != base
    assert train_state.fingerprint(_params({"data.source": "a.zip", "tracking.experiment_name": "x"}), paths, 1) != base
    assert train_state.fingerprint(params, paths, world_size=2) != base
    paths.manifest.write_text(paths.manifest.read_text().replace(",train,", ",val,", 1))
    integrity.record(paths, ["cat", "dog"])  # what prepare does after writing the manifest
    other_rows = train_state.fingerprint(params, paths, 1)
    assert other_rows != base
    integrity.record(paths, ["cat", "dog", "fox"])
    assert train_state.fingerprint(params, paths, 1) != other_rows
