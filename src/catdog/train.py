"""train: fine-tune a pretrained CNN on prepare's cache, keep the best epoch by ``train.monitor``.

Modes (``train.mode``):
  features  frozen backbone run once over train/val, then only the head trains on the
            cached embeddings: the fast path on a CPU
  head      frozen backbone, full forward every epoch (so augmentation applies)
  top       the backbone's last ``train.unfreeze_blocks`` blocks train with the head
  full      every layer trains
In top/full mode ``train.head_warmup_epochs`` trains the head alone first.

Every epoch ends with a resumable state (catdog.train_state): a killed run started again with
the same params and data continues after its last finished epoch, in the same MLflow run, and
ends with the weights an uninterrupted run would have. With ``train.nproc > 1`` the stage
re-launches itself under torchrun (catdog.distributed): every process trains a DDP replica on
its share of the batches; rank 0 alone validates, logs and writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset
from tqdm import tqdm

from catdog import CLASSES, distributed, integrity, plots, reports, tracking, train_state
from catdog.data import CachedImages, load_split, make_loader
from catdog.device import Runtime, resolve_runtime
from catdog.distributed import World
from catdog.engine import evaluate, train_one_epoch
from catdog.errors import CatdogError
from catdog.frozen import FrozenPart, cached_activations, split_for_training
from catdog.linear_probe import fit_logistic_head
from catdog.models import Classifier, create_model, save_checkpoint
from catdog.params import Params, TrainParams
from catdog.paths import Paths
from catdog.seeding import restore_rng_state, rng_state, seed_everything
from catdog.transforms import eval_preset, train_transforms


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
    p = params.train
    started = time.perf_counter()
    generator = seed_everything(p.seed + world.rank)  # ranks draw different augmentations
    runtime = resolve_runtime(p.precision)
    if world.distributed and p.mode == "features":
        raise CatdogError("train.mode 'features' trains in one process: run it without torchrun")
    train_split, val_split = load_split(paths, "train"), load_split(paths, "val")
    model = runtime.prepare_model(
        create_model(p.arch, p.pretrained, len(CLASSES), p.weights, p.image_size, p.dropout))
    frozen, rest = split_for_training(model, p.arch, p.image_size, p.mode, p.unfreeze_blocks, runtime)
    # the frozen part runs once over the images (its activations cached) unless augmentation or DDP
    cached = frozen is not None and not p.augment and not world.distributed
    forward = rest if cached or frozen is None else nn.Sequential(frozen, rest)  # what the loops call
    trained = model.head if p.mode in ("features", "head") else model  # what changes: saved each epoch
    fingerprint = train_state.fingerprint(params, paths, world.world_size) if world.is_main else None
    state = world.broadcast(_resumable_state(paths, fingerprint) if world.is_main else None)

    with _open_run(params, paths, state, world) as mlflow_run:  # None on ranks other than 0
        _note(world, f"train: {p.arch}, mode {p.mode}, {runtime.describe()}, {world.world_size} process(es), "
                     f"{len(train_split.rows)} train / {len(val_split.rows)} val images")
        if p.compile and runtime.device.type != "cuda":
            _note(world, "train: compile skipped: torch.compile is used on CUDA only")
        val_images = CachedImages(paths, val_split, eval_preset(p.image_size))
        train_loader, val_loader, sampler, batch_transform = _loaders(
            frozen if cached else None, paths, train_split, val_images, p, runtime, world, generator)
        optimizer = _optimizer(model, p)
        scheduler = _scheduler(optimizer, p, len(train_loader))
        scaler = torch.amp.GradScaler() if runtime.needs_grad_scaler else None
        history, best, seconds_before = [], None, 0.0
        if state is not None:
            history, best, seconds_before = _restore(state, trained, optimizer, scheduler, scaler, generator, world)
            _note(world, f"train: resuming after epoch {state['epoch']} of {p.epochs} ({paths.train_state.name})")
        first_epoch = len(history) + 1
        on_step = None
        if mlflow_run is not None:
            mlflow_run.set_tags({"catdog.runtime": runtime.describe(), "catdog.processes": str(world.world_size)})
            on_step = _step_logger(mlflow_run, state, p, steps_done=(first_epoch - 1) * len(train_loader))
        criterion = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)

        net, saved = None, state
        epochs = tqdm(range(first_epoch, p.epochs + 1), desc="epochs", unit="epoch", disable=not world.is_main)
        for epoch in epochs:
            if _patience_ran_out(p, history, best[0] if best else None):
                _note(world, f"train: early stop: {p.monitor} has not improved for {p.early_stopping_patience} epochs")
                break
            if net is None or epoch == p.head_warmup_epochs + 1:  # start, or head warm-up over
                _set_trainable(model, p, epoch)
                net = _training_module(forward, p, runtime, world)
                if p.head_warmup_epochs and epoch == p.head_warmup_epochs + 1:
                    _note(world, f"train: head warm-up over: from epoch {epoch} the backbone trains too")
            if sampler is not None:
                sampler.set_epoch(epoch)
            lrs = scheduler.get_last_lr()
            if p.head == "logistic":
                fit = fit_logistic_head(model.head, *train_loader.dataset.tensors, p.logistic_c)
            else:
                fit = train_one_epoch(net, train_loader, optimizer, scheduler, runtime, scaler, desc=f"epoch {epoch}",
                                      criterion=criterion, grad_clip_norm=p.grad_clip_norm,
                                      batch_transform=batch_transform, on_step=on_step)
            val = world.broadcast(evaluate(forward, val_loader, runtime, desc="val") if world.is_main else None)
            row = {"epoch": epoch, "train_loss": fit.loss, "train_accuracy": fit.accuracy,
                   "val_loss": val.loss, "val_accuracy": val.accuracy, "lr": lrs[0]}
            if len(lrs) > 1:
                row["lr_backbone"] = lrs[1]
            history.append(row)
            if best is None or _better(row, best[0], p.monitor):
                best = (row, copy.deepcopy(trained.state_dict()))
            rng = world.gather(rng_state(generator))
            if world.is_main:
                saved = {
                    "version": train_state.VERSION, "fingerprint": fingerprint, "complete": False,
                    "epoch": epoch, "run_id": mlflow_run.run_id, "model": trained.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None, "history": history,
                    "best": {"row": best[0], "weights": best[1]}, "rng": rng,
                    "seconds": seconds_before + time.perf_counter() - started,
                }
                train_state.save(paths.train_state, saved)
                mlflow_run.progress["catdog.epoch_reached"] = str(epoch)  # tagged if the stage is stopped
                mlflow_run.log_epoch(row)
            epochs.set_postfix(val_acc=f"{val.accuracy:.4f}", val_loss=f"{val.loss:.4f}", refresh=False)

        world.check_replicas_agree(trained)
        best_row, best_weights = best
        if world.is_main:  # loading the best weights below overwrites the tensors the state refers to
            saved = {**saved, "model": copy.deepcopy(saved["model"])}
        trained.load_state_dict(best_weights)
        # The headline DVC metrics: the same for the same training, on any machine (timings go to MLflow).
        metrics = {key: best_row[key] for key in ("epoch", "val_accuracy", "val_loss")}
        metrics["best_epoch"] = metrics.pop("epoch")
        seconds = round(seconds_before + time.perf_counter() - started, 1)
        if world.is_main:
            _write_outputs(paths, model, p, history, metrics)
            mlflow_run.log_metrics("val", {"best_accuracy": metrics["val_accuracy"], "best_loss": metrics["val_loss"]})
            mlflow_run.log_metrics("train", {"seconds": seconds})
            mlflow_run.log_facts({"best_epoch": metrics["best_epoch"], "epochs_trained": len(history)})
            mlflow_run.log_artifact(paths.train_reports / "curves.png", "plots")
            mlflow_run.log_artifact(paths.train_reports / "history.csv", "reports")
            if params.tracking.log_pytorch_model:
                example = torch.stack([val_images[i][0] for i in range(2)]).numpy()  # batch 2: keeps the batch dim dynamic
                mlflow_run.log_pytorch_model(model, example)
            tracking.record_checkpoint(mlflow_run, paths.checkpoint)  # after train's own results
            train_state.save(paths.train_state, {**saved, "complete": True})  # last: the outputs are all there
    return metrics


def _resumable_state(paths: Paths, fingerprint: str) -> dict | None:
    state = train_state.load_resumable(paths.train_state, fingerprint)
    if state is not None and not tracking.run_exists(paths.root, state["run_id"]):
        tqdm.write(f"train: the MLflow run of {paths.train_state.name} is gone: starting afresh")
        return None
    return state


def _restore(state: dict, trained: nn.Module, optimizer, scheduler, scaler, generator: torch.Generator,
             world: World) -> tuple[list[dict], tuple[dict, dict], float]:
    """Puts the saved epoch back; returns (history, (best row, best weights), seconds spent so far)."""
    trained.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"][world.rank], generator)  # last: setting up drew random numbers
    return state["history"], (state["best"]["row"], state["best"]["weights"]), state["seconds"]


def _step_logger(mlflow_run: tracking.Run, state: dict | None, p: TrainParams, steps_done: int) -> "_StepLogger":
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
        return tracking.resume(paths, state["run_id"])
    return tracking.start_run(params, paths)


def _note(world: World, message: str) -> None:
    if world.is_main:
        tqdm.write(message)


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


def _training_module(module: nn.Module, p: TrainParams, runtime: Runtime, world: World) -> nn.Module:
    """What the training loop calls: DDP over the layers that train now (so rebuilt when head
    warm-up ends), compiled on CUDA."""
    if world.distributed:
        on_cuda = runtime.device.type == "cuda"
        module = DistributedDataParallel(module, device_ids=[world.local_rank] if on_cuda else None)
    if p.compile and runtime.device.type == "cuda":
        module = torch.compile(module)
    return module


def _optimizer(model: Classifier, p: TrainParams) -> torch.optim.Optimizer:
    """The head at ``lr``; in top/full mode also the backbone layers that will train, at
    ``lr * backbone_lr_factor``. Frozen layers get no gradient, so the optimizer leaves them be
    until head warm-up ends."""
    groups = [{"params": list(model.head.parameters()), "lr": p.lr}]
    if p.mode in ("top", "full"):
        blocks = model.last_blocks(p.unfreeze_blocks) if p.mode == "top" else [model.backbone]
        groups.append({"params": [w for block in blocks for w in block.parameters()],
                       "lr": p.lr * p.backbone_lr_factor})
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    return torch.optim.AdamW(groups, lr=p.lr, weight_decay=p.weight_decay)


def _scheduler(optimizer: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int):
    """Stepped every batch: one-cycle, or linear warm-up then cosine decay to 0."""
    total = p.epochs * steps_per_epoch
    if p.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total, pct_start=0.1)
    warmup = p.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loaders(frozen: FrozenPart | None, paths: Paths, train_split, val_images: CachedImages, p: TrainParams,
             runtime: Runtime, world: World, generator: torch.Generator):
    """(train loader, val loader, DDP sampler or None, augmentation to run on the device or None);
    given ``frozen``, the loaders hold its cached activations instead of the images."""
    on_cuda = runtime.device.type == "cuda"
    loader_transform, batch_transform = train_transforms(p.image_size, p.augment, on_device=on_cuda)
    train_images = CachedImages(paths, train_split, loader_transform)
    if frozen is not None:
        return (*_activation_loaders(frozen, train_images, val_images, p, generator), None, None)
    sampler = (DistributedSampler(train_images, world.world_size, world.rank, shuffle=True, seed=p.seed)
               if world.distributed else None)
    # Fresh workers every epoch, seeded from the shuffling generator that the state saves:
    # a resumed run then augments exactly like an uninterrupted one.
    train_loader = make_loader(train_images, p.batch_size, p.workers, shuffle=sampler is None, generator=generator,
                               pin_memory=on_cuda, sampler=sampler, persistent_workers=False)
    val_loader = make_loader(val_images, p.batch_size, p.workers, pin_memory=on_cuda)
    return train_loader, val_loader, sampler, batch_transform


def _activation_loaders(frozen: FrozenPart, train_images, val_images, p: TrainParams, generator: torch.Generator):
    """The frozen part's activations of every train/val image, computed once; then each epoch runs
    only what trains. A resumed run computes them again: the same frozen weights give the same ones."""
    loaders = []
    for name, images in (("train", train_images), ("val", val_images)):
        loader = make_loader(images, p.batch_size, p.workers)
        features, labels = cached_activations(frozen, loader, desc=f"frozen activations ({name})")
        loaders.append(make_loader(TensorDataset(features, labels), p.batch_size, 0,
                                   shuffle=name == "train", generator=generator))
    return loaders


def _write_outputs(paths: Paths, model: Classifier, p: TrainParams, history: list[dict], metrics: dict) -> None:
    cache_size = int(np.load(paths.images, mmap_mode="r").shape[1])
    save_checkpoint(paths.checkpoint, model, {
        "arch": p.arch, "image_size": p.image_size, "cache_size": cache_size,
        "classes": list(CLASSES), "dropout": p.dropout,
    })
    tqdm.write(f"train: wrote {paths.checkpoint.relative_to(paths.root)} (best epoch {metrics['best_epoch']})")
    reports.write_csv(paths.train_reports / "history.csv", list(history[0]), [list(row.values()) for row in history])
    plots.training_curves(history, metrics["best_epoch"], paths.train_reports / "curves.png")
    reports.write_json(paths.train_metrics, metrics)  # last: all else is there


if __name__ == "__main__":  # the entry torchrun starts (catdog.distributed.relaunch)
    from catdog.stage import main

    main("train", run)
