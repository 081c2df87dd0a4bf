"""catdog.pipeline.export on the tiny synthetic pipeline (the session ``pipeline`` fixture): the exported
models, their parity with PyTorch, the model card, the MLflow run and the registry."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image

from catdog.core import reports
from catdog.core.paths import Paths
from catdog.data.images import decode_image
from catdog.models.factory import load_checkpoint

from conftest import ROUNDED, build_params, client_for, encode, run_id, seed_store

# --- export ------------------------------------------------------------------------------------


def test_export_writes_models_labels_preprocess_and_card(pipeline):
    out = pipeline.paths.exported
    assert (out / "model.onnx").stat().st_size > 1_000_000
    assert (out / "model.pt2").stat().st_size > 1_000_000
    assert json.loads((out / "labels.json").read_text()) == {"classes": ["cat", "dog"]}
    preprocess = json.loads((out / "preprocess.json").read_text())
    assert preprocess["cache_size"] == 64 and preprocess["image_size"] == 64
    assert preprocess["layout"] == "NCHW" and preprocess["dtype"] == "float32"
    assert preprocess["max_image_bytes"] == pipeline.params.data.max_image_bytes
    metadata = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(metadata["classes"]) == ["cat", "dog"]
    card = (out / "MODEL_CARD.md").read_text()
    details = json.loads(pipeline.paths.evaluate_details.read_text())
    figures = " | ".join(f"{details[f'{kind}_dog']:.4f}" for kind in ("precision", "recall", "f1"))
    assert "Image classifier over 2 classes (`cat`, `dog`)" in card and f"| `dog` | 10 | 5 | 5 | {figures} |" in card
    tags = client_for(pipeline.root).get_run(run_id(pipeline.paths)).data.tags
    assert tags["data.hash"] in card and tags["catdog.checkpoint_md5"] in card
    assert run_id(pipeline.paths) not in card  # a DVC output: nothing that differs per run
    assert f"({pipeline.evaluate['n']} held-out images)" in card


def test_export_parity(pipeline):
    results = pipeline.export
    parity = json.loads(pipeline.paths.parity.read_text())
    parity.pop("variants")  # the int8/bf16 figures: tests/test_variants.py
    assert parity == pytest.approx({k: v for k, v in results.items() if k in parity}, abs=ROUNDED)
    assert "registered_version" not in parity  # registry details live in MLflow
    assert results["parity_images"] == 10  # all test images (fewer than export.parity_images)
    tolerance = pipeline.params.export.tolerance
    assert results["onnx_max_abs_diff"] <= tolerance
    assert results["pt2_max_abs_diff"] <= tolerance
    accuracy = pipeline.evaluate["accuracy"]
    assert results["eager_accuracy"] == results["onnx_accuracy"] == results["pt2_accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_exported_models_have_a_dynamic_batch_and_match_torch(pipeline, batch_size):
    reference, _ = load_checkpoint(pipeline.paths.checkpoint)
    batch = torch.rand(batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(batch_size))
    with torch.inference_mode():
        expected = reference(batch).numpy()
    session = ort.InferenceSession(str(pipeline.paths.exported / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    assert onnx_out.shape == (batch_size, 2)
    np.testing.assert_allclose(onnx_out, expected, atol=1e-3)
    program = torch.export.load(str(pipeline.paths.exported / "model.pt2"))
    with torch.inference_mode():
        pt2_out = program.module()(batch).numpy()
    np.testing.assert_allclose(pt2_out, expected, atol=1e-4)


def test_export_logs_into_the_same_run_and_registers_the_model(pipeline):
    client = client_for(pipeline.root)
    train_id = run_id(pipeline.paths)
    run = client.get_run(train_id)
    assert run.data.metrics["export/onnx_max_abs_diff"] == pytest.approx(pipeline.export["onnx_max_abs_diff"])
    assert run.data.params["export.opset"] == "18"
    exported = {a.path for a in client.list_artifacts(train_id, "export")}
    assert exported == {"export/MODEL_CARD.md"}  # the model files are in the logged classifier, once
    assert len(client.search_runs([run.info.experiment_id])) == 1  # one pipeline run, one MLflow run

    name = pipeline.params.export.registered_model_name
    assert name == "catdog"
    assert pipeline.export["registered_version"] == "1" and pipeline.export["promoted_champion"] is True
    version = client.get_model_version_by_alias(name, "champion")
    assert str(version.version) == "1" and version.run_id == train_id
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "1"
    assert float(version.tags["test_accuracy"]) == pytest.approx(pipeline.evaluate["accuracy"])


# --- any number of classes: a 3-class model, exported end to end ---------------------------------

THREE_CLASSES = ["Golden Retriever", "Maine Coon", "chat tigré"]  # sorted; a space, capitals, non-ASCII
THREE_CLASS_CAP = 30_000  # data.max_image_bytes: a 400x300 noisy JPEG is over it, a 72x60 one far under


def class_jpeg(index: int, seed: int, size: tuple[int, int] = (72, 60)) -> bytes:
    """A seeded noisy JPEG whose colour tells its class (the index into THREE_CLASSES)."""
    colour = np.array([(200, 160, 60), (120, 120, 120), (60, 170, 80)][index], dtype=np.float32)
    noise = np.random.default_rng([index, seed]).normal(0, 20, size=(size[1], size[0], 3))
    return encode(Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)), "JPEG", quality=90)


def export_three_classes(root: Path, template: Path, onnx_cache: Path) -> SimpleNamespace:
    """Prepared data (4 images a class per split) written as prepare writes it, an untrained 3-class
    Lite0 checkpoint with its MLflow run, evaluate's figures as files, then the real export stage."""
    from catdog import tracking
    from catdog.models.factory import create_model, save_checkpoint
    from catdog.pipeline import export

    paths = Paths.under(root)
    seed_store(template, root)
    params = build_params(
        {"data.source": "raw/pets.zip", "data.max_image_bytes": THREE_CLASS_CAP, "tracking.experiment_name": "pets"}
    )
    _write_prepared(paths, size=64)
    model = create_model("efficientnet_lite0", pretrained=True, num_classes=3, image_size=64)
    config = {"arch": "efficientnet_lite0", "image_size": 64, "cache_size": 64, "classes": THREE_CLASSES}
    config["dropout"] = 0.2
    paths.checkpoint.parent.mkdir(parents=True)
    save_checkpoint(paths.checkpoint, model, config)
    # as evaluate writes more than two classes: a per_class table; no recall here: the card shows "-"
    per_class = {name: {"precision": 0.5 + i / 10, "f1": 0.5 + i / 10} for i, name in enumerate(THREE_CLASSES)}
    figures = {"accuracy": 0.5, "per_class": per_class, "n": 12}
    reports.write_json(paths.evaluate_details, figures)
    reports.write_json(paths.evaluate_metrics, {"accuracy": 0.5, "log_loss": 1.0})
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("CATDOG_CACHE", str(onnx_cache))
        patch.chdir(root)
        try:
            with tracking.start_run(params, paths) as run:
                run.record_checkpoint(paths.checkpoint)
            results = export.run(params, paths)
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
    return SimpleNamespace(root=root, paths=paths, params=params, run_id=run.run_id, results=results)


