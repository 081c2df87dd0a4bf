"""catdog.export on the tiny synthetic pipeline (the session ``pipeline`` fixture): the exported
models, their parity with PyTorch, the model card, the MLflow run and the registry."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from catdog.models import load_checkpoint

from conftest import ROUNDED, client_for, run_id

# --- export ------------------------------------------------------------------------------------


def test_export_writes_models_labels_preprocess_and_card(pipeline):
    out = pipeline.paths.exported
    assert (out / "model.onnx").stat().st_size > 1_000_000
    assert (out / "model.pt2").stat().st_size > 1_000_000
    assert json.loads((out / "labels.json").read_text()) == {"classes": ["cat", "dog"]}
    preprocess = json.loads((out / "preprocess.json").read_text())
    assert preprocess["cache_size"] == 64 and preprocess["image_size"] == 64
    assert preprocess["layout"] == "NCHW" and preprocess["dtype"] == "float32"
    card = (out / "MODEL_CARD.md").read_text()
    tags = client_for(pipeline.root).get_run(run_id(pipeline.paths)).data.tags
    assert tags["data.hash"] in card and tags["catdog.checkpoint_md5"] in card
    assert run_id(pipeline.paths) not in card  # a DVC output: nothing that differs per run
    assert f"({pipeline.evaluate['n']} held-out images)" in card


def test_export_parity(pipeline):
    results = pipeline.export
    parity = json.loads(pipeline.paths.parity.read_text())
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
