"""``train.head: logistic``: standardised L2 logistic regression folded into the Linear head."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import recall_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from catdog.core.params import ParamsError
from catdog.models.linear_probe import fit_logistic_head
from catdog.pipeline import train

from conftest import prepared_project


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_folded_head_gives_the_probabilities_of_scaler_plus_regression(classes, class_weight):
    rng = np.random.default_rng(0)
    labels = rng.choice(classes, 200, p=np.arange(1, classes + 1) / sum(range(1, classes + 1)))  # imbalanced
    centres = rng.normal(0, 3, (classes, 16))
    features = rng.normal(0, 1, (200, 16)) * rng.uniform(0.1, 50, 16) + centres[labels]
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, classes))
    stats = fit_logistic_head(
        head, torch.tensor(features, dtype=torch.float32), torch.tensor(labels), c=0.05, class_weight=class_weight
    )
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, class_weight=class_weight, max_iter=2000))
    reference.fit(features, labels)
    with torch.no_grad():
        ours = torch.softmax(head.eval()(torch.tensor(features, dtype=torch.float32)), 1).numpy()
    assert ours.shape == (200, classes)
    assert np.abs(ours - reference.predict_proba(features)).max() < 1e-4
    assert stats.accuracy == pytest.approx(reference.score(features, labels))


def test_balanced_class_weight_gives_the_minority_class_recall():
    """Three overlapping classes, the last one rare: unweighted, the regression gives it up."""
    rng = np.random.default_rng(1)
    counts = [300, 300, 20]
    labels = np.repeat(np.arange(3), counts)
    features = rng.normal(0, 1, (len(labels), 8)) + np.array([[0.0], [1.5], [0.75]])[labels]
    recalls = {}
    for class_weight in (None, "balanced"):
        head = nn.Sequential(nn.Dropout(0.0), nn.Linear(8, 3))
        inputs = torch.tensor(features, dtype=torch.float32)
        fit_logistic_head(head, inputs, torch.tensor(labels), c=1.0, class_weight=class_weight)
        with torch.no_grad():
            predicted = head.eval()(inputs).argmax(1).numpy()
        recalls[class_weight] = recall_score(labels, predicted, average=None)[2]
    assert recalls[None] < 0.2 and recalls["balanced"] > 0.5, recalls


def test_logistic_head_trains_in_features_mode_and_needs_one_epoch(tmp_path, mlflow_template, capsys):
    paths, params = prepared_project(
        tmp_path, mlflow_template, **{"data.cache_size": 32, "train.image_size": 32, "train.batch_size": 4}
    )
    with pytest.raises(ParamsError, match=r"train\.head"):
        params(**{"train.head": "logistic", "train.epochs": 2})
    metrics = train.run(params(**{"train.head": "logistic", "train.epochs": 1, "train.logistic_c": 0.1}), paths)
    assert metrics["best_epoch"] == 1
    (row,) = csv.DictReader(paths.train_history.open())
    assert list(row) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]  # no optimizer: no lr
    assert float(row["train_accuracy"]) > 0.9
    assert json.loads((paths.train_reports / "metrics.json").read_text())["val_accuracy"] == metrics["val_accuracy"]
