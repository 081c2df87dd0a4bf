"""catdog.pipeline.evaluate: classification_metrics against numbers worked out by hand, and the stage's
outputs and MLflow run on the tiny synthetic pipeline (the session ``pipeline`` fixture)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from catdog.core.paths import Paths
from catdog.data.dataset import CachedImages, load_split, make_loader
from catdog.data.transforms import eval_preset
from catdog.models.device import resolve_runtime
from catdog.models.engine import predict_logits, predict_probabilities
from catdog.models.factory import load_checkpoint
from catdog.pipeline import evaluate, prepare, train
from catdog.pipeline.evaluate import (
    MULTICLASS_HEADLINE,
    classification_metrics,
    headline,
    per_class,
    write_per_class,
    write_predictions,
)

from conftest import (
    PIPELINE_OVERRIDES,
    PNG_SIGNATURE,
    ROUNDED,
    build_params,
    client_for,
    read_csv,
    run_id,
    seed_store,
)


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
    pairs = details.pop("most_confused")  # catdog.explain: the top confused pairs
    assert details == pytest.approx({k: v for k, v in pipeline.evaluate.items() if k != "most_confused"}, abs=ROUNDED)
    assert [(r["true"], r["predicted"], r["count"]) for r in pairs] == [
        (r["true"], r["predicted"], r["count"]) for r in pipeline.evaluate["most_confused"]
    ]
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
    assert {"plots/confidently_wrong.png", "plots/heatmaps.png", "reports/most_confused.csv"} <= artifacts


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


# --- more than two classes -----------------------------------------------------------------------

THREE = ["bird", "cat", "dog"]  # sorted, as prepare records them
# 2 birds, 2 cats, 3 dogs; predicted: bird, cat | cat, cat | dog, bird, dog (two wrong: a bird, a dog)
TARGETS_3 = np.array([0, 0, 1, 1, 2, 2, 2])
PROBS_3 = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.3, 0.6],
        [0.5, 0.1, 0.4],
        [0.1, 0.1, 0.8],
    ]
)
BINARY_KEYS = {
    "accuracy",
    "balanced_accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "pr_auc",
    "log_loss",
    "ece",
    "n",
    *(f"{metric}_{name}" for metric in ("precision", "recall", "f1") for name in CLASSES),
}


def test_three_class_metrics_match_hand_computation():
    m = classification_metrics(TARGETS_3, PROBS_3, THREE, 10)
    assert m["n"] == 7
    assert m["accuracy"] == pytest.approx(5 / 7)
    # bird: TP 1 FP 1 FN 1 -> P 1/2 R 1/2 F1 1/2;  cat: TP 2 FP 1 FN 0 -> P 2/3 R 1 F1 0.8
    # dog: TP 2 FP 0 FN 1 -> P 1 R 2/3 F1 0.8
    assert m["per_class"] == {
        "bird": pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}),
        "cat": pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}),
        "dog": pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}),
    }
    assert m["precision_macro"] == pytest.approx(13 / 18)  # (1/2 + 2/3 + 1) / 3
    assert m["recall_macro"] == m["balanced_accuracy"] == pytest.approx(13 / 18)  # (1/2 + 1 + 2/3) / 3
    assert m["f1_macro"] == pytest.approx(0.7)  # (0.5 + 0.8 + 0.8) / 3
    assert m["precision_weighted"] == pytest.approx(16 / 21)  # (2 * 1/2 + 2 * 2/3 + 3 * 1) / 7
    assert m["recall_weighted"] == pytest.approx(5 / 7)  # = accuracy
    assert m["f1_weighted"] == pytest.approx(5 / 7)  # (2 * 0.5 + 2 * 0.8 + 3 * 0.8) / 7
    # p(true) .7 .3 .8 .5 .6 .4 .8 -> -mean(ln p) = 4.1271984 / 7
    assert m["log_loss"] == pytest.approx(0.58959977, rel=1e-6)
    # top-class confidence bins: .5 (1 of 2 right) 0; .6 (1 of 2) |.5 - .6| * 2/7; .7 (right) .3 * 1/7;
    # .8 (2 right) .2 * 2/7 -> 0.9 / 7
    assert m["ece"] == pytest.approx(0.9 / 7)
    # one-vs-rest ranked pairs: bird 9 of 10 (.3 below the dog's .5), cat 9 of 10 (.5 below the bird's .6), dog 12 of 12
    assert m["roc_auc"] == pytest.approx((0.9 + 0.9 + 1) / 3)
    one_hot = np.eye(3)[TARGETS_3]
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(one_hot, PROBS_3, average="macro"))
    assert "top5_accuracy" not in m  # only past 5 classes
    assert not {"precision", "recall", "f1"} & set(m)  # no positive class among three
    json.dumps(m)


def test_three_class_headline_has_no_class_names():
    m = classification_metrics(TARGETS_3, PROBS_3, THREE)
    assert headline(m, THREE) == {key: m[key] for key in MULTICLASS_HEADLINE}
    assert set(MULTICLASS_HEADLINE) == {"accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss", "ece"}


def test_top5_accuracy_with_seven_classes():
    classes = [f"c{i}" for i in range(7)]
    # the true class ranks 1st, 5th, 6th and 7th of 7: two of four in the top 5
    ranked = np.array([0.30, 0.25, 0.17, 0.12, 0.08, 0.05, 0.03])
    rows = [(0, 0), (1, 4), (2, 5), (3, 6)]  # (true class, its rank)
    targets = np.array([target for target, _ in rows])
    probabilities = np.stack([np.roll(ranked, target - rank) for target, rank in rows])
    assert [list(np.argsort(-p)).index(t) for p, t in zip(probabilities, targets)] == [0, 4, 5, 6]
    m = classification_metrics(targets, probabilities, classes)
    assert m["top5_accuracy"] == pytest.approx(0.5)
    assert m["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(targets, probabilities, k=5, labels=range(7)))
    assert m["accuracy"] == pytest.approx(0.25)
    assert math.isnan(m["roc_auc"])  # three of seven classes are not in this test set: one-vs-rest is undefined
    assert list(headline(m, classes)) == [*MULTICLASS_HEADLINE, "top5_accuracy"]


def test_fifty_classes_keep_the_headline_short_and_free_of_class_names():
    classes = [f"breed_{i:02d}" for i in range(50)]
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(50), 3)
    logits = rng.normal(size=(150, 50))
    logits[np.arange(150), targets] += 2
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(targets, probabilities, classes)
    top = headline(m, classes)
    assert len(top) <= 15
    assert not any(name in key for key in top for name in classes)
    assert top["roc_auc"] == pytest.approx(skm.roc_auc_score(targets, probabilities, multi_class="ovr"))
    assert set(m["per_class"]) == set(classes)
    assert not any(name in key for key in m for name in classes)  # per class only under "per_class"


def test_binary_keys_and_headline_unchanged():
    m = classification_metrics(TARGETS, probs(PROB_DOG), CLASSES)
    assert set(m) == BINARY_KEYS
    assert headline(m, CLASSES) == {key: m[key] for key in ("accuracy", "log_loss", "roc_auc", "f1", "ece")}


def test_per_class_csv(tmp_path):
    file = tmp_path / "per_class.csv"
    write_per_class(file, per_class(TARGETS_3, PROBS_3.argmax(1), THREE))
    assert file.read_text().splitlines() == [
        "class,precision,recall,f1,support",
        "bird,0.5,0.5,0.5,2",
        "cat,0.6667,1.0,0.8,2",
        "dog,1.0,0.6667,0.8,3",
    ]


def test_write_predictions_three_classes_has_every_probability(tmp_path):
    file = tmp_path / "predictions.csv"
    write_predictions(file, THREE, ["a/bird/1.jpg", "a/dog/7.jpg"], TARGETS_3[[0, 5]], PROBS_3[[0, 5]])
    assert read_csv(file) == [
        {
            "path": "a/bird/1.jpg",
            "actual": "bird",
            "predicted": "bird",
            "confidence": "0.7",
            "prob_bird": "0.7",
            "prob_cat": "0.2",
            "prob_dog": "0.1",
        },
        {
            "path": "a/dog/7.jpg",
            "actual": "dog",
            "predicted": "bird",
            "confidence": "0.5",
            "prob_bird": "0.5",
            "prob_cat": "0.1",
            "prob_dog": "0.4",
        },
    ]


# --- the stage on three classes ------------------------------------------------------------------

THREE_COLOURS = {"bird": (40, 170, 60), "cat": (200, 70, 50), "dog": (50, 80, 200)}  # green, red, blue


def prepare_three_classes(root: Path, per_class: int = 8) -> Paths:
    """``root/raw/<class>/<i>.jpg`` (noisy JPEGs of a class colour) through the prepare stage."""
    rng = np.random.default_rng(3)
    for label, colour in THREE_COLOURS.items():
        for index in range(per_class):
            pixels = np.clip(np.asarray(colour) + rng.normal(0, 25, (56, 64, 3)), 0, 255).astype(np.uint8)
            file = root / "raw" / label / f"{index}.jpg"
            file.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(file, "JPEG", quality=90)
    paths = Paths.under(root)
    summary = prepare.run(THREE_CLASS_PARAMS, paths)
    assert summary["layout"] == "class_folders" and not summary["rejected"]
    return paths


THREE_CLASS_PARAMS = build_params(
    {**PIPELINE_OVERRIDES, "data.source": "raw", "data.workers": 1, "train.epochs": 4, "train.lr": 0.05}
)


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory, mlflow_template, onnx_cache):
    """prepare -> train -> evaluate on 8 images of each of three classes."""
    root = tmp_path_factory.mktemp("three-classes")
    seed_store(mlflow_template, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CATDOG_CACHE", str(onnx_cache))
        patch.chdir(root)
        paths = prepare_three_classes(root)
        train.run(THREE_CLASS_PARAMS, paths)
        results = evaluate.run(THREE_CLASS_PARAMS, paths)
    return paths, results


def test_evaluate_three_classes_writes_every_report(three_classes):
    paths, results = three_classes
    reports = paths.evaluate_reports
    assert json.loads(paths.evaluate_metrics.read_text()) == pytest.approx(
        {key: results[key] for key in MULTICLASS_HEADLINE}, abs=ROUNDED
    )
    details = json.loads(paths.evaluate_details.read_text())
    assert details["n"] == results["n"] == 6  # round(8 * 0.25) test images per class
    assert details["f1_weighted"] == pytest.approx(results["f1_weighted"], abs=ROUNDED)

    rows = read_csv(reports / "predictions.csv")
    assert list(rows[0]) == ["path", "actual", "predicted", "confidence", "prob_bird", "prob_cat", "prob_dog"]
    assert sorted(r["actual"] for r in rows) == ["bird", "bird", "cat", "cat", "dog", "dog"]
    for row in rows:
        probabilities = {name: float(row[f"prob_{name}"]) for name in THREE_COLOURS}
        assert row["predicted"] == max(probabilities, key=probabilities.get)
        assert float(row["confidence"]) == pytest.approx(max(probabilities.values()), abs=2 * ROUNDED)
    assert results["accuracy"] == pytest.approx(sum(r["actual"] == r["predicted"] for r in rows) / 6)
    assert results["accuracy"] >= 0.8  # green, red and blue are easy

    table = read_csv(paths.per_class_report)
    assert [r["class"] for r in table] == ["bird", "cat", "dog"]
    assert [int(r["support"]) for r in table] == [2, 2, 2]
    for row in table:
        figures = {k: float(v) for k, v in row.items() if k != "class"}
        assert details["per_class"][row["class"]] == pytest.approx(figures, abs=ROUNDED)

    roc = read_csv(reports / "roc.csv")  # the micro-average: 6 images x 3 one-vs-rest scores
    assert list(roc[0]) == ["fpr", "tpr"]
    assert (float(roc[0]["fpr"]), float(roc[-1]["fpr"]), float(roc[-1]["tpr"])) == (0.0, 1.0, 1.0)
    assert list(read_csv(reports / "pr.csv")[0]) == ["recall", "precision"]
    for name in ("confusion_matrix.png", "roc_pr_curves.png", "reliability.png", "confidently_wrong.png"):
        assert (reports / name).read_bytes()[:8] == PNG_SIGNATURE, name
    # catdog.explain: the heatmaps of right images of every class, the confused pairs as predictions.csv has them
    assert (reports / "heatmaps.png").read_bytes()[:8] == PNG_SIGNATURE and (
        reports / "heatmaps.png"
    ).stat().st_size > 20_000
    confused = read_csv(paths.most_confused)
    wrong = [(r["actual"], r["predicted"]) for r in rows if r["actual"] != r["predicted"]]
    assert sorted((r["true"], r["predicted"], int(r["count"])) for r in confused) == sorted(
        (pair[0], pair[1], wrong.count(pair)) for pair in set(wrong)
    )
    assert [int(r["count"]) for r in confused] == sorted((int(r["count"]) for r in confused), reverse=True)
    assert details["most_confused"] == [
        {**r, "count": int(r["count"]), "share": float(r["share"])} for r in confused[:3]
    ]
    assert len(results["notes"]) == len(confused[:3])  # the summary's lines (catdog.pipeline.stage.summary_line)


def test_evaluate_three_classes_logs_summary_metrics_and_the_table(three_classes):
    paths, results = three_classes
    client = client_for(paths.root)
    train_id = run_id(paths)
    metrics = client.get_run(train_id).data.metrics
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "roc_auc", "pr_auc", "ece"):
        assert metrics[f"test/{key}"] == pytest.approx(results[key])
    assert not [key for key in metrics if any(name in key for name in THREE_COLOURS)]  # per class: the CSV
    artifacts = {a.path for a in client.list_artifacts(train_id, "reports")}
    assert {"reports/per_class.csv", "reports/predictions.csv", "reports/roc.csv"} <= artifacts
    table = client.download_artifacts(train_id, "reports/per_class.csv", str(paths.root / "downloaded"))
    assert Path(table).read_bytes() == paths.per_class_report.read_bytes()
