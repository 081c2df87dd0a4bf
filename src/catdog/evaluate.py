"""evaluate: the best checkpoint on the held-out test split, metrics from scikit-learn.

Writes (``paths.evaluate_reports``): metrics.json (the headline figures, ``HEADLINE``: DVC metrics),
details.json (every figure: per class, balanced accuracy, PR-AUC, ...); predictions.csv (DVC confusion plot);
roc.csv and pr.csv (DVC curve plots); PNGs of the confusion matrix, ROC/PR curves,
reliability diagram and the most confidently wrong test images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from catdog import integrity, plots, reports, tracking
from catdog.data import CachedImages, load_split, make_loader
from catdog.device import resolve_runtime
from catdog.engine import predict_probabilities
from catdog.frozen import inference_module
from catdog.models import load_checkpoint
from catdog.params import Params
from catdog.paths import Paths
from catdog.transforms import eval_preset

HEADLINE = ("accuracy", "log_loss", "roc_auc", "f1", "ece")


def run(params: Params, paths: Paths) -> dict:
    p = params.evaluate
    tracking.check_server(paths.root)
    integrity.verify(paths)
    runtime = resolve_runtime("fp32")  # the deployed model's precision: the champion is chosen on these numbers
    model, config = load_checkpoint(paths.checkpoint)
    integrity.check_classes(config["classes"], paths, str(paths.checkpoint.relative_to(paths.root)))
    model = inference_module(runtime.prepare_model(model), config["arch"], config["image_size"], runtime)
    test = load_split(paths, "test")
    loader = make_loader(CachedImages(paths, test, eval_preset(config["image_size"])), p.batch_size, 0)

    with tracking.stage_run(params, paths, "evaluate") as mlflow_run:
        probabilities, targets = predict_probabilities(model, loader, runtime, tta=p.tta, desc="test")
        probabilities, targets = probabilities.numpy(), targets.numpy()
        results = classification_metrics(targets, probabilities, test.classes, p.calibration_bins)
        write_reports(
            paths,
            test.classes,
            test.paths,
            test.rows,
            targets,
            probabilities,
            results,
            p.calibration_bins,
            p.gallery_size,
        )
        mlflow_run.log_metrics("test", {k: v for k, v in results.items() if k != "n"})
        mlflow_run.log_facts({"test_images": results["n"]})
        for plot in (
            paths.confusion_matrix_plot,
            paths.roc_pr_plot,
            paths.reliability_plot,
            paths.confidently_wrong_plot,
        ):
            mlflow_run.log_artifact(plot, "plots")
        for report in (paths.predictions, paths.roc_points, paths.pr_points):
            mlflow_run.log_artifact(report, "reports")
    return results


def classification_metrics(
    targets: np.ndarray, probabilities: np.ndarray, classes: list[str], calibration_bins: int = 10
) -> dict:
    """'dog' (class 1) is the positive class for precision/recall/F1/ROC/PR; per-class figures too."""
    predicted = probabilities.argmax(1)
    both_classes = len(np.unique(targets)) > 1
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        targets, predicted, labels=range(len(classes)), zero_division=0
    )
    results = {
        "accuracy": skm.accuracy_score(targets, predicted),
        "balanced_accuracy": skm.balanced_accuracy_score(targets, predicted) if both_classes else float("nan"),
        "precision": float(precision[1]),
        "recall": float(recall[1]),
        "f1": float(f1[1]),
    }
    for index, name in enumerate(classes):
        results.update(
            {
                f"precision_{name}": float(precision[index]),
                f"recall_{name}": float(recall[index]),
                f"f1_{name}": float(f1[index]),
            }
        )
    results.update(
        {
            "roc_auc": skm.roc_auc_score(targets, probabilities[:, 1]) if both_classes else float("nan"),
            "pr_auc": skm.average_precision_score(targets, probabilities[:, 1]) if both_classes else float("nan"),
            "log_loss": skm.log_loss(targets, probabilities, labels=list(range(len(classes)))),
            "ece": expected_calibration_error(targets, probabilities, calibration_bins),
            "n": len(targets),
        }
    )
    return {k: float(v) if k != "n" else v for k, v in results.items()}


def expected_calibration_error(targets: np.ndarray, probabilities: np.ndarray, bins: int) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
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
    rows: np.ndarray,
    targets: np.ndarray,
    probabilities: np.ndarray,
    results: dict,
    calibration_bins: int,
    gallery_size: int,
) -> None:
    write_predictions(paths.predictions, classes, files, targets, probabilities)

    matrix = skm.confusion_matrix(targets, probabilities.argmax(1), labels=range(len(classes)))
    plots.confusion_matrix(
        matrix,
        classes,
        paths.confusion_matrix_plot,
        title=f"Test split: accuracy {results['accuracy']:.2%} (n={len(targets)})",
    )
    # prepare puts both classes in every split, so the curves are defined
    fpr, tpr, _ = skm.roc_curve(targets, probabilities[:, 1])
    precision, recall, _ = skm.precision_recall_curve(targets, probabilities[:, 1])
    _write_columns(paths.roc_points, {"fpr": fpr, "tpr": tpr})
    _write_columns(paths.pr_points, {"recall": recall, "precision": precision})
    plots.roc_pr_curves(targets, probabilities[:, 1], paths.roc_pr_plot, positive=classes[1])
    plots.reliability_diagram(
        targets, probabilities[:, 1], paths.reliability_plot, calibration_bins, ece=results["ece"], positive=classes[1]
    )

    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != targets)
    worst = wrong[np.argsort(-probabilities[wrong].max(1), kind="stable")][:gallery_size]
    images = np.load(paths.images, mmap_mode="r")
    plots.gallery(
        [images[rows[i]] for i in worst],
        [
            f"{Path(files[i]).name}\ntrue {classes[targets[i]]}, said {classes[predicted[i]]} "
            f"({probabilities[i].max():.0%})"
            for i in worst
        ],
        paths.confidently_wrong_plot,
        title=f"Most confidently wrong test images ({len(wrong)} wrong of {len(targets)})",
    )
    reports.write_json(paths.evaluate_details, results)
    reports.write_json(paths.evaluate_metrics, {key: results[key] for key in HEADLINE})  # last: all else is there


def write_predictions(
    path: Path, classes: list[str], files: list[str], targets: np.ndarray, probabilities: np.ndarray
) -> None:
    """One row per test image; ``actual``/``predicted`` feed DVC's confusion template."""
    reports.write_csv(
        path,
        ["path", "actual", "predicted", "confidence", f"prob_{classes[1]}"],
        (
            [file, classes[target], classes[probs.argmax()], probs.max(), probs[1]]
            for file, target, probs in zip(files, targets, probabilities)
        ),
    )


def _write_columns(path: Path, columns: dict[str, np.ndarray]) -> None:
    reports.write_csv(path, list(columns), zip(*columns.values()))
