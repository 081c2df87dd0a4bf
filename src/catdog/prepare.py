"""prepare: raw images (zip or folder) -> validated, de-duplicated, split, decoded cache.

Outputs (``paths.prepared``):
  manifest.csv   one row per kept image: path, label, split, pixel_md5; row i is images[i]
  images.npy     uint8 [N, cache_size, cache_size, 3]: decoded once, read by train/evaluate
  rejected.csv   path, reason for every file that was skipped
  summary.json   images per split and class, rejects per reason, duplicate groups merged
and the headline metrics ``paths.prepare_metrics`` (images per split).
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import shutil
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from catdog import integrity, reports
from catdog.errors import CatdogError
from catdog.images import BadImage, decode_image
from catdog.params import DataParams, Params
from catdog.paths import Paths

SPLITS = ("train", "val", "test")
_FOLDER_LABELS = {"cat": "cat", "cats": "cat", "dog": "dog", "dogs": "dog"}


@dataclass(frozen=True)
class Candidate:
    path: str  # zip member name or path relative to the source folder (posix)
    label: str


def run(params: Params, paths: Paths) -> dict:
    data = params.data
    source = resolve_source(data.source, paths.root)
    candidates, rejected, unlabelled = list_candidates(source)
    classes = sorted({candidate.label for candidate in candidates})
    candidates = limit_per_class(candidates, classes, data.limit_per_class, data.seed)

    out = paths.prepared
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    images, kept, decode_rejects = decode_all(source, candidates, data, paths.images)
    rejected += decode_rejects
    check_class_counts(kept, classes, data.min_per_class)

    splits, merged_groups = split(kept, classes, data)
    write_manifest(paths.manifest, kept, splits)
    write_rejected(paths.rejected, rejected)
    integrity.record(paths, classes)

    summary = summarize(kept, classes, splits, rejected, unlabelled, merged_groups, images.shape[1])
    reports.write_json(paths.prepare_summary, summary)
    reports.write_json(
        paths.prepare_metrics, {f"{name}_images": sum(counts.values()) for name, counts in summary["splits"].items()}
    )
    for reason, count in sorted(summary["rejected"].items()):
        tqdm.write(f"warning: skipped {count} file(s): {reason} (see {paths.rejected})")
    return summary


def resolve_source(source: str, root: Path) -> Path:
    path = Path(source) if Path(source).is_absolute() else root / source
    if not path.exists():
        raise CatdogError(f"data.source {source!r} does not exist: point it at a train.zip or an image folder")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise CatdogError(f"data.source {source!r} is a file but not a zip archive")
    return path


def list_candidates(source: Path) -> tuple[list[Candidate], list[tuple[str, str]], int]:
    """Labelled files sorted by path; rejected (path, reason); count of unlabelled files."""
    if source.is_file():
        with zipfile.ZipFile(source) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
    else:
        names = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    candidates, rejected, unlabelled = [], [], 0
    for name in sorted(names):
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts:
            rejected.append((name, "unsafe_path"))
            continue
        if any(part.startswith(".") or part == "__MACOSX" for part in pure.parts):
            continue
        label = label_of(pure)
        if label is None:
            unlabelled += 1
        else:
            candidates.append(Candidate(name, label))
    return candidates, rejected, unlabelled


def label_of(path: PurePosixPath) -> str | None:
    """Kaggle naming (``cat.12.jpg``) first, then a class folder (``Cat/12.jpg``)."""
    prefix = path.name.split(".", 1)[0].lower()
    if prefix in _FOLDER_LABELS.values() and "." in path.name:
        return prefix
    if len(path.parts) > 1:
        return _FOLDER_LABELS.get(path.parts[-2].lower())
    return None


def limit_per_class(candidates: list[Candidate], classes: list[str], limit: int | None, seed: int) -> list[Candidate]:
    if limit is None:
        return candidates
    chosen = []
    for label in classes:
        of_label = [c for c in candidates if c.label == label]
        random.Random(f"{seed}-{label}").shuffle(of_label)
        chosen += of_label[:limit]
    return sorted(chosen, key=lambda c: c.path)


# --- decoding (one process per core; each writes its rows straight into the memmap) ---

_worker_state: dict = {}


def _init_worker(source: str, cache_file: str, count: int, size: int, min_size: int) -> None:
    _worker_state.update(
        archive=zipfile.ZipFile(source) if os.path.isfile(source) else None,
        root=Path(source),
        images=np.lib.format.open_memmap(cache_file, mode="r+", dtype=np.uint8, shape=(count, size, size, 3)),
        size=size,
        min_size=min_size,
    )


def _decode_one(task: tuple[int, str]) -> tuple[int, str | None, str]:
    """Returns (index, pixel md5 or None, reject reason or '')."""
    index, name = task
    state = _worker_state
    try:
        data = state["archive"].read(name) if state["archive"] else (state["root"] / name).read_bytes()
        pixels = decode_image(data, state["size"], state["min_size"])
    except BadImage as exc:
        return index, None, exc.reason
    except (OSError, zipfile.BadZipFile, EOFError):  # unreadable member or file
        return index, None, "unreadable"
    state["images"][index] = pixels
    return index, hashlib.md5(pixels.tobytes()).hexdigest(), ""


def decode_all(source: Path, candidates: list[Candidate], data: DataParams, cache_file: Path):
    """Decode every candidate; returns (images memmap, kept [(candidate, md5)], rejected)."""
    size, count = data.cache_size, len(candidates)
    if count == 0:
        raise CatdogError(
            f"no labelled images in {data.source}: expected cat.N.jpg/dog.N.jpg names or Cat/ and Dog/ folders"
        )
    scratch = cache_file.with_suffix(".decoding.npy")
    np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(count, size, size, 3)).flush()
    workers = min(data.workers or os.cpu_count() or 1, count)
    init_args = (str(source), str(scratch), count, size, data.min_image_size)
    tasks = [(i, c.path) for i, c in enumerate(candidates)]
    results = [None] * count
    progress = {"total": count, "desc": "decode", "unit": "img", "mininterval": 1.0}
    if workers == 1:
        _init_worker(*init_args)
        for index, md5, reason in tqdm(map(_decode_one, tasks), **progress):
            results[index] = (md5, reason)
        _worker_state.clear()
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=init_args) as pool:
            chunk = max(1, min(64, count // (workers * 8)))
            for index, md5, reason in tqdm(pool.map(_decode_one, tasks, chunksize=chunk), **progress):
                results[index] = (md5, reason)

    keep = [i for i, (md5, _) in enumerate(results) if md5 is not None]
    kept = [(candidates[i], results[i][0]) for i in keep]
    rejected = [(candidates[i].path, results[i][1]) for i in range(count) if results[i][0] is None]
    if len(keep) == count:
        scratch.replace(cache_file)
    else:  # compact: drop the rows of rejected files
        decoded = np.load(scratch, mmap_mode="r")
        images = np.lib.format.open_memmap(cache_file, mode="w+", dtype=np.uint8, shape=(len(keep), size, size, 3))
        for start in range(0, len(keep), 1024):
            images[start : start + 1024] = decoded[keep[start : start + 1024]]
        images.flush()
        del decoded, images
        scratch.unlink()
    return np.load(cache_file, mmap_mode="r"), kept, rejected


def check_class_counts(kept: list[tuple[Candidate, str]], classes: list[str], minimum: int) -> None:
    counts = Counter(candidate.label for candidate, _ in kept)
    for label in classes:
        if counts[label] < minimum:
            raise CatdogError(
                f"only {counts[label]} usable '{label}' image(s), need data.min_per_class={minimum}: "
                "add images or lower the param"
            )


def split(kept: list[tuple[Candidate, str]], classes: list[str], data: DataParams) -> tuple[list[str], int]:
    """Stratified, seeded split of duplicate groups; returns (split per kept image, merged groups).

    Images with identical pixels form one group and land in one split, so the same photo can
    never be both trained on and tested on. Group order depends only on content and names,
    never on listing order.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for index, (_, md5) in enumerate(kept):
        groups[md5].append(index)
    by_label: dict[str, list[list[int]]] = defaultdict(list)
    for members in groups.values():
        by_label[kept[members[0]][0].label].append(members)

    assignment = [""] * len(kept)
    for label in classes:
        label_groups = sorted(by_label[label], key=lambda members: kept[members[0]][0].path)
        random.Random(f"{data.seed}-{label}").shuffle(label_groups)
        # at least one of each class in val and test (min_per_class >= 3 leaves one for train)
        n_test = max(1, round(len(label_groups) * data.test_fraction))
        n_val = max(1, round(len(label_groups) * data.val_fraction))
        for position, members in enumerate(label_groups):
            name = "test" if position < n_test else "val" if position < n_test + n_val else "train"
            for index in members:
                assignment[index] = name
    merged = sum(1 for members in groups.values() if len(members) > 1)
    return assignment, merged


def write_manifest(path: Path, kept: list[tuple[Candidate, str]], splits: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "split", "pixel_md5"])
        for (candidate, md5), split_name in zip(kept, splits):
            writer.writerow([candidate.path, candidate.label, split_name, md5])


def write_rejected(path: Path, rejected: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "reason"])
        writer.writerows(sorted(rejected))


def summarize(kept, classes, splits, rejected, unlabelled, merged_groups, cache_size) -> dict:
    counts = Counter(zip(splits, (candidate.label for candidate, _ in kept)))
    return {
        "images": len(kept),
        "cache_size": cache_size,
        "classes": classes,
        "splits": {s: {label: counts[(s, label)] for label in classes} for s in SPLITS},
        "rejected": dict(sorted(Counter(reason for _, reason in rejected).items())),
        "rejected_total": len(rejected),
        "unlabelled_ignored": unlabelled,
        "duplicate_groups_merged": merged_groups,
    }
