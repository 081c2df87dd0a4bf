"""train, evaluate and export on a tiny synthetic dataset (the session ``pipeline`` fixture),
plus short runs of the other training modes."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import PIPELINE_OVERRIDES, client_for, prepared_project

from catdog import CLASSES, tracking, train
from catdog.data import CachedImages, load_split, make_loader
from catdog.device import resolve_runtime
from catdog.engine import evaluate as evaluate_loop
from catdog.errors import CatdogError
from catdog.models import create_model, load_checkpoint
from catdog.transforms import eval_preset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_csv(path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def run_id(paths) -> str:
    """The pipeline's MLflow run: the most recent one tagged with its checkpoint's md5."""
    client = client_for(paths.root)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`catdog.checkpoint_md5` = '{tracking.file_md5(paths.checkpoint)}'",
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id


# --- train -------------------------------------------------------------------------------------

def test_train_writes_checkpoint_history_metrics_and_curves(pipeline):
    paths, epochs = pipeline.paths, pipeline.params.train.epochs
    assert epochs == 3
    assert paths.checkpoint.is_file()
    assert (paths.train_reports / "curves.png").read_bytes()[:8] == PNG_SIGNATURE

    history = read_csv(paths.train_reports / "history.csv")
    assert list(history[0]) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]
    assert [int(row["epoch"]) for row in history] == [1, 2, 3]
    for row in history:
        assert 0 <= float(row["train_accuracy"]) <= 1 and 0 <= float(row["val_accuracy"]) <= 1
        assert float(row["train_loss"]) >= 0 and float(row["val_loss"]) >= 0
    # OneCycleLR starts at max_lr / 25 (div_factor) and warms up
    assert float(history[0]["lr"]) == pytest.approx(PIPELINE_OVERRIDES["train.lr"] / 25, rel=1e-4)
    assert float(history[1]["lr"]) > float(history[0]["lr"])

    metrics = json.loads(paths.train_metrics.read_text())
    assert metrics == pytest.approx(pipeline.train, abs=1e-6)  # rounded to 6 decimals
    assert set(metrics) == {"best_epoch", "val_accuracy", "val_loss"}  # the headline; timings go to MLflow


def test_train_keeps_the_epoch_with_the_lowest_val_loss(pipeline):
    assert pipeline.params.train.monitor == "val_loss"
    history = read_csv(pipeline.paths.train_reports / "history.csv")
    best = min(history, key=lambda row: float(row["val_loss"]))
    metrics = pipeline.train
    assert metrics["best_epoch"] == int(best["epoch"])
    assert metrics["val_loss"] == pytest.approx(float(best["val_loss"]), abs=1e-6)
    assert metrics["val_accuracy"] == pytest.approx(float(best["val_accuracy"]), abs=1e-6)


def test_the_model_learned_the_colours(pipeline):
    # reddish cats vs bluish dogs: a frozen pretrained backbone + linear head separates them
    assert pipeline.train["val_accuracy"] >= 0.8
    assert pipeline.evaluate["accuracy"] >= 0.8
    assert pipeline.evaluate["roc_auc"] >= 0.9


def test_checkpoint_holds_the_best_epoch_weights(pipeline):
    """Reloaded from disk, the checkpoint reproduces the best epoch's val metrics."""
    paths = pipeline.paths
    model, config = load_checkpoint(paths.checkpoint)
    assert config == {"arch": "efficientnet_lite0", "image_size": 64, "cache_size": 64,
                      "classes": list(CLASSES), "dropout": pipeline.params.train.dropout}
    val = load_split(paths, "val")
    loader = make_loader(CachedImages(paths, val, eval_preset(64)), 16, 0)
    stats = evaluate_loop(model, loader, resolve_runtime("fp32"), desc="val")
    assert stats.accuracy == pytest.approx(pipeline.train["val_accuracy"], abs=1e-6)
    assert stats.loss == pytest.approx(pipeline.train["val_loss"], rel=1e-3, abs=1e-5)


