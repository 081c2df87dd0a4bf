"""Any labelled image set through the real pipeline: three classes in every layout prepare reads.

One throwaway project (tests/dvc_project.py), one real ``dvc repro`` per layout: class folders,
pre-split folders (a zip), ``<class>.<n>`` file names (a zip) and a path,label CSV. Class names
with a space, capitals and a non-ASCII letter travel verbatim through the manifest, the checkpoint,
the metrics, the exported model, the MLflow run, the registered pyfunc, ``mlflow models serve``
and ``catdog predict``.
"""

from __future__ import annotations

import base64
import csv
import json
from dataclasses import dataclass

import mlflow
import onnx
import pandas as pd
import pytest

from dvc_project import TINY_PARAMS, Project, copy_project, serve_model, tool
from image_sets import ImageSet, build_image_set, image_bytes

pytestmark = pytest.mark.slow

CLASSES = ["Golden Retriever", "cat", "Élan"]  # sorted as prepare sorts: output index order
PER_CLASS = 12
PARAMS = {
    "data": {**TINY_PARAMS["data"], "cache_size": 48},
    "train": {**TINY_PARAMS["train"], "image_size": 48, "epochs": 10, "lr": 0.01},
    "evaluate": TINY_PARAMS["evaluate"],
}
LAYOUTS = {  # layout -> written as a zip?
    "class_folders": False,
    "split_folders": True,
    "kaggle_names": True,
    "csv": False,
}


@dataclass
class Repro:
    layout: str
    images: ImageSet
    stdout: str


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return copy_project(tmp_path_factory.mktemp("multiclass") / "project", PARAMS)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def repro(request, project: Project) -> Repro:
    layout = request.param
    images = build_image_set(project.root / "data" / f"own-{layout}", layout, CLASSES, PER_CLASS, LAYOUTS[layout])
    source = images.source.relative_to(project.root)
    project.set_params({"data": {"source": str(source), "labels": images.params["data.labels"]}})
    return Repro(layout, images, project.repro())


def test_prepare_finds_the_layout_and_the_classes(repro: Repro, project: Project):
    summary = project.json("data/prepared/summary.json")
    assert summary["layout"] == repro.layout
    assert summary["classes"] == sorted(CLASSES) == CLASSES
    assert f"layout: {repro.layout}" in repro.stdout  # said in one line
    for split, counts in summary["splits"].items():
        assert set(counts) == set(CLASSES) and all(n > 0 for n in counts.values()), split
    manifest = _manifest(project)
    assert {row["label"] for row in manifest} == set(CLASSES)
    if repro.layout == "split_folders":  # the given split is kept exactly
        assert {row["path"]: row["split"] for row in manifest} == repro.images.splits


def test_every_stage_carries_the_classes(repro: Repro, project: Project):
    metrics = project.json("reports/evaluate/metrics.json")
    assert 0 < len(metrics) <= 15 and not any(name in key for key in metrics for name in CLASSES)
    assert metrics["accuracy"] >= 0.6  # the hues are learnable in a few epochs of the head
    per_class = (project.root / "reports/evaluate/per_class.csv").read_text(encoding="utf-8")
    assert all(name in per_class for name in CLASSES)
    assert project.json("models/export/labels.json")["classes"] == CLASSES
    onnx_model = onnx.load(project.root / "models/export/model.onnx", load_external_data=False)
    assert json.loads({p.key: p.value for p in onnx_model.metadata_props}["classes"]) == CLASSES
    card = (project.root / "models/export/MODEL_CARD.md").read_text(encoding="utf-8")
    assert all(name in card for name in CLASSES)


def test_the_mlflow_run_records_the_classes(repro: Repro, project: Project):
    run = project.runs()[-1]
    recorded = {**run.data.params, **run.data.tags}
    assert json.loads(recorded["catdog.classes"]) == CLASSES


def test_catdog_predict_answers_class_names_and_top_k(repro: Repro, project: Project, tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes(CLASSES.index("Élan"), len(CLASSES), 900))
    out = project.run(tool("catdog"), "predict", str(photo), "--top-k", "2").stdout
    answer = json.loads(out)
    best, second = answer["top_k"]
    assert answer["label"] == best["label"] == "Élan" and best["probability"] >= second["probability"]


def test_a_model_of_other_classes_is_refused_in_one_line(project: Project, repro: Repro):
    if repro.layout != "csv":
        pytest.skip("once, after the last layout")
    project.set_params({"data": {"classes": CLASSES[:2]}})  # the same images, one class fewer
    project.dvc("repro", "prepare")
    proc = project.run("python", "stages/evaluate.py", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # a user error
    assert "classes" in proc.stderr and "dvc repro" in proc.stderr
    project.set_params({"data": {"classes": None}})


def test_the_registered_pyfunc_and_mlflow_models_serve_answer_class_names(project: Project, repro: Repro, tmp_path):
    if repro.layout != "class_folders":
        pytest.skip("once, on the first layout")
    photos = [image_bytes(CLASSES.index(name), len(CLASSES), 901) for name in CLASSES]
    mlflow.set_tracking_uri(project.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/catdog@candidate")
    result = model.predict(pd.DataFrame({"image": [base64.b64encode(p).decode() for p in photos]}))
    assert list(result.columns) == ["label", *(f"p_{name}" for name in CLASSES), "error"]
    assert result.label.tolist() == CLASSES

    rows = [[base64.b64encode(p).decode()] for p in photos] + [["%%%%"]]
    with serve_model("models:/catdog@candidate", project.tracking_uri, tmp_path) as post:
        text = post({"dataframe_split": {"columns": ["image"], "data": rows}})
    predictions = json.loads(text, parse_constant=_refuse)["predictions"]  # strict JSON: no NaN
    assert [p["label"] for p in predictions[:3]] == CLASSES
    assert predictions[3]["label"] is None and predictions[3]["error"].startswith("not_base64")
    assert all(predictions[3][f"p_{name}"] is None for name in CLASSES)


def _refuse(constant: str):
    raise ValueError(f"not JSON: {constant}")


def _manifest(project: Project) -> list[dict[str, str]]:
    with (project.root / "data/prepared/manifest.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
