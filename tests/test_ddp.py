"""train.nproc > 1: the real train stage re-launches itself under torchrun, 2 gloo processes on CPU."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from catdog.core.paths import Paths
from catdog.models.factory import load_checkpoint
from catdog.pipeline import prepare

from conftest import REPO_ROOT, build_dataset, build_params, client_for, seed_store
from prepared_classes import write_prepared

EPOCHS = 3


THREE_CLASSES = {"ant": 10, "bee": 10, "cow": 5}


@pytest.fixture(params=["cat-dog", "3-classes-weighted"])
def ddp_project(request, tmp_path, mlflow_template):
    """The sample's two classes through prepare, or three imbalanced ones (balanced class weights)."""
    three = request.param == "3-classes-weighted"
    data = build_dataset(tmp_path / "raw", n_per_class=12)
    seed_store(mlflow_template, tmp_path)
    params = build_params(
        {
            "data.source": str(data.zip),
            "data.cache_size": 32,
            "data.val_fraction": 0.2,
            "data.test_fraction": 0.2,
            "train.mode": "full",
            "train.arch": "simple_cnn",
            "train.pretrained": False,
            "train.image_size": 32,
            "train.epochs": EPOCHS,
            "train.batch_size": 4,
            "train.lr": 0.01,
            "train.augment": True,
            "train.log_every_n_steps": 1,
            "train.nproc": 2,
            "train.class_weights": "balanced" if three else None,
        }
    )
    if three:
        write_prepared(tmp_path, THREE_CLASSES)
    else:
        prepare.run(params, Paths.under(tmp_path))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    return tmp_path


@pytest.mark.slow  # real processes: run by make test, not make check
def test_two_processes_train_one_model_into_one_mlflow_run(ddp_project):
    root = ddp_project
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "stages" / "train.py"),
            "--params",
            str(root / "params.yaml"),
            "--root",
            str(root),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "cpu fp32, 2 process(es)" in output, output  # said by rank 0, about both ranks
    assert output.count("train: wrote models/checkpoint.pt") == 1, output  # rank 0 alone writes

    client = client_for(root)
    (run,) = client.search_runs([client.get_experiment_by_name("catdog").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["catdog.processes"] == "2"
    assert (
        run.data.tags["catdog.checkpoint_md5"]
        == hashlib.md5((root / "models" / "checkpoint.pt").read_bytes()).hexdigest()
    )
    for key in ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "schedule/lr"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(1, EPOCHS + 1)), key
    # step-level loss: rank 0 logs its steps, each once (each rank gets half the batches)
    train_images = sum(
        1 for row in csv.DictReader((root / "data" / "prepared" / "manifest.csv").open()) if row["split"] == "train"
    )
    steps_per_epoch = math.ceil(math.ceil(train_images / 2) / 4)  # DistributedSampler pads to equal halves
    step_losses = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/step_loss"))
    assert step_losses == list(range(1, EPOCHS * steps_per_epoch + 1))
    assert [
        m.name
        for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])
        if m.source_run_id == run.info.run_id
    ] == []  # tracking.log_pytorch_model: false

    history = list(csv.DictReader((root / "reports" / "train" / "history.csv").open()))
    assert [int(row["epoch"]) for row in history] == list(range(1, EPOCHS + 1))
    state = torch.load(root / "models" / "train_state.pt", weights_only=True)
    assert state["complete"] and state["epoch"] == EPOCHS and len(state["rng"]) == 2  # every rank's RNG
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # seeded per rank: own augmentations
    model, config = load_checkpoint(root / "models" / "checkpoint.pt")
    assert config["arch"] == "simple_cnn"
    assert model.head[-1].out_features == len(config["classes"])
    if len(config["classes"]) == 3:  # both ranks weigh the classes alike: the weights of the whole train split
        assert json.loads(run.data.tags["catdog.class_weights"]) == pytest.approx(
            {"ant": 5 / 6, "bee": 5 / 6, "cow": 5 / 3}
        )
    metrics = json.loads((root / "reports" / "train" / "metrics.json").read_text())
    assert 1 <= metrics["best_epoch"] <= EPOCHS
