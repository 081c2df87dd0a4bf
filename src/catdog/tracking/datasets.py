"""The prepared data as an MLflow dataset of the train run: its source, DVC's digest and a profile."""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path

import yaml
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

from catdog.core.params import Params
from catdog.core.paths import Paths
from catdog.data import integrity


class PreparedImages(MetaDataset):
    """The prepared data as MLflow sees it: a name, a digest and a profile (no rows to load)."""

    def __init__(self, source: str, name: str, digest: str, profile: dict):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": a local file it is
            resolved = resolve_dataset_source(source)
        super().__init__(resolved, name=name, digest=digest)
        self._profile = profile

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def prepared_dataset(params: Params, paths: Paths) -> PreparedImages:
    """``data/prepared`` as an MLflow dataset: named after ``data.source``, DVC's md5 as digest,
    the image count per split and, per split, per class as profile."""
    per_class: dict[str, Counter] = {}
    with paths.manifest.open(newline="") as handle:
        for row in csv.DictReader(handle):
            per_class.setdefault(row["split"], Counter())[row["label"]] += 1
    splits = {split: sum(counts.values()) for split, counts in per_class.items()}
    source = Path(params.data.source)
    return PreparedImages(
        str(source if source.is_absolute() else paths.root / source),
        source.name,
        prepared_digest(paths),
        {
            "images": sum(splits.values()),
            **splits,
            "per_class": {split: dict(sorted(counts.items())) for split, counts in per_class.items()},
        },
    )


def prepared_digest(paths: Paths) -> str:
    """DVC's md5 of ``data/prepared``: as dvc.lock records prepare's output, else computed the
    way DVC does (md5 of the sorted file list with each file's md5, plus ``.dir``), taking the
    md5s prepare recorded in content.json (which the stages verify) instead of hashing again."""
    lock = paths.dvc_lock
    if lock.is_file():
        lock_data = yaml.load(lock.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 10x
        outs = (lock_data or {}).get("stages", {}).get("prepare", {}).get("outs", [])
        for out in outs:
            if out.get("path") == paths.prepared.relative_to(paths.root).as_posix() and "md5" in out:
                return out["md5"]
    recorded = json.loads(paths.prepared_content.read_text()) if paths.prepared_content.is_file() else {}
    entries = [
        {
            "md5": recorded.get(f.name, {}).get("md5") or integrity.file_md5(f),
            "relpath": f.relative_to(paths.prepared).as_posix(),
        }
        for f in sorted(paths.prepared.rglob("*"))
        if f.is_file()
    ]
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True)
    return hashlib.md5(listing.encode()).hexdigest() + ".dir"
