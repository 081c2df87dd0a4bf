"""``train.head: logistic``: standardised L2 logistic regression folded into the Linear head."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from catdog import train
from catdog.linear_probe import fit_logistic_head
from catdog.params import ParamsError

from conftest import prepared_project


def test_folded_head_gives_the_probabilities_of_scaler_plus_regression():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    features = rng.normal(0, 1, (200, 16)) * rng.uniform(0.1, 50, 16) + labels[:, None] * rng.normal(0, 3, 16)
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 2))
    stats = fit_logistic_head(head, torch.tensor(features, dtype=torch.float32), torch.tensor(labels), c=0.05)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000)).fit(features, labels)
    with torch.no_grad():
        ours = torch.softmax(head.eval()(torch.tensor(features, dtype=torch.float32)), 1).numpy()
    assert np.abs(ours - reference.predict_proba(features)).max() < 1e-4
    assert stats.accuracy == pytest.approx(reference.score(features, labels))


def test_logistic_head_trains_in_features_mode_and_needs_one_epoch(tmp_path, mlflow_template, capsys):
    paths, params = prepared_project(
        tmp_path, mlflow_template, **{"data.cache_size": 32, "train.image_size": 32, "train.batch_size": 4}
    )
    with pytest.raises(ParamsError, match=r"train\.head"):
        params(**{"train.head": "logistic", "train.epochs": 2})
    metrics = train.run(params(**{"train.head": "logistic", "train.epochs": 1, "train.logistic_c": 0.1}), paths)
    assert metrics["best_epoch"] == 1
    (row,) = csv.DictReader(paths.train_history.open())
    assert float(row["train_accuracy"]) > 0.9
    assert json.loads((paths.train_reports / "metrics.json").read_text())["val_accuracy"] == metrics["val_accuracy"]
