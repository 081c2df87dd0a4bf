"""catdog.evaluate: classification_metrics against numbers worked out by hand, and the stage's
outputs and MLflow run on the tiny synthetic pipeline (the session ``pipeline`` fixture)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from catdog.data import CachedImages, load_split, make_loader
from catdog.device import resolve_runtime
from catdog.engine import predict_logits, predict_probabilities
from catdog.evaluate import classification_metrics, write_predictions
from catdog.models import load_checkpoint
from catdog.transforms import eval_preset

from conftest import PNG_SIGNATURE, ROUNDED, client_for, read_csv, run_id


def probs(prob_dog: list[float]) -> np.ndarray:
    dog = np.asarray(prob_dog, dtype=np.float64)
    return np.stack([1 - dog, dog], axis=1)


CLASSES = ["cat", "dog"]  # the tiny zip's classes, sorted as prepare sorts them


# 5 cats then 5 dogs.          cats: one false positive (0.8)   dogs: two false negatives (0.4, 0.2)
TARGETS = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
PROB_DOG = [0.1, 0.2, 0.3, 0.4, 0.8, 0.9, 0.7, 0.6, 0.4, 0.2]


def test_metrics_match_hand_computation():
    m = classification_metrics(TARGETS, probs(PROB_DOG), CLASSES)
    # confusion (dog positive): TP 3, FP 1, TN 4, FN 2
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(0.7)  # (3 + 4) / 10
    assert m["precision"] == pytest.approx(0.75)  # 3 / (3 + 1)
    assert m["recall"] == pytest.approx(0.6)  # 3 / (3 + 2)
    assert m["f1"] == pytest.approx(2 / 3)  # 2 * 0.75 * 0.6 / (0.75 + 0.6) = 0.9 / 1.35
    # p(true class): cats .9 .8 .7 .6 .2, dogs .9 .7 .6 .4 .2 -> -mean(ln p) = 6.3040323 / 10
    assert m["log_loss"] == pytest.approx(0.63040323, rel=1e-6)
    # ranked pairs (dog above cat, ties 1/2): 5 + 4 + 4 + 3.5 + 1.5 = 18 of 25
    assert m["roc_auc"] == pytest.approx(0.72)


def test_per_class_and_ranking_metrics_match_hand_computation():
    m = classification_metrics(TARGETS, probs(PROB_DOG), CLASSES)
    # cat as the positive class: TP 4, FP 2 (missed dogs), FN 1
    assert m["precision_cat"] == pytest.approx(4 / 6)
    assert m["recall_cat"] == pytest.approx(0.8)
    assert m["f1_cat"] == pytest.approx(2 * (4 / 6) * 0.8 / (4 / 6 + 0.8))  # 0.7272727
    assert m["precision_dog"] == pytest.approx(0.75) and m["recall_dog"] == pytest.approx(0.6)
    assert m["balanced_accuracy"] == pytest.approx(0.7)  # (0.8 + 0.6) / 2
    # average precision, thresholds .9 .8 .7 .6 .4 .3 .2 .1 -> recall steps of 0.2 at
    # precision 1, 2/3, 3/4, 4/6, 5/9: 0.2 * 131/36
    assert m["pr_auc"] == pytest.approx(131 / 180)


def test_expected_calibration_error_matches_hand_computation():
    m = classification_metrics(TARGETS, probs(PROB_DOG), CLASSES, 10)
    # confidence bins: .9 -> 2 right (|1 - .9| * 2/10 = .02); .8 -> 1 of 3 right (|1/3 - .8| * 3/10 = .14);
    #                  .7 -> 2 right (.06); .6 -> 2 of 3 right (|2/3 - .6| * 3/10 = .02)
    assert m["ece"] == pytest.approx(0.24)


def test_metrics_types_are_json_ready():
    m = classification_metrics(TARGETS, probs(PROB_DOG), CLASSES)
    assert {"accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "n"} <= set(m)
    assert isinstance(m["n"], int)
    assert all(type(v) is float for k, v in m.items() if k != "n")
    json.dumps(m)


def test_dog_is_the_positive_class():
    # flipping which class is wrong moves the error from precision to recall
    all_dogs_found = classification_metrics(np.array([0, 0, 1, 1]), probs([0.1, 0.9, 0.8, 0.7]), CLASSES)
    assert all_dogs_found["recall"] == pytest.approx(1.0)
    assert all_dogs_found["precision"] == pytest.approx(2 / 3)
    one_dog_missed = classification_metrics(np.array([0, 0, 1, 1]), probs([0.1, 0.2, 0.8, 0.3]), CLASSES)
    assert one_dog_missed["recall"] == pytest.approx(0.5)
    assert one_dog_missed["precision"] == pytest.approx(1.0)


def test_perfect_predictions():
    m = classification_metrics(np.array([0, 1, 0, 1]), probs([0.25, 0.75, 0.25, 0.75]), CLASSES)
    assert m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == m["roc_auc"] == pytest.approx(1.0)
    assert m["log_loss"] == pytest.approx(-math.log(0.75))  # 0.2876821


def test_no_predicted_dogs_gives_zero_precision_not_an_error():
    m = classification_metrics(np.array([0, 1, 0, 1]), probs([0.1, 0.2, 0.3, 0.4]), CLASSES)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    # log loss of p(true) .9 .2 .7 .4: (0.1053605 + 1.6094379 + 0.3566749 + 0.9162907) / 4
    assert m["log_loss"] == pytest.approx(0.74694103, rel=1e-6)


def test_single_class_test_set_has_nan_auc_but_other_metrics():
    m = classification_metrics(np.array([0, 0, 0, 0]), probs([0.25, 0.25, 0.75, 0.25]), CLASSES)
    assert math.isnan(m["roc_auc"])
    assert m["accuracy"] == pytest.approx(0.75)
    # p(true) = .75 .75 .25 .75 -> (3 * 0.2876821 + 1.3862944) / 4
    assert m["log_loss"] == pytest.approx(0.56233514, rel=1e-6)


def test_tie_goes_to_cat():
    m = classification_metrics(np.array([1, 0]), probs([0.5, 0.5]), CLASSES)
    assert m["accuracy"] == pytest.approx(0.5)  # argmax of [0.5, 0.5] is class 0 (cat)
    assert m["recall"] == 0.0


def test_write_predictions(tmp_path):
    file = tmp_path / "predictions.csv"
    write_predictions(
        file,
        CLASSES,
        ["train/cat.1.jpg", "train/dog.2.jpg", "train/dog.3.jpg"],
        np.array([0, 1, 1]),
        probs([0.125, 0.875, 0.3]),
    )
    with file.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["path", "actual", "predicted", "confidence", "prob_dog"],
        ["train/cat.1.jpg", "cat", "cat", "0.875", "0.125"],
        ["train/dog.2.jpg", "dog", "dog", "0.875", "0.875"],
        ["train/dog.3.jpg", "dog", "cat", "0.7", "0.3"],
    ]


# --- evaluate ----------------------------------------------------------------------------------


def test_evaluate_writes_metrics_predictions_and_confusion_matrix(pipeline):
    reports = pipeline.paths.evaluate_reports
    metrics = json.loads(reports.joinpath("metrics.json").read_text())
    assert set(metrics) == {"accuracy", "log_loss", "roc_auc", "f1", "ece"}  # the headline DVC metrics
    details = json.loads(pipeline.paths.evaluate_details.read_text())
    assert details == pytest.approx(pipeline.evaluate, abs=ROUNDED)  # every figure, rounded
    assert details["n"] == 10  # round(20 * 0.25) test images per class
    assert reports.joinpath("confusion_matrix.png").read_bytes()[:8] == PNG_SIGNATURE

    rows = read_csv(reports / "predictions.csv")
    manifest = [r for r in read_csv(pipeline.paths.manifest) if r["split"] == "test"]
    assert [r["path"] for r in rows] == [r["path"] for r in manifest]
    assert [r["actual"] for r in rows] == [r["label"] for r in manifest]
    for row in rows:
        assert row["predicted"] in CLASSES
        confidence, prob_dog = float(row["confidence"]), float(row["prob_dog"])
        assert 0.5 <= confidence <= 1
        assert confidence == pytest.approx(max(prob_dog, 1 - prob_dog), abs=2e-6)
        assert row["predicted"] == ("dog" if prob_dog > 0.5 else "cat")
    accuracy = sum(r["actual"] == r["predicted"] for r in rows) / len(rows)
    assert metrics["accuracy"] == pytest.approx(accuracy)


def test_evaluate_logs_into_the_train_run(pipeline):
    client = client_for(pipeline.root)
    train_id = run_id(pipeline.paths)
    run = client.get_run(train_id)
    for key in ("accuracy", "precision", "recall", "f1", "log_loss"):
        assert run.data.metrics[f"test/{key}"] == pytest.approx(pipeline.evaluate[key])
    assert run.data.params["evaluate.batch_size"] == str(pipeline.params.evaluate.batch_size)
    artifacts = {a.path for folder in ("plots", "reports") for a in client.list_artifacts(train_id, folder)}
    assert {"plots/confusion_matrix.png", "reports/predictions.csv"} <= artifacts


def test_evaluate_writes_curves_and_diagnostic_plots(pipeline):
    reports = pipeline.paths.evaluate_reports
    roc = read_csv(reports / "roc.csv")
    assert list(roc[0]) == ["fpr", "tpr"]
    assert (float(roc[0]["fpr"]), float(roc[-1]["fpr"]), float(roc[-1]["tpr"])) == (0.0, 1.0, 1.0)
    assert [float(r["fpr"]) for r in roc] == sorted(float(r["fpr"]) for r in roc)
    pr = read_csv(reports / "pr.csv")
    assert list(pr[0]) == ["recall", "precision"]
    assert all(0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1 for r in pr)
    for name in ("roc_pr_curves.png", "reliability.png", "confidently_wrong.png"):
        assert (reports / name).read_bytes()[:8] == PNG_SIGNATURE, name


def test_test_time_augmentation_averages_with_the_mirrored_images(pipeline):
    paths = pipeline.paths
    model, _ = load_checkpoint(paths.checkpoint)
    runtime = resolve_runtime("fp32")
    loader = make_loader(CachedImages(paths, load_split(paths, "test"), eval_preset(64)), 4, 0)
    plain, targets = predict_probabilities(model, loader, runtime, tta=False, desc="test")
    tta, tta_targets = predict_probabilities(model, loader, runtime, tta=True, desc="test")
    assert torch.equal(targets, tta_targets)
    logits, _ = predict_logits(model, loader, runtime, desc="test")
    assert torch.allclose(plain, torch.softmax(logits, 1), atol=1e-6)
    images = torch.stack([image for image, _ in loader.dataset])
    with torch.inference_mode():
        mirrored = torch.softmax(model(torch.flip(images, dims=[3])), 1)
    assert torch.allclose(tta, (plain + mirrored) / 2, atol=1e-5)
    assert torch.allclose(tta.sum(1), torch.ones(len(tta)), atol=1e-5)
    assert not torch.allclose(tta, plain, atol=1e-6)  # the noisy images are not mirror-symmetric
