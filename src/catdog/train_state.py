"""The resumable training state, ``models/train_state.pt``: saved atomically after every epoch.

It holds what continuing needs (the weights that train, optimizer, scheduler, GradScaler, every
rank's RNG states, the history, the best epoch so far, the MLflow run id) and a fingerprint of
what the training depends on: the train and tracking params, the prepared data and the number
of processes. The train stage resumes from it when the fingerprint matches and it is not marked
complete; anything else starts afresh. It is not a DVC output, so DVC never deletes it when it
reruns train after a kill.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from tqdm import tqdm

from catdog import integrity
from catdog.params import Params
from catdog.paths import Paths

VERSION = 1


def fingerprint(params: Params, paths: Paths, world_size: int) -> str:
    material = {
        "version": VERSION,
        "train": params.train.model_dump(),
        "tracking": params.tracking.model_dump(),
        "data_hash": integrity.data_hash(paths),  # the cache and manifest, verified at stage start
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
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")  # same folder: os.replace is then atomic
    with temporary.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
