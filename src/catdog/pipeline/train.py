"""train: fine-tune a pretrained CNN on prepare's cache, keep the best epoch by ``train.monitor``.

Modes (``train.mode``):
  features  frozen backbone run once over train/val, then only the head trains on the
            cached embeddings: the fast path on a CPU
  head      frozen backbone, full forward every epoch (so augmentation applies)
  top       the backbone's last ``train.unfreeze_blocks`` blocks train with the head
  full      every layer trains
In top/full mode ``train.head_warmup_epochs`` trains the head alone first.

Every epoch ends with a resumable state (catdog.pipeline.train_state): a killed run started again with
the same params and data continues after its last finished epoch, in the same MLflow run, and
ends with the weights an uninterrupted run would have. With ``train.nproc > 1`` the stage
re-launches itself under torchrun (catdog.models.distributed): every process trains a DDP replica on
its share of the batches; rank 0 alone validates, logs and writes.

This module runs the epochs and writes the outputs; catdog.pipeline.train_setup builds what they
need (model parts, loaders, loss), catdog.models.optim the optimizer and learning-rate schedule.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from catdog import tracking
from catdog.core import plots, reports
from catdog.core.errors import CatdogError
from catdog.core.params import Params, TrainParams
from catdog.core.paths import Paths
from catdog.core.seeding import rng_state, seed_everything
from catdog.data import integrity
from catdog.data.dataset import load_split
from catdog.models import distributed
from catdog.models.device import resolve_runtime
from catdog.models.distributed import World
from catdog.models.engine import train_one_epoch, validate
from catdog.models.factory import Classifier, create_model, save_checkpoint
from catdog.models.frozen import split_for_training
from catdog.models.linear_probe import fit_logistic_head
from catdog.pipeline import train_state
from catdog.pipeline.train_setup import Fit, note, resumable_state, set_up, wrap_for_training


def run(params: Params, paths: Paths) -> dict:
    """Train in this process, or in ``train.nproc`` processes under torchrun (this process waits)."""
    tracking.check_server(paths.root)
    integrity.verify(paths)
    if params.train.nproc > 1 and not distributed.under_torchrun():
        distributed.relaunch(params.train.nproc, params, paths.root)
        return json.loads(paths.train_metrics.read_text())
    with distributed.joined() as world:
        return _train(params, paths, world)


def _train(params: Params, paths: Paths, world: World) -> dict:
    p = params.train.resolved()  # head 'auto' made concrete
    started = time.perf_counter()
    generator = seed_everything(p.seed + world.rank)  # ranks draw different augmentations
    runtime = resolve_runtime(p.precision)
    if world.distributed and p.mode == "features":
        raise CatdogError("train.mode 'features' trains in one process: run it without torchrun")
    train_split, val_split = load_split(paths, "train"), load_split(paths, "val")
    model = runtime.prepare_model(
        create_model(p.arch, p.pretrained, len(train_split.classes), p.weights, p.image_size, p.dropout)
    )
    frozen, rest = split_for_training(model, p.arch, p.image_size, p.mode, p.unfreeze_blocks, runtime)
    fingerprint = train_state.fingerprint(params, paths, world.world_size) if world.is_main else None
    state = world.broadcast(resumable_state(paths, fingerprint) if world.is_main else None)

    with _open_run(params, paths, state, world) as mlflow_run:  # None on ranks other than 0
        fit = set_up(model, frozen, rest, paths, (train_split, val_split), p, runtime, world, generator)
        progress = train_state.Progress()
        if state is not None:
            progress = train_state.restore(
                state, fit.trained_part, fit.optimizer, fit.scheduler, fit.scaler, generator, world.rank
            )
            note(world, f"train: resuming after epoch {state['epoch']} of {p.epochs} ({paths.train_state.name})")
        if mlflow_run is not None:
            mlflow_run.set_tags({"catdog.runtime": runtime.describe(), "catdog.processes": str(world.world_size)})
            if fit.class_weights is not None:
                mlflow_run.log_facts({"class_weights": json.dumps(fit.class_weights)})
            if fit.head_facts:
                mlflow_run.log_facts(fit.head_facts)
            steps_done = len(progress.history) * len(fit.train_loader)
            fit.on_step = _step_logger(mlflow_run, state, p, steps_done)
        _fit_epochs(fit, progress, paths, mlflow_run, fingerprint, started)
        return _finish(fit, progress, paths, mlflow_run, started, params.tracking.log_pytorch_model)


def _fit_epochs(
    fit: Fit,
    progress: train_state.Progress,
    paths: Paths,
    mlflow_run: tracking.Run | None,
    fingerprint: str | None,
    started: float,
) -> None:
    """The remaining epochs; after each, the resumable state (rank 0 writes it) and the epoch's metrics."""
    p, world = fit.p, fit.world
    train_model = None
    epochs = tqdm(
        range(len(progress.history) + 1, p.epochs + 1), desc="epochs", unit="epoch", disable=not world.is_main
    )
    for epoch in epochs:
        if _patience_ran_out(p, progress.history, progress.best_row):
            note(world, f"train: early stop: {p.monitor} has not improved for {p.early_stopping_patience} epochs")
            break
        if train_model is None or epoch == p.head_warmup_epochs + 1:  # start, or head warm-up over
            _set_trainable(fit.model, p, epoch)
            train_model = wrap_for_training(fit.loop_model, p, fit.runtime, world)
            if p.head_warmup_epochs and epoch == p.head_warmup_epochs + 1:
                note(world, f"train: head warm-up over: from epoch {epoch} the backbone trains too")
        row = _run_epoch(fit, train_model, epoch)
        progress.history.append(row)
        if progress.best_row is None or _better(row, progress.best_row, p.monitor):
            progress.best_row, progress.best_weights = row, copy.deepcopy(fit.trained_part.state_dict())
        rng = world.gather(rng_state(fit.generator))
        if world.is_main:
            mlflow_run.confirm()  # the state saved next says these steps are logged
            train_state.save_epoch(
                paths.train_state,
                fingerprint,
                mlflow_run.run_id,
                progress,
                fit.trained_part,
                fit.optimizer,
                fit.scheduler,
                fit.scaler,
                rng,
                seconds=progress.seconds + time.perf_counter() - started,
            )
            mlflow_run.progress["catdog.epoch_reached"] = str(epoch)  # tagged if the stage is stopped
            mlflow_run.log_epoch(row)
        epochs.set_postfix(val_acc=f"{row['val_accuracy']:.4f}", val_loss=f"{row['val_loss']:.4f}", refresh=False)


