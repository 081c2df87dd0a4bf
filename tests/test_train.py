"""train on a tiny synthetic dataset (the session ``pipeline`` fixture), plus short runs of the
other training modes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from catdog.core.errors import CatdogError
from catdog.data.dataset import CachedImages, load_split, make_loader
from catdog.data.transforms import eval_preset
from catdog.models.device import resolve_runtime
from catdog.models.engine import predict_logits, validate
from catdog.models.factory import create_model, load_checkpoint
from catdog.pipeline import train

from conftest import (
    PIPELINE_OVERRIDES,
    PNG_SIGNATURE,
    ROUNDED,
    build_params,
    client_for,
    prepared_project,
    read_csv,
    run_id,
    seed_store,
)
from prepared_classes import write_prepared

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
    assert metrics == pytest.approx(pipeline.train, abs=ROUNDED)
    assert set(metrics) == {"best_epoch", "val_accuracy", "val_loss"}  # the headline; timings go to MLflow


def test_train_keeps_the_epoch_with_the_lowest_val_loss(pipeline):
    assert pipeline.params.train.monitor == "val_loss"
    history = read_csv(pipeline.paths.train_reports / "history.csv")
    best = min(history, key=lambda row: float(row["val_loss"]))
    metrics = pipeline.train
    assert metrics["best_epoch"] == int(best["epoch"])
    assert metrics["val_loss"] == pytest.approx(float(best["val_loss"]), abs=ROUNDED)
    assert metrics["val_accuracy"] == pytest.approx(float(best["val_accuracy"]), abs=ROUNDED)


def test_the_model_learned_the_colours(pipeline):
    # reddish cats vs bluish dogs: a frozen pretrained backbone + linear head separates them
    assert pipeline.train["val_accuracy"] >= 0.8
    assert pipeline.evaluate["accuracy"] >= 0.8
    assert pipeline.evaluate["roc_auc"] >= 0.9


def test_checkpoint_holds_the_best_epoch_weights(pipeline):
    """Reloaded from disk, the checkpoint reproduces the best epoch's val metrics."""
    paths = pipeline.paths
    model, config = load_checkpoint(paths.checkpoint)
    assert config == {
        "arch": "efficientnet_lite0",
        "image_size": 64,
        "cache_size": 64,
        "classes": ["cat", "dog"],  # the tiny zip's, sorted
        "dropout": pipeline.params.train.dropout,
    }
    val = load_split(paths, "val")
    loader = make_loader(CachedImages(paths, val, eval_preset(64)), 16, 0)
    stats = validate(model, loader, resolve_runtime("fp32"), desc="val")
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
    for column, key in (
        ("train_loss", "train/loss"),
        ("train_accuracy", "train/accuracy"),
        ("val_loss", "val/loss"),
        ("val_accuracy", "val/accuracy"),
        ("lr", "schedule/lr"),
    ):
        points = sorted((m.step, m.value) for m in client.get_metric_history(train_id, key))
        assert [step for step, _ in points] == [1, 2, 3], key
        assert [value for _, value in points] == pytest.approx([float(row[column]) for row in history], abs=ROUNDED)
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
    models = [
        m for m in client.search_logged_models([experiment_id]) if m.source_run_id == train_id and m.name == "model"
    ]
    assert len(models) == 1

    mlflow.set_tracking_uri(f"sqlite:///{pipeline.root}/mlflow.db")
    logged = mlflow.pytorch.load_model(models[0].model_uri, map_location="cpu")  # pt2: no .eval()
    reference, _ = load_checkpoint(pipeline.paths.checkpoint)
    batch = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(logged(batch), reference(batch), atol=1e-5)


def test_train_without_prepare_is_a_catdog_error(make_params, paths):
    with pytest.raises(CatdogError, match=r"not found: run the prepare stage"):
        train.run(make_params({"data.source": "unused.zip"}), paths)
    assert not paths.checkpoint.exists()


# --- other modes -------------------------------------------------------------------------------


@pytest.fixture
def small_project(tmp_path, mlflow_template):
    """10 + 10 images prepared at 32 px in tmp_path, with an MLflow store."""
    return prepared_project(
        tmp_path,
        mlflow_template,
        **{"data.cache_size": 32, "train.image_size": 32, "train.epochs": 1, "train.batch_size": 8},
    )


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
    p = params(
        **{
            "train.mode": "full",
            "train.arch": "simple_cnn",
            "train.pretrained": False,
            "train.monitor": "val_accuracy",
            "train.epochs": 2,
            "train.batch_size": 4,
        }
    )
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


# --- any number of classes ---------------------------------------------------------------------

