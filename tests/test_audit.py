"""The label-issue audit (catdog.audit, stage audit): flipped labels of real photos found, a class too
small for the folds, and the files the stage writes. The stage under a real `dvc repro`: tests/test_pipeline.py."""

from __future__ import annotations

import csv
import json
import zipfile

import numpy as np
import pytest

from catdog.audit.label_issues import audit, usable_rows
from catdog.core.paths import Paths
from catdog.pipeline import audit as audit_stage
from catdog.pipeline import prepare

from conftest import REPO_ROOT, build_params

SAMPLE = REPO_ROOT / "data" / "sample" / "dogs-vs-cats-sample.zip"  # 700 real photos, 350 cats, 350 dogs
FLIPPED = 0.04


def flipped_class_folders(folder, seed: int = 0) -> set[str]:
    """The sample's photos as <class>/<name> folders, 4% of them (seeded) in the other class's folder;
    returns the manifest paths of the flipped ones."""
    with zipfile.ZipFile(SAMPLE) as archive:
        names = sorted(name for name in archive.namelist() if name.endswith(".jpg"))
        flip = set(np.random.default_rng(seed).choice(names, round(FLIPPED * len(names)), replace=False))
        moved = set()
        for name in names:
            label = name.split("/")[-1].split(".")[0]
            if name in flip:
                label = "dog" if label == "cat" else "cat"
            target = folder / label / name.split("/")[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
            if name in flip:
                moved.add(f"{label}/{target.name}")
    return moved


def test_the_audit_finds_flipped_labels_of_real_photos(tmp_path):
    """Issue 27's measure: >= 90% of the flipped images flagged, at >= 80% precision."""
    flipped = flipped_class_folders(tmp_path / "photos")
    backbone = {"train.arch": "efficientnet_lite2", "train.image_size": 260, "data.cache_size": 260}  # the default
    params = build_params({"data.source": str(tmp_path / "photos"), **backbone})
    paths = Paths.under(tmp_path / "project")
    prepare.run(params, paths)
    metrics = audit_stage.run(params, paths)

    rows = list(csv.DictReader(paths.label_issues.open()))
    flagged = {row["path"] for row in rows}
    recall, precision = len(flagged & flipped) / len(flipped), len(flagged & flipped) / len(flagged)
    assert recall >= 0.9 and precision >= 0.8, f"recall {recall:.2f}, precision {precision:.2f}: {sorted(flagged)}"
    assert metrics["audited_images"] == 700 and metrics["flagged"] == len(rows)
    assert json.loads(paths.audit_metrics.read_text()) == metrics
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores), "most likely wrong first"
    assert {row["split"] for row in rows} <= {"train", "val", "test"} and len({row["split"] for row in rows}) > 1
    for row in rows:  # given as in the manifest, suggested the other class
        assert row["given"] == row["path"].split("/")[0] and row["suggested"] != row["given"]
    assert paths.label_issues_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    others = list(csv.DictReader(paths.other_issues.open()))
    assert sum(row["issue"] == "near_duplicate" for row in others) == metrics["near_duplicate_images"]
    assert sum(row["issue"] == "outlier" for row in others) == metrics["outliers"]
    assert {row["group"] for row in others if row["issue"] == "near_duplicate"} == {
        str(n) for n in range(1, metrics["near_duplicate_groups"] + 1)
    }


def separable(counts: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features of well separated classes with ``counts`` images each, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    return rng.normal(0, 1, (len(labels), 16)) + 6 * np.eye(16)[labels], labels


def test_a_class_smaller_than_the_folds_lowers_them_and_is_named():
    features, labels = separable([30, 30, 3])
    findings = audit(features, labels, ["cat", "dog", "fox"], 5, 1.0, "prune_by_noise_rate", 0)
    assert findings.folds == 3
    assert findings.notes == ["class 'fox' has 3 images, fewer than 5 folds: using 3 folds"]


def test_a_class_of_one_image_is_left_out_and_named():
    features, labels = separable([30, 1, 30])
    findings = audit(features, labels, ["cat", "dog", "fox"], 5, 1.0, "prune_by_noise_rate", 0)
    assert (
        findings.folds == 5
        and findings.audited == 60
        and findings.notes == ["class 'dog' has 1 image: too few for cross-validation, left out of the audit"]
    )
    assert 30 not in findings.issues and 30 not in findings.outliers  # the dog's row


def test_the_audit_needs_two_classes_it_can_cross_validate():
    from catdog.core.errors import CatdogError

    with pytest.raises(CatdogError, match="two classes"):
        usable_rows(np.array([0, 0, 0, 1]), ["cat", "dog"], 5)


def test_a_near_duplicate_set_and_an_outlier_are_found():
    features, labels = separable([40, 40])
    features[5] = features[6] * 1.001  # a near copy
    features[70] = 40 * np.ones(16)  # far from everything
    findings = audit(features, labels, ["cat", "dog"], 5, 1.0, "prune_by_noise_rate", 0)
    assert [group.tolist() for group in findings.near_duplicate_sets] == [[5, 6]]
    assert 70 in findings.outliers


def test_disabled_the_audit_writes_its_files_empty(tmp_path, dataset):
    params = build_params({"data.source": str(dataset.zip), "audit.enabled": False})
    paths = Paths.under(tmp_path / "project")
    prepare.run(params, paths)
    assert audit_stage.run(params, paths) == {"audited_images": 0}
    assert paths.label_issues.read_text() == "path,split,given,suggested,score\n"
    assert paths.other_issues.read_text() == "issue,group,path,split,label\n"
    assert paths.label_issues_plot.is_file()
