"""The set-up of a fit in one process: everything the train stage's epochs need, built once.

Owns ``Fit`` (the model and the part the loops call, the loaders, the optimizer, schedule, grad scaler,
loss) and how it is built from ``params.train``: the class weights, the train/val loaders (of the images,
or of the frozen part's cached activations), the DDP / torch.compile wrapping of what trains, and the
resumable state that a killed run left.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from catdog import tracking
from catdog.core.params import TrainParams
from catdog.core.paths import Paths
from catdog.data.dataset import CachedImages, Split, make_loader
from catdog.data.transforms import eval_preset, train_transforms
from catdog.models.device import Runtime
from catdog.models.distributed import World
from catdog.models.factory import Classifier
from catdog.models.frozen import FrozenPart, cached_activations
from catdog.models.linear_probe import choose_c
from catdog.models.optim import create_optimizer, create_scheduler
from catdog.pipeline import train_state
from catdog.pipeline.features import features_of


@dataclass
class Fit:
    """What the epochs need, built once per process."""

    p: TrainParams
    runtime: Runtime
    world: World
    generator: torch.Generator  # shuffling and DataLoader seeds: saved with the state
    model: Classifier  # the whole classifier: written to the checkpoint
    loop_model: nn.Module  # what the loops call: the part after the cached frozen activations, or the model
    trained_part: nn.Module  # the weights that change, saved every epoch: the head ('features'/'head'), else the model
    val_images: CachedImages
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: DistributedSampler | None
    batch_transform: Callable | None  # augmentation on the device (CUDA), else None
    optimizer: torch.optim.Optimizer | None  # None for the logistic head: fitted in closed form
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    class_weights: dict[str, float] | None  # train.class_weights 'balanced': the weight of each class
    head_facts: dict[str, object]  # train.logistic_c auto: the C chosen on val, for MLflow
    on_step: Callable[[float], None] | None = None  # rank 0: step-level train loss to MLflow


def set_up(
    model: Classifier,
    frozen: FrozenPart | None,
    rest: nn.Module,
    paths: Paths,
    splits: tuple[Split, Split],
    p: TrainParams,
    runtime: Runtime,
    world: World,
    generator: torch.Generator,
) -> Fit:
    """``frozen`` (the part that never trains, None in full mode) and ``rest`` split the model."""
    train_split, val_split = splits
    note(
        world,
        f"train: {p.arch}, mode {p.mode}, head {p.head}, {runtime.describe()}, {world.world_size} process(es), "
        f"{len(train_split.rows)} train / {len(val_split.rows)} val images",
    )
    if p.compile and runtime.device.type != "cuda":
        note(world, "train: compile skipped: torch.compile is used on CUDA only")
    val_images = CachedImages(paths, val_split, eval_preset(p.image_size))
    # the frozen part runs once over the images (its activations cached) unless augmentation or DDP
    cached = frozen is not None and not p.augment and not world.distributed
    train_loader, val_loader, sampler, batch_transform = _loaders(
        frozen if cached else None, paths, train_split, val_images, p, runtime, world, generator
    )
    p, head_facts = _choose_logistic_c(p, train_loader, val_loader, world)
    # the logistic head steps no optimizer; creating one would import torch._dynamo (0.7 s) for nothing
    optimizer = None if p.head == "logistic" else create_optimizer(model, p)
    class_weights = _class_weights(p, train_split, world)
    weight = None if class_weights is None else torch.tensor(list(class_weights.values()), device=runtime.device)
    return Fit(
        p,
        runtime,
        world,
        generator,
        model,
        loop_model=rest if cached or frozen is None else nn.Sequential(frozen, rest),
        trained_part=model.head if p.mode in ("features", "head") else model,
        val_images=val_images,
        train_loader=train_loader,
        val_loader=val_loader,
        sampler=sampler,
        batch_transform=batch_transform,
        optimizer=optimizer,
        scheduler=None if optimizer is None else create_scheduler(optimizer, p, len(train_loader)),
        scaler=torch.amp.GradScaler() if runtime.needs_grad_scaler else None,
        criterion=nn.CrossEntropyLoss(weight=weight, label_smoothing=p.label_smoothing),
        class_weights=class_weights,
        head_facts=head_facts,
    )


def _choose_logistic_c(p: TrainParams, train_loader, val_loader, world: World) -> tuple[TrainParams, dict]:
    """``train.logistic_c: auto``: the params with the C chosen on the val split (linear_probe.choose_c),
    and the choice as MLflow facts (the C, and each C's val log loss); otherwise as they are, no facts."""
    if p.head != "logistic" or p.logistic_c != "auto":
        return p, {}
    c, losses = choose_c(train_loader.dataset.tensors, val_loader.dataset.tensors, p.class_weights)
    note(world, f"train: logistic_c auto: C {c:g} of {min(losses):g}..{max(losses):g} (val log loss {losses[c]:.4f})")
    val_losses = json.dumps({f"{grid_c:g}": round(loss, 5) for grid_c, loss in losses.items()})
    return p.model_copy(update={"logistic_c": c}), {"logistic_c": c, "logistic_c_val_log_loss": val_losses}


def _class_weights(p: TrainParams, train_split: Split, world: World) -> dict[str, float] | None:
    """train.class_weights 'balanced': n / (classes x count of the class) over the train labels
    (scikit-learn's, as the logistic head's class_weight); None when off."""
    if p.class_weights is None:
        return None
    classes = np.arange(len(train_split.classes))
    weights = compute_class_weight(p.class_weights, classes=classes, y=train_split.labels)
    named = {name: float(w) for name, w in zip(train_split.classes, weights, strict=True)}
    note(world, f"train: class weights {', '.join(f'{name} {w:.4g}' for name, w in named.items())}")
    return named


def _loaders(
    frozen: FrozenPart | None,
    paths: Paths,
    train_split,
    val_images: CachedImages,
    p: TrainParams,
    runtime: Runtime,
    world: World,
    generator: torch.Generator,
):
    """(train loader, val loader, DDP sampler or None, augmentation to run on the device or None);
    given ``frozen``, the loaders hold its cached activations instead of the images."""
    on_cuda = runtime.device.type == "cuda"
    loader_transform, batch_transform = train_transforms(p.image_size, p.augment, on_device=on_cuda)
    train_images = CachedImages(paths, train_split, loader_transform)
    if frozen is not None:
        return (*_activation_loaders(frozen, paths, train_images, val_images, p, generator), None, None)
    sampler = (
        DistributedSampler(train_images, world.world_size, world.rank, shuffle=True, seed=p.seed)
        if world.distributed
        else None
    )
    # Fresh workers every epoch, seeded from the shuffling generator that the state saves:
    # a resumed run then augments exactly like an uninterrupted one.
    train_loader = make_loader(
        train_images,
        p.batch_size,
        p.workers,
        shuffle=sampler is None,
        generator=generator,
        pin_memory=on_cuda,
        sampler=sampler,
        persistent_workers=False,
    )
    # Its own generator: validation draws nothing from the RNGs training uses. Its persistent workers
    # draw their seed at the first validation only, so drawing it from torch's global RNG (dropout's)
    # made a resumed run's first validation shift that RNG once more than an uninterrupted run did.
    val_loader = make_loader(val_images, p.batch_size, p.workers, generator=torch.Generator(), pin_memory=on_cuda)
    return train_loader, val_loader, sampler, batch_transform


def _activation_loaders(
    frozen: FrozenPart, paths: Paths, train_images, val_images, p: TrainParams, generator: torch.Generator
):
    """The frozen part's activations of every train/val image, computed once; then each epoch runs
    only what trains. The whole backbone's come from the feature cache (catdog.pipeline.features),
    shared with evaluate and other experiments; a partial prefix's ('top') are computed here."""
    every_row = features_of(frozen, paths, p.batch_size, p.workers) if frozen.whole_backbone else None
    loaders = []
    for name, images in (("train", train_images), ("val", val_images)):
        if every_row is not None:
            features, labels = torch.from_numpy(every_row[images.split.rows]), torch.from_numpy(images.split.labels)
        else:
            loader = make_loader(images, p.batch_size, p.workers)
            features, labels = cached_activations(frozen, loader, desc=f"frozen activations ({name})")
        loaders.append(
            make_loader(TensorDataset(features, labels), p.batch_size, 0, shuffle=name == "train", generator=generator)
        )
    return loaders


def wrap_for_training(loop_model: nn.Module, p: TrainParams, runtime: Runtime, world: World) -> nn.Module:
    """What the training loop calls: DDP over the layers that train now (so rebuilt when head
    warm-up ends), compiled on CUDA."""
    if world.distributed:
        on_cuda = runtime.device.type == "cuda"
        loop_model = DistributedDataParallel(loop_model, device_ids=[world.local_rank] if on_cuda else None)
    if p.compile and runtime.device.type == "cuda":
        loop_model = torch.compile(loop_model)
    return loop_model


def resumable_state(paths: Paths, fingerprint: str) -> dict | None:
    """The state a killed run with the same fingerprint left, unless its MLflow run is gone; else None."""
    state = train_state.load_resumable(paths.train_state, fingerprint)
    if state is not None and not tracking.run_exists(paths.root, state["run_id"]):
        tqdm.write(f"train: the MLflow run of {paths.train_state.name} is gone: starting afresh")
        return None
    return state


def note(world: World, message: str) -> None:
    """A line on the console, from rank 0 only."""
    if world.is_main:
        tqdm.write(message)
