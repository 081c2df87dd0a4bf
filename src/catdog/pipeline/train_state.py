"""The resumable training state, ``models/train_state.pt``: saved atomically after every epoch.

It holds what continuing needs (the weights that train, optimizer, scheduler, GradScaler, every
rank's RNG states, the history, the best epoch so far, the MLflow run id) and a fingerprint of
what the training depends on: the train and tracking params, the prepared data and its classes,
and the number of processes. The train stage resumes from it when the fingerprint matches and it
is not marked complete; anything else starts afresh. It is not a DVC output, so DVC never deletes
it when it reruns train after a kill.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from catdog.core import atomic
from catdog.core.params import Params
from catdog.core.paths import Paths
from catdog.core.seeding import restore_rng_state
from catdog.data import integrity

VERSION = 1


@dataclass
class Progress:
    """What the epochs so far produced; carried from epoch to epoch and saved with the state."""

    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    best_row: dict | None = None  # the row of the best epoch by train.monitor
    best_weights: dict | None = None  # the trained part's weights after that epoch
    seconds: float = 0.0  # training time spent by earlier (killed) processes


def fingerprint(params: Params, paths: Paths, world_size: int) -> str:
    material = {
        "version": VERSION,
        "train": params.train.model_dump(),
        "tracking": params.tracking.model_dump(),
        "data_hash": integrity.data_hash(paths),  # the cache and manifest, verified at stage start
        "classes": integrity.recorded_classes(paths),  # in data_hash too; named here as what the outputs mean
        "world_size": world_size,
    }
    return hashlib.md5(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def load_resumable(path: Path, expected_fingerprint: str) -> dict | None:
    """The saved state when training can continue from it, else None (saying why, if it exists)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        tqdm.write(f"train: {path.name} is unreadable ({exc}): starting afresh")
        return None
    if state.get("version") != VERSION or state.get("fingerprint") != expected_fingerprint:
        tqdm.write(f"train: {path.name} is from other params or data: starting afresh")
        return None
    if state["complete"]:
        return None
    return state


def save(path: Path, state: dict) -> None:
    """Atomic: a kill leaves either the previous state or this one, never part of one."""
    with atomic.replacing(path) as temporary, temporary.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_epoch(
    path: Path,
    fingerprint: str,
    run_id: str,
    progress: Progress,
    trained_part: torch.nn.Module,
    optimizer,
    scheduler,
    scaler,
    rng: list,
    seconds: float,
) -> None:
    """The state after the last epoch of ``progress``; ``rng`` holds every rank's RNG states."""
    save(
        path,
        {
            "version": VERSION,
            "fingerprint": fingerprint,
            "complete": False,
            "epoch": progress.history[-1]["epoch"],
            "run_id": run_id,
            "model": trained_part.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict() if scaler else None,
            "history": progress.history,
            "best": {"row": progress.best_row, "weights": progress.best_weights},
            "rng": rng,
            "seconds": seconds,
        },
    )


def restore(
    state: dict, trained_part: torch.nn.Module, optimizer, scheduler, scaler, generator: torch.Generator, rank: int
) -> Progress:
    """Puts the saved epoch back into the objects that train, and returns the progress so far."""
    trained_part.load_state_dict(state["model"])
    if optimizer is not None:  # None: the logistic head has none
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"][rank], generator)  # last: setting up drew random numbers
    return Progress(state["history"], state["best"]["row"], state["best"]["weights"], state["seconds"])


def mark_complete(path: Path) -> None:
    """The run's outputs are all written: a rerun with the same params starts afresh."""
    save(path, {**torch.load(path, map_location="cpu", weights_only=True), "complete": True})