def _run_epoch(fit: Fit, train_model: nn.Module, epoch: int) -> dict:
    """One epoch of training, then validation on rank 0; returns the history row."""
    if fit.sampler is not None:
        fit.sampler.set_epoch(epoch)
    lrs = [] if fit.scheduler is None else fit.scheduler.get_last_lr()  # none: the logistic head's closed form
    if fit.p.head == "logistic":
        trained = fit_logistic_head(
            fit.model.head, *fit.train_loader.dataset.tensors, fit.p.logistic_c, fit.p.class_weights
        )
    else:
        trained = train_one_epoch(
            train_model,
            fit.train_loader,
            fit.optimizer,
            fit.scheduler,
            fit.runtime,
            fit.scaler,
            desc=f"epoch {epoch}",
            criterion=fit.criterion,
            grad_clip_norm=fit.p.grad_clip_norm,
            batch_transform=fit.batch_transform,
            on_step=fit.on_step,
        )
    world = fit.world
    val = world.broadcast(validate(fit.loop_model, fit.val_loader, fit.runtime, desc="val") if world.is_main else None)
    row = {
        "epoch": epoch,
        "train_loss": trained.loss,
        "train_accuracy": trained.accuracy,
        "val_loss": val.loss,
        "val_accuracy": val.accuracy,
    }
    row.update(zip(("lr", "lr_backbone"), lrs, strict=False))
    return row


def _finish(
    fit: Fit,
    progress: train_state.Progress,
    paths: Paths,
    mlflow_run: tracking.Run | None,
    started: float,
    log_pytorch_model: bool,
) -> dict:
    """Keep the best epoch's weights; rank 0 writes the outputs, logs them and marks the state complete."""
    fit.world.check_replicas_agree(fit.trained_part)
    fit.trained_part.load_state_dict(progress.best_weights)
    best = progress.best_row
    # The headline DVC metrics: the same for the same training, on any machine (timings go to MLflow).
    metrics = {"val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"], "best_epoch": best["epoch"]}
    seconds = round(progress.seconds + time.perf_counter() - started, 1)
    if fit.world.is_main:
        _write_outputs(paths, fit.model, fit.p, fit.val_images.split.classes, progress.history, metrics)
        mlflow_run.log_metrics("val", {"best_accuracy": metrics["val_accuracy"], "best_loss": metrics["val_loss"]})
        mlflow_run.log_metrics("train", {"seconds": seconds})
        mlflow_run.log_facts({"best_epoch": metrics["best_epoch"], "epochs_trained": len(progress.history)})
        mlflow_run.log_artifact(paths.train_curves, "plots")
        mlflow_run.log_artifact(paths.train_history, "reports")
        if log_pytorch_model:
            # a batch of 2 keeps the batch dimension dynamic
            example = torch.stack([fit.val_images[i][0] for i in range(2)]).numpy()
            mlflow_run.log_pytorch_model(fit.model, example)
        mlflow_run.record_checkpoint(paths.checkpoint)  # after train's own results
        train_state.mark_complete(paths.train_state)  # last: the outputs are all there
    return metrics