ANIMALS = ["ant", "bee", "cow", "owl"]
N_CLASS_CASES = {
    # features: at 64 px, where Lite0's frozen features tell the colours apart (at 32 px they do not)
    "features-3": (3, {"train.mode": "features", "train.lr": 0.05, "train.epochs": 3, "train.image_size": 64}),
    "features-logistic-3": (
        3,
        {"train.mode": "features", "train.head": "logistic", "train.epochs": 1, "train.image_size": 64},
    ),
    "head-augment-4": (4, {"train.mode": "head", "train.augment": True}),
    "top-3": (3, {"train.mode": "top", "train.class_weights": "balanced"}),
    "top-augment-warm-up-4": (4, {"train.mode": "top", "train.augment": True, "train.head_warmup_epochs": 1}),
    "full-4": (4, {"train.mode": "full", "train.head_warmup_epochs": 1, "train.scheduler": "cosine"}),
    "full-scratch-3": (3, {"train.mode": "full", "train.arch": "simple_cnn", "train.pretrained": False}),
}


def _n_class_project(root, mlflow_template, counts: dict[str, int], size: int = 32):
    """data/prepared of ``counts`` images per class at ``size`` px and an MLflow store in ``root``."""
    paths = write_prepared(root, counts, size)
    seed_store(mlflow_template, root)

    def params(**overrides):
        return build_params(
            {
                "data.source": "unused.zip",
                "data.cache_size": size,
                "train.image_size": size,
                "train.batch_size": 8,
                "train.lr": 0.01,
                **overrides,
            }
        )

    return paths, params


@pytest.mark.parametrize("case", list(N_CLASS_CASES))
def test_every_mode_trains_n_classes(case, tmp_path, mlflow_template):
    count, overrides = N_CLASS_CASES[case]
    classes = ANIMALS[:count]
    size = overrides.get("train.image_size", 32)
    paths, params = _n_class_project(tmp_path, mlflow_template, dict.fromkeys(classes, 10), size)
    metrics = train.run(params(**overrides), paths)

    model, config = load_checkpoint(paths.checkpoint)
    assert config["classes"] == classes and model.head[-1].out_features == count
    val = load_split(paths, "val")
    assert sorted(set(val.labels.tolist())) == list(range(count))  # every class is validated
    loader = make_loader(CachedImages(paths, val, eval_preset(size)), 16, 0)
    stats = validate(model, loader, resolve_runtime("fp32"), "")
    assert stats.accuracy == pytest.approx(metrics["val_accuracy"], abs=1e-6)  # the N-way argmax of the run
    assert stats.loss == pytest.approx(metrics["val_loss"], rel=1e-3, abs=1e-5)
    if overrides["train.mode"] == "features":  # the colours are learned from frozen features in a few epochs
        assert metrics["val_accuracy"] == 1.0


def test_balanced_class_weights_weight_the_train_loss_only(tmp_path, mlflow_template):
    """Per class of the train split n / (classes x count) (18, 6 and 3 train images: 0.5, 1.5, 3), in the
    gradient head's train loss, logged to the run; the val loss stays plain cross-entropy."""
    paths, params = _n_class_project(tmp_path, mlflow_template, {"ant": 30, "bee": 10, "cow": 5})
    # one step of the whole train split, no dropout: epoch 1's train loss is the initial head's loss
    p = params(**{"train.epochs": 1, "train.batch_size": 64, "train.dropout": 0.0, "train.class_weights": "balanced"})
    torch.manual_seed(p.train.seed)  # train seeds the same way before it builds the model
    initial = create_model("efficientnet_lite0", True, 3, None, 32, 0.0).eval()
    metrics = train.run(p, paths)

    train_split = load_split(paths, "train")
    assert np.bincount(train_split.labels).tolist() == [18, 6, 3]
    weights = torch.tensor([0.5, 1.5, 3.0])
    images = CachedImages(paths, train_split, eval_preset(32))
    with torch.inference_mode():
        logits = initial(torch.stack([images[i][0] for i in range(len(images))]))
    targets = torch.from_numpy(train_split.labels)
    nll = -torch.log_softmax(logits, 1)[torch.arange(len(targets)), targets]
    weighted = ((weights[targets] * nll).sum() / weights[targets].sum()).item()
    (row,) = torch.load(paths.train_state, weights_only=True)["history"]
    assert row["train_loss"] == pytest.approx(weighted, abs=1e-4)
    assert abs(weighted - nll.mean().item()) > 1e-2  # the weights changed the loss

    run = client_for(paths.root).get_run(torch.load(paths.train_state, weights_only=True)["run_id"])
    assert json.loads(run.data.tags["catdog.class_weights"]) == {"ant": 0.5, "bee": 1.5, "cow": 3.0}
    assert run.data.params["train.class_weights"] == "balanced"
    model, _ = load_checkpoint(paths.checkpoint)
    val = load_split(paths, "val")
    loader = make_loader(CachedImages(paths, val, eval_preset(32)), 16, 0)
    val_logits, val_targets = predict_logits(model, loader, resolve_runtime("fp32"), "")
    plain = torch.nn.functional.cross_entropy(val_logits, val_targets).item()
    assert metrics["val_loss"] == pytest.approx(plain, rel=1e-3, abs=1e-5)
    assert abs(torch.nn.functional.cross_entropy(val_logits, val_targets, weight=weights).item() - plain) > 1e-2
