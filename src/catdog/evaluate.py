"""evaluate: the best checkpoint on the held-out test split, metrics from scikit-learn."""

from __future__ import annotations

import csv
import json

import numpy as np
import torch
from sklearn import metrics as skm

from catdog import CLASSES, plots, tracking
from catdog.data import CachedImages, load_split, make_loader
from catdog.device import resolve_runtime
from catdog.engine import predict_logits
from catdog.models import load_checkpoint
from catdog.params import Params
from catdog.paths import Paths
from catdog.transforms import eval_preset


def run(params: Params, paths: Paths) -> dict:
    p = params.evaluate
    runtime = resolve_runtime()
    model, config = load_checkpoint(paths.checkpoint)
    model = runtime.prepare_model(model)
    test = load_split(paths, "test")
    loader = make_loader(CachedImages(paths, test, eval_preset(config["image_size"])), p.batch_size, 0)

    with tracking.resume_run(paths.root, paths.train_run, paths.evaluate_reports / "mlflow_run.json",
                             params.flat("evaluate")) as mlflow_run:
        logits, targets = predict_logits(model, loader, runtime, desc="test")
        probabilities = torch.softmax(logits, dim=1).numpy()
        results = classification_metrics(targets.numpy(), probabilities)
        reports = paths.evaluate_reports
        reports.mkdir(parents=True, exist_ok=True)
        write_predictions(reports / "predictions.csv", test.paths, targets.numpy(), probabilities)
        matrix = skm.confusion_matrix(targets.numpy(), probabilities.argmax(1), labels=range(len(CLASSES)))
        plots.confusion_matrix(matrix, CLASSES, reports / "confusion_matrix.png",
                               title=f"Test split: accuracy {results['accuracy']:.2%} (n={len(targets)})")
        (reports / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        mlflow_run.log_metrics({f"test_{k}": v for k, v in results.items()})
        mlflow_run.log_artifact(reports / "confusion_matrix.png", "plots")
        mlflow_run.log_artifact(reports / "predictions.csv", "reports")
    return results


def classification_metrics(targets: np.ndarray, probabilities: np.ndarray) -> dict:
    """Binary metrics with 'dog' (class 1) as the positive class."""
    predicted = probabilities.argmax(1)
    both_classes = len(np.unique(targets)) > 1
    return {
        "accuracy": skm.accuracy_score(targets, predicted),
        "precision": skm.precision_score(targets, predicted, zero_division=0),
        "recall": skm.recall_score(targets, predicted, zero_division=0),
        "f1": skm.f1_score(targets, predicted, zero_division=0),
        "roc_auc": skm.roc_auc_score(targets, probabilities[:, 1]) if both_classes else float("nan"),
        "log_loss": skm.log_loss(targets, probabilities, labels=list(range(len(CLASSES)))),
        "n": int(len(targets)),
    }


def write_predictions(path, files: list[str], targets: np.ndarray, probabilities: np.ndarray) -> None:
    """One row per test image; ``actual``/``predicted`` feed DVC's confusion template."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "actual", "predicted", "confidence", "prob_dog"])
        for file, target, probs in zip(files, targets, probabilities):
            writer.writerow([file, CLASSES[target], CLASSES[probs.argmax()], round(float(probs.max()), 6),
                             round(float(probs[1]), 6)])
