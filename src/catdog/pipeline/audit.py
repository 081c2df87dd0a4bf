"""audit: which labels of the prepared data are likely wrong, and which images are near-duplicates or
outliers, from the frozen backbone's features of every image (train, val and test).

Runs after prepare, before train. The backbone is train's (``train.arch``, ``weights``, ``pretrained``,
``image_size``), frozen; the audit itself is ``catdog.audit`` (a cross-validated logistic head, then
cleanlab). catdog changes no label: the user reads the report and decides (``data.exclude``,
``data.relabel``; docs/audit.md). ``audit.enabled: false`` writes the files empty.

Writes ``reports/audit/``: label_issues.csv (one row per flagged image, most likely wrong first: path
as in the manifest, split, given and suggested label, score = the out-of-fold probability of the given
label), label_issues.png (the first ``audit.gallery_size`` of them), other_issues.csv (each near-duplicate
set, numbered, and each outlier: issue, group, path, split, label) and metrics.json (headline counts: DVC
metrics). The audit runs before train opens the pipeline's MLflow run, so evaluate, the first stage
to log into that run, logs these files there (``catdog.pipeline.evaluate``).
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from catdog.audit.label_issues import audit
from catdog.core import plots, reports
from catdog.core.params import Params
from catdog.core.paths import Paths
from catdog.data import integrity
from catdog.data.dataset import Split, load_split
from catdog.data.layouts import SPLITS
from catdog.models.device import resolve_runtime
from catdog.pipeline.features import frozen_features

CSV_COLUMNS = ("path", "split", "given", "suggested", "score")
OTHER_COLUMNS = ("issue", "group", "path", "split", "label")


def run(params: Params, paths: Paths) -> dict:
    integrity.verify(paths)
    a = params.audit
    everything, split_names = all_rows(paths)
    if not a.enabled:
        reports.write_csv(paths.label_issues, CSV_COLUMNS, [])
        reports.write_csv(paths.other_issues, OTHER_COLUMNS, [])
        plots.gallery([], [], paths.label_issues_plot, "", empty="The audit is off (audit.enabled: false)")
        reports.write_json(paths.audit_metrics, {"audited_images": 0})
        return {"audited_images": 0}
    features = _frozen_features(paths, params, everything.rows)
    findings = audit(features, everything.labels, everything.classes, a.folds, a.c, a.filter_by, a.seed)
    for note in findings.notes:
        tqdm.write(f"audit: {note}")
    classes = everything.classes
    rows = [
        (everything.paths[i], split_names[i], classes[everything.labels[i]], classes[suggested], round(float(score), 4))
        for i, suggested, score in zip(findings.issues, findings.suggested, findings.scores)
    ]
    reports.write_csv(paths.label_issues, CSV_COLUMNS, rows)
    _gallery(paths, rows[: a.gallery_size], everything.rows[findings.issues[: a.gallery_size]])
    _write_other_issues(paths, findings, everything, split_names)
    metrics = {
        "audited_images": findings.audited,
        "flagged": len(rows),
        "near_duplicate_groups": len(findings.near_duplicate_sets),
        "near_duplicate_images": sum(len(group) for group in findings.near_duplicate_sets),
        "outliers": len(findings.outliers),
        "folds": findings.folds,
    }
    reports.write_json(paths.audit_metrics, metrics)
    return metrics


def _write_other_issues(paths: Paths, findings, everything: Split, split_names: list[str]) -> None:
    """Each near-duplicate set (numbered from 1) and each outlier, one row per image."""
    issues = [("near_duplicate", n, i) for n, group in enumerate(findings.near_duplicate_sets, start=1) for i in group]
    issues += [("outlier", "", i) for i in findings.outliers]
    rows = (
        [kind, n, everything.paths[i], split_names[i], everything.classes[everything.labels[i]]]
        for kind, n, i in issues
    )
    reports.write_csv(paths.other_issues, OTHER_COLUMNS, rows)


def _frozen_features(paths: Paths, params: Params, rows: np.ndarray) -> np.ndarray:
    """[len(rows), D]: the frozen backbone's features of those prepared rows, through the shared cache
    (catdog.pipeline.features): train's features mode then reads the same entry, never computing them again."""
    p = params.train
    return frozen_features(paths, p.arch, p.image_size, p.pretrained, p.weights, resolve_runtime())[rows]


def all_rows(paths: Paths) -> tuple[Split, list[str]]:
    """Every row of the manifest as one split, in images.npy order, and the split of each row."""
    splits = [load_split(paths, name) for name in SPLITS]
    rows = np.concatenate([split.rows for split in splits])
    order = np.argsort(rows)
    labels = np.concatenate([split.labels for split in splits])[order]
    files = [file for split in splits for file in split.paths]
    names = [split.name for split in splits for _ in split.rows]
    everything = Split("all", rows[order], labels, [files[i] for i in order], splits[0].classes)
    return everything, [names[i] for i in order]


def _gallery(paths: Paths, rows: list[tuple], indices: np.ndarray) -> None:
    images = np.load(paths.images, mmap_mode="r")
    captions = [
        f"{path}\ngiven {given}, suggested {suggested} ({score:.2f})" for path, _, given, suggested, score in rows
    ]
    plots.gallery(
        [np.asarray(images[i]) for i in indices],
        captions,
        paths.label_issues_plot,
        "Most likely mislabelled (out-of-fold probability of the given label)",
        empty="No label issues found",
    )
