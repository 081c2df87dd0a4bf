"""Frozen backbone features, computed once per (backbone graph, input size, preset, precision, images).

Training in ``features`` (or ``head`` without augmentation) mode, evaluate and the label audit all
need the same thing: the frozen backbone's pooled features of prepare's images. They are kept in
``cache_root()/features/<key>.npy`` (float32, one row per row of ``images.npy``), outside the DVC
outputs like the ONNX graphs, so DVC experiments and stages that share the backbone and the images
share them. The key is the content hash of the frozen graph (architecture, input size, weights),
the transform preset, the precision variant and the md5 of ``images.npy``: any change computes anew.

Each entry has its md5 beside it (``<key>.json``); both are written atomically, so concurrent
``dvc exp run --queue`` jobs at worst compute the same entry twice. An entry whose file differs
from its md5 (truncated, overwritten) is reported in one line and computed again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from catdog.core import atomic
from catdog.core.paths import cache_root

FORMAT_VERSION = "1"  # bump when what an entry holds changes for the same key


def feature_key(graph_hash: str, image_size: int, preset: str, variant: str, images_md5: str) -> str:
    """The entry's name: a hash of everything the features depend on."""
    identity = (FORMAT_VERSION, graph_hash, image_size, preset, variant, images_md5)
    return hashlib.sha256(repr(identity).encode()).hexdigest()[:32]


def entry_path(key: str) -> Path:
    return cache_root() / "features" / f"{key}.npy"


def load_features(key: str, rows: int | None = None) -> np.ndarray | None:
    """The cached features of ``key``, or None when absent or damaged (then said in one line);
    ``rows``: the row count the caller expects (a different one is a damaged entry too)."""
    path = entry_path(key)
    record_path = path.with_suffix(".json")
    if not (path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
        problem = None if _md5(path) == record["md5"] else "md5 mismatch"
        features = np.load(path) if problem is None else None
    except (OSError, ValueError, KeyError) as exc:  # unreadable record or array
        problem, features = f"unreadable: {exc}", None
    if features is not None and rows is not None and len(features) != rows:
        problem = f"{len(features)} rows, expected {rows}"
    if problem is not None:
        tqdm.write(f"features: cache entry {path} is damaged ({problem}): computing it again")
        return None
    return features


def store_features(key: str, features: np.ndarray) -> Path:
    """Writes the entry (array first, then its md5: a reader never trusts an array without one)."""
    path = entry_path(key)
    with atomic.replacing(path) as temporary:
        np.save(temporary, np.ascontiguousarray(features, dtype=np.float32))
    atomic.write_text(path.with_suffix(".json"), json.dumps({"md5": _md5(path), "shape": list(features.shape)}) + "\n")
    return path


def cached_features(key: str, rows: int, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
    """(features of every row, whether they came from the cache): loaded, or computed and stored."""
    features = load_features(key, rows)
    if features is not None:
        return features, True
    features = np.asarray(compute(), dtype=np.float32)
    store_features(key, features)
    return features, False


def _md5(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()