def _step_logger(mlflow_run: tracking.Run, state: dict | None, p: TrainParams, steps_done: int) -> _StepLogger:
    """After a resume, logs the event and what the killed run saved without logging; the killed run
    may also have logged steps after its last saved epoch, which this run repeats and skips."""
    logged_through = 0
    if state is not None:
        mlflow_run.log_facts({"resumed_from_epoch": state["epoch"]})
        logged = mlflow_run.logged_epochs()
        for row in state["history"]:
            if row["epoch"] not in logged:
                mlflow_run.log_epoch(row)
        logged_through = mlflow_run.last_logged_step()
    return _StepLogger(mlflow_run, p.log_every_n_steps, steps_done, logged_through)


def _open_run(params: Params, paths: Paths, state: dict | None, world: World):
    if not world.is_main:
        return contextlib.nullcontext()
    if state is not None:
        return tracking.reopen_train_run(paths, state["run_id"])
    return tracking.start_run(params, paths)


class _StepLogger:
    """``on_step`` of train_one_epoch: the train loss every ``every`` steps, at the global step."""

    def __init__(self, mlflow_run: tracking.Run, every: int, step: int, logged_through: int):
        self.mlflow_run, self.every, self.step, self.logged_through = mlflow_run, every, step, logged_through

    def __call__(self, loss: float) -> None:
        self.step += 1
        if self.step % self.every == 0 and self.step > self.logged_through:
            self.mlflow_run.log_step_loss(loss, self.step)


def _better(row: dict, best: dict, monitor: str) -> bool:
    """Val loss: lower wins; val accuracy: higher wins, ties to the lower loss."""
    if monitor == "val_loss":
        return row["val_loss"] < best["val_loss"]
    return (row["val_accuracy"], -row["val_loss"]) > (best["val_accuracy"], -best["val_loss"])


def _patience_ran_out(p: TrainParams, history: list[dict], best_row: dict | None) -> bool:
    """Checked before each epoch rather than after, so that a resumed run decides the same way."""
    if p.early_stopping_patience is None or best_row is None:
        return False
    return history[-1]["epoch"] - best_row["epoch"] >= p.early_stopping_patience


def _set_trainable(model: Classifier, p: TrainParams, epoch: int) -> None:
    """The head alone in features/head mode and during head warm-up; then the last blocks (top) or all."""
    if p.mode in ("features", "head") or epoch <= p.head_warmup_epochs:
        model.freeze_backbone()
    elif p.mode == "top":
        model.freeze_backbone(except_last=p.unfreeze_blocks)
    else:
        model.unfreeze_backbone()


def _write_outputs(
    paths: Paths, model: Classifier, p: TrainParams, classes: list[str], history: list[dict], metrics: dict
) -> None:
    cache_size = int(np.load(paths.images, mmap_mode="r").shape[1])
    save_checkpoint(
        paths.checkpoint,
        model,
        {
            "arch": p.arch,
            "image_size": p.image_size,
            "cache_size": cache_size,
            "classes": classes,
            "dropout": p.dropout,
        },
    )
    tqdm.write(f"train: wrote {paths.checkpoint.relative_to(paths.root)} (best epoch {metrics['best_epoch']})")
    reports.write_csv(paths.train_history, list(history[0]), [list(row.values()) for row in history])
    plots.training_curves(history, metrics["best_epoch"], paths.train_curves)
    reports.write_json(paths.train_metrics, metrics)  # last: all else is there


if __name__ == "__main__":  # the entry torchrun starts (catdog.models.distributed.relaunch)
    from catdog.pipeline.stage import main

    main("train", run)