def test_features_mode_leaves_the_pretrained_backbone_untouched(pipeline):
    model, _ = load_checkpoint(pipeline.paths.checkpoint)
    pretrained = create_model("efficientnet_lite0", pretrained=True, image_size=64)
    ours, reference = model.backbone.state_dict(), pretrained.backbone.state_dict()
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)  # BN running stats included
    assert not torch.equal(model.head[-1].weight, pretrained.head[-1].weight)


def test_train_mlflow_run_has_params_epoch_history_and_model(pipeline):
    client = client_for(pipeline.root)
    train_id = run_id(pipeline.paths)
    run = client.get_run(train_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["train.lr"] == str(PIPELINE_OVERRIDES["train.lr"])
    assert run.data.params["train.mode"] == "features"
    assert run.data.tags["data.hash"]
    history = read_csv(pipeline.paths.train_reports / "history.csv")
    for column, key in (("train_loss", "train/loss"), ("train_accuracy", "train/accuracy"), ("val_loss", "val/loss"),
                        ("val_accuracy", "val/accuracy"), ("lr", "schedule/lr")):
        points = sorted((m.step, m.value) for m in client.get_metric_history(train_id, key))
        assert [step for step, _ in points] == [1, 2, 3], key
        assert [value for _, value in points] == pytest.approx([float(row[column]) for row in history], abs=1e-6)
    assert run.data.tags["catdog.best_epoch"] == str(pipeline.train["best_epoch"])
    assert run.data.tags["catdog.epochs_trained"] == "3"
    assert run.data.metrics["val/best_accuracy"] == pytest.approx(pipeline.train["val_accuracy"])
    assert "train/seconds" in run.data.metrics

    artifacts = {a.path for folder in ("plots", "reports") for a in client.list_artifacts(train_id, folder)}
    assert {"plots/curves.png", "reports/history.csv"} <= artifacts


def test_logged_model_loads_and_matches_the_checkpoint(pipeline):
    import mlflow.pytorch

    client = client_for(pipeline.root)
    train_id = run_id(pipeline.paths)
    experiment_id = client.get_run(train_id).info.experiment_id
    models = [m for m in client.search_logged_models([experiment_id])
              if m.source_run_id == train_id and m.name == "model"]
    assert len(models) == 1

    mlflow.set_tracking_uri(f"sqlite:///{pipeline.root}/mlflow.db")
    logged = mlflow.pytorch.load_model(models[0].model_uri, map_location="cpu")  # pt2: no .eval()
    reference, _ = load_checkpoint(pipeline.paths.checkpoint)
    batch = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(logged(batch), reference(batch), atol=1e-5)


def test_train_without_prepare_is_a_catdog_error(make_params, paths):
    with pytest.raises(CatdogError, match=r"manifest\.csv not found: run the prepare stage first"):
        train.run(make_params({"data.source": "unused.zip"}), paths)
    assert not paths.checkpoint.exists()


# --- evaluate ----------------------------------------------------------------------------------

def test_evaluate_writes_metrics_predictions_and_confusion_matrix(pipeline):
    reports = pipeline.paths.evaluate_reports
    metrics = json.loads(reports.joinpath("metrics.json").read_text())
    assert set(metrics) == {"accuracy", "log_loss", "roc_auc", "f1", "ece"}  # the headline DVC metrics
    details = json.loads(pipeline.paths.evaluate_details.read_text())
    assert details == pytest.approx(pipeline.evaluate, abs=1e-6)  # every figure, rounded to 6 decimals
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
    from catdog.engine import predict_logits, predict_probabilities

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
    assert parity == pytest.approx({k: v for k, v in results.items() if k in parity}, abs=1e-6)
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


def test_mlflow_metrics_are_grouped_by_section_and_facts_are_tags(pipeline):
    """The run page charts metrics by the prefix before "/"; counts, versions, flags are no metrics."""
    run = client_for(pipeline.root).get_run(run_id(pipeline.paths))
    metrics = set(run.data.metrics)
    assert not [key for key in metrics if "/" not in key], sorted(metrics)
    assert {key.split("/")[0] for key in metrics} <= {"train", "val", "test", "export", "schedule", "system"}
    assert {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "schedule/lr",
            "test/accuracy", "test/log_loss", "test/roc_auc", "test/f1", "test/ece", "test/precision_cat",
            "test/recall_dog", "export/onnx_max_abs_diff", "export/pt2_max_abs_diff"} <= metrics, sorted(metrics)
    assert not metrics & {"test/n", "export/parity_images", "export/registered_version"}
    tags = run.data.tags
    assert tags["catdog.test_images"] == str(len(read_csv(pipeline.paths.evaluate_reports / "predictions.csv")))
    assert tags["catdog.parity_images"] == "10" and tags["catdog.epochs_trained"] == "3"
    assert (tags["catdog.registered_version"], tags["catdog.promoted_champion"]) == ("1", "True")


# --- other modes -------------------------------------------------------------------------------

@pytest.fixture
def small_project(tmp_path, mlflow_template):
    """10 + 10 images prepared at 32 px in tmp_path, with an MLflow store."""
    return prepared_project(tmp_path, mlflow_template, **{
        "data.cache_size": 32, "train.image_size": 32, "train.epochs": 1, "train.batch_size": 8})


def test_head_mode_with_augment_trains_the_head_only(small_project):
    paths, params = small_project
    metrics = train.run(params(**{"train.mode": "head", "train.augment": True, "train.lr": 0.01}), paths)
    assert metrics["best_epoch"] == 1
    assert len(read_csv(paths.train_reports / "history.csv")) == 1
    assert 0 <= metrics["val_accuracy"] <= 1 and math.isfinite(metrics["val_loss"])
    model, config = load_checkpoint(paths.checkpoint)
    assert config["image_size"] == 32 and config["cache_size"] == 32
    # frozen backbone: weights and BatchNorm statistics are still the pretrained ones
    pretrained = create_model("efficientnet_lite0", pretrained=True, image_size=32).backbone.state_dict()
    assert all(torch.equal(value, pretrained[key]) for key, value in model.backbone.state_dict().items())
    run = client_for(paths.root).get_run(run_id(paths))
    assert run.data.params["train.mode"] == "head" and run.data.params["train.augment"] == "True"


def test_full_mode_trains_every_layer_reproducibly(small_project):
    paths, params = small_project
    p = params(**{"train.mode": "full", "train.arch": "simple_cnn", "train.pretrained": False,
                  "train.monitor": "val_accuracy", "train.epochs": 2, "train.batch_size": 4})
    torch.manual_seed(p.train.seed)  # train seeds the same way before it builds the model
    initial = create_model("simple_cnn", pretrained=False, image_size=32).backbone.state_dict()

    first = train.run(p, paths)
    history = read_csv(paths.train_reports / "history.csv")
    assert len(history) == 2
    best = max(history, key=lambda r: (float(r["val_accuracy"]), -float(r["val_loss"])))
    assert first["best_epoch"] == int(best["epoch"])  # monitor val_accuracy, ties to the lower loss
    model, config = load_checkpoint(paths.checkpoint)
    assert config["arch"] == "simple_cnn"
    trained = model.backbone.state_dict()
    conv = next(k for k in trained if k.endswith("weight") and trained[k].dim() == 4)
    assert trained[conv].shape == initial[conv].shape
    assert not torch.equal(trained[conv], initial[conv])  # the backbone moved
    assert sum(not torch.equal(trained[k], initial[k]) for k in trained) > len(trained) // 2

    # same params, same data: the same epochs, metrics and weights
    history_bytes = (paths.train_reports / "history.csv").read_bytes()
    second = train.run(p, paths)
    assert (paths.train_reports / "history.csv").read_bytes() == history_bytes
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in second.items() if k != "seconds"}
    again = torch.load(paths.checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
