"""train: fine-tune a pretrained CNN on prepare's cache, keep the best epoch by val accuracy.

Modes (``train.mode``):
  features  frozen backbone run once over train/val, then only the head trains on the
            cached embeddings: the fast path on a CPU
  head      frozen backbone, full forward every epoch (so augmentation applies)
  full      every layer trains
"""

from __future__ import annotations

import copy
import csv
import json
import time

import numpy as np
import torch
from torch.utils.data import TensorDataset
from tqdm import tqdm

from catdog import CLASSES, plots, tracking
from catdog.data import CachedImages, load_split, make_loader
from catdog.device import Runtime, resolve_runtime
from catdog.engine import evaluate, extract_features, train_one_epoch
from catdog.models import Classifier, create_model, save_checkpoint
from catdog.params import Params, TrainParams
from catdog.paths import Paths
from catdog.seeding import seed_everything
from catdog.transforms import eval_preset, train_preset


def run(params: Params, paths: Paths) -> dict:
    p = params.train
    started = time.perf_counter()
    generator = seed_everything(p.seed)
    runtime = resolve_runtime(p.precision)
    train_split, val_split = load_split(paths, "train"), load_split(paths, "val")
    model = runtime.prepare_model(
        create_model(p.arch, p.pretrained, len(CLASSES), p.weights, p.image_size, p.dropout))

    with tracking.start_run(params, paths) as mlflow_run:
        tqdm.write(f"train: {p.arch}, mode {p.mode}, {runtime.describe()}, "
                   f"{len(train_split.rows)} train / {len(val_split.rows)} val images")
        pin = runtime.device.type == "cuda"
        train_images = CachedImages(paths, train_split, train_preset(p.image_size, p.augment))
        val_images = CachedImages(paths, val_split, eval_preset(p.image_size))
        if p.mode == "features":
            trainable = model.head
            train_loader, val_loader = _feature_loaders(model, train_images, val_images, p, runtime, generator)
        else:
            if p.mode == "head":
                model.freeze_backbone()
            trainable = model
            train_loader = make_loader(train_images, p.batch_size, p.workers, shuffle=True,
                                       generator=generator, pin_memory=pin)
            val_loader = make_loader(val_images, p.batch_size, p.workers, pin_memory=pin)

        optimizer = torch.optim.AdamW([t for t in trainable.parameters() if t.requires_grad],
                                      lr=p.lr, weight_decay=p.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=p.lr, total_steps=p.epochs * len(train_loader), pct_start=0.1)
        scaler = torch.amp.GradScaler() if runtime.needs_grad_scaler else None

        history, best = [], None
        epochs = tqdm(range(1, p.epochs + 1), desc="epochs", unit="epoch")
        for epoch in epochs:
            lr = scheduler.get_last_lr()[0]
            fit = train_one_epoch(trainable, train_loader, optimizer, scheduler, runtime, scaler,
                                  desc=f"epoch {epoch}")
            val = evaluate(trainable, val_loader, runtime, desc="val")
            row = {"epoch": epoch, "train_loss": fit.loss, "train_accuracy": fit.accuracy,
                   "val_loss": val.loss, "val_accuracy": val.accuracy, "lr": lr}
            history.append(row)
            mlflow_run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            epochs.set_postfix(val_acc=f"{val.accuracy:.4f}", val_loss=f"{val.loss:.4f}", refresh=False)
            if best is None or _better(row, best[0], p.monitor):
                best = (row, copy.deepcopy(model.state_dict()))

        best_row, best_state = best
        model.load_state_dict(best_state)
        metrics = {
            "best_epoch": best_row["epoch"],
            "val_accuracy": best_row["val_accuracy"],
            "val_loss": best_row["val_loss"],
            "train_accuracy": best_row["train_accuracy"],
            "train_loss": best_row["train_loss"],
            "seconds": round(time.perf_counter() - started, 1),
        }
        _write_outputs(paths, model, p, history, metrics)
        mlflow_run.log_metrics({"best_epoch": metrics["best_epoch"], "best_val_accuracy": metrics["val_accuracy"],
                                "train_seconds": metrics["seconds"]})
        mlflow_run.log_artifact(paths.train_reports / "curves.png", "plots")
        mlflow_run.log_artifact(paths.train_reports / "history.csv", "reports")
        example = torch.stack([val_images[i][0] for i in range(2)]).numpy()  # batch 2: keeps the batch dim dynamic
        mlflow_run.log_pytorch_model(model, example)
    return metrics


def _better(row: dict, best: dict, monitor: str) -> bool:
    """Val loss: lower wins; val accuracy: higher wins, ties to the lower loss."""
    if monitor == "val_loss":
        return row["val_loss"] < best["val_loss"]
    return (row["val_accuracy"], -row["val_loss"]) > (best["val_accuracy"], -best["val_loss"])


def _feature_loaders(model: Classifier, train_images, val_images, p: TrainParams, runtime: Runtime,
                     generator: torch.Generator):
    """Embeddings of every train/val image, computed once; the head then trains on them."""
    loaders = []
    for name, images in (("train", train_images), ("val", val_images)):
        loader = make_loader(images, p.batch_size, p.workers)
        features, labels = extract_features(model, loader, runtime, desc=f"features ({name})")
        loaders.append(make_loader(TensorDataset(features, labels), p.batch_size, 0,
                                   shuffle=name == "train", generator=generator))
    return loaders


def _write_outputs(paths: Paths, model: Classifier, p: TrainParams, history: list[dict], metrics: dict) -> None:
    cache_size = int(np.load(paths.images, mmap_mode="r").shape[1])
    save_checkpoint(paths.checkpoint, model, {
        "arch": p.arch, "image_size": p.image_size, "cache_size": cache_size,
        "classes": list(CLASSES), "dropout": p.dropout,
    })
    reports = paths.train_reports
    reports.mkdir(parents=True, exist_ok=True)
    with (reports / "history.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
                         for row in history)
    (reports / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plots.training_curves(history, metrics["best_epoch"], reports / "curves.png")