def _write_prepared(paths: Paths, size: int) -> None:
    from catdog.data import integrity
    from catdog.data.layouts import SPLITS

    rows, pixels = [], []
    for split in ("train", "val", "test"):
        for index, name in enumerate(THREE_CLASSES):
            for seed in range(4):
                data = class_jpeg(index, 10 * SPLITS.index(split) + seed)
                pixels.append(decode_image(data, size))
                rows.append([f"{name}/{split}{seed}.jpg", name, split, hashlib.md5(pixels[-1]).hexdigest()])
    paths.prepared.mkdir(parents=True)
    np.save(paths.images, np.stack(pixels))
    with paths.manifest.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([["path", "label", "split", "pixel_md5"], *rows])
    summary_splits = {s: dict.fromkeys(THREE_CLASSES, 4) for s in SPLITS}
    reports.write_json(
        paths.prepare_summary,
        {"images": len(rows), "splits": summary_splits, "rejected_total": 0, "duplicate_groups_merged": 0},
    )
    integrity.record(paths, THREE_CLASSES)


@pytest.fixture(scope="module")
def three(tmp_path_factory, mlflow_template, onnx_cache) -> SimpleNamespace:
    return export_three_classes(tmp_path_factory.mktemp("three"), mlflow_template, onnx_cache)


