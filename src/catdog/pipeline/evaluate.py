"""evaluate: the best checkpoint on the held-out test split, metrics from scikit-learn, for any number of classes.

Writes (``paths.evaluate_reports``): metrics.json (the headline figures: DVC metrics, at most 7 for any N, no class
name in a key), details.json (every figure), per_class.csv (precision, recall, F1 and support of every class: a DVC
plot and an MLflow artifact), predictions.csv (DVC confusion plot), roc.csv and pr.csv (DVC curve plots), PNGs of the
confusion matrix (counts and row-normalised), ROC/PR curves, reliability diagram, the most confidently wrong images
beside their class activation maps for the class said and the true class, heatmaps.png (confidently right images of
each class with their maps: ``catdog.explain.evaluation``) and most_confused.csv (every confused pair, largest first;
its top ``CONFUSED_IN_SUMMARY`` in details.json, and in the summary for more than two classes).

Two classes (dogs vs cats) keep the keys of the first runs, so old and new runs compare in DVC and MLflow: the
second class (``classes[1]``) is the positive one of ``precision``, ``recall``, ``f1``, ``roc_auc``, ``pr_auc``;
details hold ``precision_<class>``, ``recall_<class>``, ``f1_<class>``; the headline is ``HEADLINE``; roc.csv and
pr.csv are the positive class's curves; the reliability diagram shows P(positive).

More classes: ``precision_macro``/``recall_macro``/``f1_macro`` and the ``_weighted`` ones, ``roc_auc`` (one-vs-rest,
macro average), ``pr_auc`` (one-vs-rest average precision, macro), ``top5_accuracy`` when there are more than 5
classes; the per-class figures sit in details.json under ``per_class`` (and in per_class.csv), not among the metrics
(MLflow gets the CSV, not a metric per class). The headline is ``MULTICLASS_HEADLINE`` (+ ``top5_accuracy``); roc.csv
and pr.csv hold the micro-average curve (every class's one-vs-rest scores pooled), with the binary columns, so
dvc.yaml's plots draw one curve for any N; the PNG draws every class's curve. The reliability diagram and ECE use
the top-class confidence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm
from torch.utils.data import TensorDataset

from catdog import tracking
from catdog.core import plots, reports
from catdog.core.params import EvaluateParams, Params
from catdog.core.paths import Paths
from catdog.data import integrity
from catdog.data.dataset import CachedImages, Split, load_split, make_loader
from catdog.data.transforms import eval_preset
from catdog.explain import evaluation
from catdog.models.device import Runtime, resolve_runtime
from catdog.models.engine import predict_probabilities
from catdog.models.factory import load_checkpoint
from catdog.models.frozen import inference_module, split_for_training
from catdog.pipeline.features import cached_features_of

HEADLINE = ("accuracy", "log_loss", "roc_auc", "f1", "ece")  # two classes
MULTICLASS_HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss", "ece")
TOP_K = 5  # top-k accuracy once there are more than k classes
TOP_K_KEY = f"top{TOP_K}_accuracy"
PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")
CONFUSED_IN_SUMMARY = 3


def run(params: Params, paths: Paths) -> dict:
    p = params.evaluate
    tracking.check_server(paths.root)
    integrity.verify(paths)
    runtime = resolve_runtime("fp32")  # the deployed model's precision: the champion is chosen on these numbers
    model, config = load_checkpoint(paths.checkpoint)
    integrity.check_classes(config["classes"], paths, str(paths.checkpoint.relative_to(paths.root)))
    classifier = runtime.prepare_model(model)  # eager: the heatmaps' gradients flow through it
    test = load_split(paths, "test")

    with tracking.stage_run(params, paths, "evaluate") as mlflow_run:
        probabilities, targets = test_probabilities(classifier, config, paths, test, p, runtime)
        probabilities, targets = probabilities.numpy(), targets.numpy()
        results = classification_metrics(targets, probabilities, test.classes, p.calibration_bins)
        matrix = skm.confusion_matrix(targets, probabilities.argmax(1), labels=range(len(test.classes)))
        confused = evaluation.most_confused(matrix, test.classes)
        results["most_confused"] = confused[:CONFUSED_IN_SUMMARY]
        reports.write_csv(paths.most_confused, evaluation.MOST_CONFUSED_COLUMNS, (r.values() for r in confused))
        evaluation.heatmap_galleries(
            classifier,
            config["arch"],
            CachedImages(paths, test, eval_preset(config["image_size"])),
            targets,
            probabilities,
            p.cam_method,
            p.gallery_size,
            (paths.confidently_wrong_plot, paths.heatmaps_plot),
        )
        write_reports(paths, test.classes, test.paths, targets, probabilities, matrix, results, p.calibration_bins)
        # per class: the CSV (a class name is no metric key once there are more than two)
        mlflow_run.log_metrics("test", {k: v for k, v in results.items() if isinstance(v, float)})
        mlflow_run.log_facts({"test_images": results["n"]})
        for plot in (
            paths.confusion_matrix_plot,
            paths.roc_pr_plot,
            paths.reliability_plot,
            paths.confidently_wrong_plot,
            paths.heatmaps_plot,
        ):
            mlflow_run.log_artifact(plot, "plots")
        for report in (
            paths.predictions,
            paths.per_class_report,
            paths.roc_points,
            paths.pr_points,
            paths.most_confused,
        ):
            mlflow_run.log_artifact(report, "reports")
        log_audit(mlflow_run, paths)
    if len(test.classes) > 2:  # two classes: the confusion matrix says it all
        results["notes"] = [
            f"confused {r['true']} -> {r['predicted']}: {r['count']} ({r['share']:.0%} of {r['true']})"
            for r in confused[:CONFUSED_IN_SUMMARY]
        ]
    return results


def log_audit(mlflow_run: tracking.Run, paths: Paths) -> None:
    """The audit stage's counts (``audit/<name>``) and files, into the pipeline's run: the audit runs
    before train opens that run, and evaluate is the first stage to log into it. Under DVC the files are
    evaluate's deps (a changed audit reruns evaluate, in a new run with all results); a pipeline run from
    Python without the audit logs none."""
    if not paths.audit_metrics.is_file():
        return
    mlflow_run.log_metrics("audit", json.loads(paths.audit_metrics.read_text()))
    for report in (paths.label_issues, paths.label_issues_plot, paths.other_issues):
        mlflow_run.log_artifact(report, "audit")


def test_probabilities(model, config: dict, paths: Paths, test: Split, p: EvaluateParams, runtime: Runtime):
    """(probabilities, targets) of the test split. When the checkpoint's backbone is the one whose
    features are cached (features/head mode: the pretrained backbone, unchanged), only the head runs
    on them; else (or with TTA, which needs mirrored images) the whole model runs on the images."""
    size = config["image_size"]
    if not p.tta:
        frozen, head = split_for_training(model, config["arch"], size, "features", 0, runtime)
        features = cached_features_of(frozen, paths)
        if features is not None:
            cached = TensorDataset(torch.from_numpy(features[test.rows]), torch.from_numpy(test.labels))
            return predict_probabilities(head, make_loader(cached, p.batch_size, 0), runtime, False, "test (features)")
    model = inference_module(model, config["arch"], size, runtime)
    loader = make_loader(CachedImages(paths, test, eval_preset(size)), p.batch_size, 0)
    return predict_probabilities(model, loader, runtime, tta=p.tta, desc="test")


def classification_metrics(
    targets: np.ndarray, probabilities: np.ndarray, classes: list[str], calibration_bins: int = 10
) -> dict:
    """Every test figure (see the module docstring for the keys of two and of more classes)."""
    predicted = probabilities.argmax(1)
    table = per_class(targets, predicted, classes)
    results = {
        "accuracy": skm.accuracy_score(targets, predicted),
        "balanced_accuracy": (
            skm.balanced_accuracy_score(targets, predicted) if len(np.unique(targets)) > 1 else float("nan")
        ),
        **(_binary_scores if len(classes) == 2 else _multiclass_scores)(targets, probabilities, table),
        "log_loss": skm.log_loss(targets, probabilities, labels=list(range(len(classes)))),
        "ece": expected_calibration_error(targets, probabilities, calibration_bins),
    }
    return {**{k: v if k == "per_class" else float(v) for k, v in results.items()}, "n": len(targets)}


def per_class(targets: np.ndarray, predicted: np.ndarray, classes: list[str]) -> list[dict]:
    """One row (``PER_CLASS_COLUMNS``) per class, in model output order."""
    columns = skm.precision_recall_fscore_support(targets, predicted, labels=range(len(classes)), zero_division=0)
    return [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
        for name, p, r, f, n in zip(classes, *columns)
    ]


def _binary_scores(targets: np.ndarray, probabilities: np.ndarray, table: list[dict]) -> dict:
    """The second class is the positive one; per-class figures as flat keys (the first runs' keys)."""
    both_classes = len(np.unique(targets)) > 1
    positive = table[1]
    return {
        **{metric: positive[metric] for metric in ("precision", "recall", "f1")},
        **{f"{metric}_{row['class']}": row[metric] for row in table for metric in ("precision", "recall", "f1")},
        "roc_auc": skm.roc_auc_score(targets, probabilities[:, 1]) if both_classes else float("nan"),
        "pr_auc": skm.average_precision_score(targets, probabilities[:, 1]) if both_classes else float("nan"),
    }


def _multiclass_scores(targets: np.ndarray, probabilities: np.ndarray, table: list[dict]) -> dict:
    """Macro and weighted averages, one-vs-rest macro ROC-AUC and average precision, top-k accuracy."""
    labels = list(range(len(table)))
    predicted = probabilities.argmax(1)
    every_class = len(np.unique(targets)) == len(labels)  # else a one-vs-rest curve is undefined
    scores = {}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = skm.precision_recall_fscore_support(
            targets, predicted, labels=labels, average=average, zero_division=0
        )
        scores.update({f"precision_{average}": precision, f"recall_{average}": recall, f"f1_{average}": f1})
    if len(labels) > TOP_K:
        scores[TOP_K_KEY] = skm.top_k_accuracy_score(targets, probabilities, k=TOP_K, labels=labels)
    if every_class:
        scores["roc_auc"] = skm.roc_auc_score(targets, probabilities, multi_class="ovr", average="macro")
        scores["pr_auc"] = skm.average_precision_score(_one_hot(targets, len(labels)), probabilities, average="macro")
    else:
        scores["roc_auc"] = scores["pr_auc"] = float("nan")
    return {**scores, "per_class": {row["class"]: {k: v for k, v in row.items() if k != "class"} for row in table}}


def headline(results: dict, classes: list[str]) -> dict:
    """The DVC metrics: ``HEADLINE`` for two classes, ``MULTICLASS_HEADLINE`` (+ top-k) for more."""
    keys = HEADLINE if len(classes) == 2 else MULTICLASS_HEADLINE + ((TOP_K_KEY,) if TOP_K_KEY in results else ())
    return {key: results[key] for key in keys}


def expected_calibration_error(targets: np.ndarray, probabilities: np.ndarray, bins: int) -> float:
    """Mean |accuracy - confidence| over equal-width bins of the top-class confidence, weighted by bin size."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == targets
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(
        sum(
            abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
            for b in np.unique(which)
        )
    )


def write_reports(
    paths: Paths,
    classes: list[str],
    files: list[str],
    targets: np.ndarray,
    probabilities: np.ndarray,
    matrix: np.ndarray,
    results: dict,
    calibration_bins: int,
) -> None:
    predicted = probabilities.argmax(1)
    write_predictions(paths.predictions, classes, files, targets, probabilities)
    write_per_class(paths.per_class_report, per_class(targets, predicted, classes))
    plots.confusion_matrix(
        matrix,
        classes,
        paths.confusion_matrix_plot,
        title=f"Test split: accuracy {results['accuracy']:.2%} (n={len(targets)})",
    )
    write_curves(paths, classes, targets, probabilities, results)
    if len(classes) == 2:
        outcomes, scores, name, axes = targets, probabilities[:, 1], f"P({classes[1]})", None
    else:
        outcomes, scores, name = predicted == targets, probabilities.max(1), "top-class confidence"
        axes = ("Top-class confidence (mean per bin)", "Fraction correct")
    plots.reliability_diagram(
        outcomes, scores, paths.reliability_plot, calibration_bins, ece=results["ece"], name=name, axis_labels=axes
    )
    reports.write_json(paths.evaluate_details, results)
    reports.write_json(paths.evaluate_metrics, headline(results, classes))  # last: all else is there


def write_curves(paths: Paths, classes: list[str], targets: np.ndarray, probabilities: np.ndarray, results: dict):
    """roc.csv/pr.csv: the positive class's curves (two classes) or the micro-average (more); the PNG: every
    class one-vs-rest. prepare puts every class in every split, so the curves are defined."""
    binary = len(classes) == 2
    one_hot = _one_hot(targets, len(classes))
    curves = [(classes[i], one_hot[:, i], probabilities[:, i]) for i in ([1] if binary else range(len(classes)))]
    pooled = curves[0][1:] if binary else (one_hot.ravel(), probabilities.ravel())
    fpr, tpr, _ = skm.roc_curve(*pooled)
    precision, recall, _ = skm.precision_recall_curve(*pooled)
    _write_columns(paths.roc_points, {"fpr": fpr, "tpr": tpr})
    _write_columns(paths.pr_points, {"recall": recall, "precision": precision})
    if binary:
        titles, micro = ("ROC curve (test split)", "Precision-recall curve (test split)"), None
    else:
        titles = (
            f"One-vs-rest ROC (test split, macro AUC {results['roc_auc']:.3f})",
            f"One-vs-rest precision-recall (macro AP {results['pr_auc']:.3f})",
        )
        micro = ("micro-average", *pooled)
    plots.roc_pr_curves(curves, paths.roc_pr_plot, titles, pooled=micro)


def write_predictions(
    path: Path, classes: list[str], files: list[str], targets: np.ndarray, probabilities: np.ndarray
) -> None:
    """One row per test image; ``actual``/``predicted`` feed DVC's confusion template. ``prob_<class>``: the
    positive class's probability for two classes, every class's for more."""
    shown = [1] if len(classes) == 2 else list(range(len(classes)))
    reports.write_csv(
        path,
        ["path", "actual", "predicted", "confidence", *(f"prob_{classes[i]}" for i in shown)],
        (
            [file, classes[target], classes[probs.argmax()], probs.max(), *probs[shown]]
            for file, target, probs in zip(files, targets, probabilities)
        ),
    )


def write_per_class(path: Path, table: list[dict]) -> None:
    reports.write_csv(path, PER_CLASS_COLUMNS, ([row[c] for c in PER_CLASS_COLUMNS] for row in table))


def _one_hot(targets: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=int)[targets]


def _write_columns(path: Path, columns: dict[str, np.ndarray]) -> None:
    reports.write_csv(path, list(columns), zip(*columns.values()))