def test_three_class_export_names_its_classes_in_labels_metadata_and_card(three):
    out = three.paths.exported
    assert json.loads((out / "labels.json").read_text()) == {"classes": THREE_CLASSES}
    metadata = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(metadata["classes"]) == THREE_CLASSES
    assert json.loads((out / "preprocess.json").read_text())["max_image_bytes"] == THREE_CLASS_CAP
    card = (out / "MODEL_CARD.md").read_text()
    assert "Image classifier over 3 classes (`Golden Retriever`, `Maine Coon`, `chat tigré`)" in card
    assert "| `Golden Retriever` | 4 | 4 | 4 | 0.5000 | - | 0.5000 |" in card
    assert "| `chat tigré` | 4 | 4 | 4 | 0.7000 | - | 0.7000 |" in card
    assert not re.search(r"\b(cat|dog)s?\b", card.split("## Known limits")[0], re.IGNORECASE), card


def test_three_class_run_logs_the_classes_and_the_split_sizes_per_class(three):
    run = client_for(three.root).get_run(three.run_id)
    assert json.loads(run.data.params["catdog.classes"]) == THREE_CLASSES
    (dataset_input,) = run.inputs.dataset_inputs
    profile = json.loads(dataset_input.dataset.profile)
    assert profile["images"] == 36 and profile["test"] == 12
    assert profile["per_class"] == {s: dict.fromkeys(THREE_CLASSES, 4) for s in ("train", "val", "test")}


def test_an_exported_model_whose_labels_differ_from_its_own_classes_is_refused(three, tmp_path):
    from catdog.core.errors import CatdogError
    from catdog.serving.predict import ExportedModel

    folder = tmp_path / "export"
    shutil.copytree(three.paths.exported, folder)
    (folder / "labels.json").write_text(json.dumps({"classes": ["cat", "dog", "bird"]}))
    with pytest.raises(CatdogError, match=r"exported for classes \['Golden Retriever'.*lists \['cat', 'dog', 'bird'\]"):
        ExportedModel.load(folder / "model.onnx")
    (folder / "labels.json").write_text(json.dumps({"classes": ["cat", "dog"]}))
    model = onnx.load(str(folder / "model.onnx"))
    del model.metadata_props[:]  # exported before the classes were stamped: the output width still tells
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "variants.json").unlink()  # such an export had no variants (nor their md5s) either
    with pytest.raises(CatdogError, match=r"has 3 outputs, its labels\.json lists 2 classes"):
        ExportedModel.load(folder / "model.onnx")


def test_export_refuses_a_checkpoint_of_other_classes_than_the_prepared_data(three):
    from catdog.core.errors import CatdogError
    from catdog.data import integrity
    from catdog.pipeline import export

    content = json.loads(three.paths.prepared_content.read_text())
    try:
        integrity.record(three.paths, ["cat", "dog", "fox"])
        with pytest.raises(CatdogError, match=r"trained on classes \['Golden Retriever'.*data/prepared has \['cat'"):
            export.run(three.params, three.paths)
    finally:
        three.paths.prepared_content.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
