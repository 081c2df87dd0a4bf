"""prepare: a labelled image set (zip or folder) -> validated, de-duplicated, split, decoded cache.

Where the labels come from (the layout found is printed in one line and recorded as ``layout`` in
summary.json). Only image files (``IMAGE_SUFFIXES``, any case) are labelled: other files (a README,
a licence) are ignored and counted as ``unlabelled_ignored``; hidden files and ``__MACOSX`` are
skipped silently; names with ``..`` or an absolute path are rejected as ``unsafe_path``. The rules,
in this order:

1. ``csv`` when ``data.labels`` names a CSV inside the source (a file of the folder, a member of the
   zip: DVC tracks it with the source): a header row, then path and label in the first two columns
   (fastai's convention), paths relative to the source. Files it does not name are ignored and
   counted; a row whose file is absent is rejected as ``missing_file``, a path listed under two
   labels as ``conflicting_labels``; the other rows are used.
2. ``kaggle_names``: names ``<class>.<n>.<ext>`` (``cat.12.jpg``, n digits), when every such image
   sits in one folder (the root, or ``train/`` as in Kaggle's train.zip), that folder holds no other
   image and the names give two classes or more. Images elsewhere (Kaggle's unlabelled ``test1/``)
   are ignored and counted, unless they form a layout of two classes or more by rules 3-4 (an
   ambiguous layout: an error). A top folder ``train/`` holding only such names is this case, not rule 3.
3. The layout root is the source, descended through a single folder that holds every image, some of
   them in its subfolders (a zip of a folder, ``PetImages/``). Top folders named ``train``, ``val``
   and ``test`` there make ``split_folders``: each is labelled on its own by rule 4 (or by rule 2:
   ``split_kaggle_names``) and the given split is kept exactly; a split folder that is missing or
   holds no labelled image (an unlabelled ``test/``) is carved from ``train/`` with
   ``data.val_fraction`` / ``data.test_fraction``, stratified. Split folders beside other top folders,
   or without ``train/``, are an error that says what was found (ambiguous: use one layout or a CSV).
4. ``class_folders``: ``<class>/**/<image>`` under the layout root, as torchvision's ImageFolder:
   the folder right under the root is the label; images directly in the root are ignored.

Labels are kept as written (spaces, capitals, non-ASCII letters; ``Cat`` and ``cat`` are two
classes). A folder without images is no class. Classes are sorted (ImageFolder's order, the model's
output order) unless ``data.classes`` fixes them and their order: images of other classes are then
ignored and counted per class, and a listed class without images is an error. Fewer than two
classes, or a class with fewer than ``data.min_per_class`` usable images, is an error naming it.

Images with identical pixels (byte-identical files among them) form one group that lands in one
split. A group under two labels is rejected as ``conflicting_labels``, every copy. With given splits,
a copy in ``val/`` or ``test/`` of an image of an earlier split (train < val < test) is rejected as
``duplicate_across_splits``: the given split is kept, but nothing is tested on what was trained on.
Carved splits are stratified per class over groups, seeded, and independent of listing order.

A file larger than ``data.max_image_bytes`` (a zip member by its declared size) is rejected as
``too_large`` before it is read, and reading stops at that cap (``images.read_bounded``). A decode
worker killed by the system (out of memory) stops prepare with one line naming its image.
Whatever stops prepare leaves no half-written ``data/prepared``.

Outputs (``paths.prepared``):
  manifest.csv   one row per kept image: path, label, split, pixel_md5; row i is images[i]
  images.npy     uint8 [N, cache_size, cache_size, 3]: decoded once, read by train/evaluate
  rejected.csv   path, reason for every file that was skipped
  summary.json   layout, classes, images per split and class, rejects per reason, ignored files
and the headline metrics ``paths.prepare_metrics`` (images per split).
"""

from __future__ import annotations

import csv
import hashlib
import io
import multiprocessing
import os
import random
import re
import shutil
import zipfile
import zlib
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from catdog.core import reports
from catdog.core.errors import CatdogError
from catdog.core.params import DataParams, Params
from catdog.core.paths import Paths
from catdog.data import integrity
from catdog.data.images import BadImage, decode_image, read_bounded, read_file

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_KAGGLE_NAME = re.compile(r"([^.]+)\.\d+\.[^.]+")
_EXPECTED = (
    "expected <class>.<n>.jpg names, <class>/ folders, train|val|test/<class>/ folders, "
    "or a path,label CSV in data.labels"
)
IMBALANCE_WARNING = 3  # largest / smallest class


@dataclass(frozen=True)
class Candidate:
    path: str  # zip member name or path relative to the source folder (posix)
    label: str
    split: str | None = None  # the split its source gave it (split_folders), else carved


@dataclass
class Listing:
    """What the source holds: its layout, the labelled images, the files skipped or ignored."""

    layout: str
    description: str  # where the labels come from, for the one line prepare prints
    candidates: list[Candidate]  # sorted by path
    rejected: list[tuple[str, str]]
    unlabelled: int

    @property
    def given_splits(self) -> set[str]:
        return {c.split for c in self.candidates if c.split}


def run(params: Params, paths: Paths) -> dict:
    data = params.data
    source = resolve_source(data.source, paths.root)
    listing = list_candidates(source, data.labels)
    candidates, classes, other_classes = choose_classes(listing, data.classes, data.source)
    candidates = limit_per_class(candidates, classes, data.limit_per_class, data.seed)
    tqdm.write(f"layout: {listing.layout} ({listing.description}); classes: {', '.join(classes)}")

    out = paths.prepared
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:
        summary = _prepare(source, listing, candidates, classes, data, paths)
        summary["other_classes_ignored"] = other_classes
        reports.write_json(paths.prepare_summary, summary)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written
        raise
    reports.write_json(
        paths.prepare_metrics, {f"{name}_images": sum(counts.values()) for name, counts in summary["splits"].items()}
    )
    for reason, count in sorted(summary["rejected"].items()):
        tqdm.write(f"warning: skipped {count} file(s): {reason} (see {paths.rejected})")
    warn_if_imbalanced(summary["splits"], classes)
    return summary


def _prepare(source, listing: Listing, candidates, classes, data: DataParams, paths: Paths) -> dict:
    scratch = paths.images.with_suffix(".decoding.npy")
    results = decode_all(source, candidates, data, scratch)
    reject_conflicts(candidates, results)
    keep = [i for i, (md5, _) in enumerate(results) if md5 is not None]
    kept = [(candidates[i], results[i][0]) for i in keep]
    rejected = listing.rejected + [(c.path, reason) for c, (md5, reason) in zip(candidates, results) if md5 is None]
    check_class_counts(kept, classes, data.min_per_class, listing.given_splits)
    splits, merged_groups = split(kept, classes, data, listing.given_splits)
    store_cache(scratch, keep, paths.images)
    reports.write_csv(
        paths.manifest,
        ["path", "label", "split", "pixel_md5"],
        ([c.path, c.label, s, md5] for (c, md5), s in zip(kept, splits)),
    )
    reports.write_csv(paths.rejected, ["path", "reason"], sorted(rejected))
    integrity.record(paths, classes)
    summary = summarize(kept, classes, splits, rejected, listing.unlabelled, merged_groups, data.cache_size)
    return {"layout": listing.layout, **summary}


def resolve_source(source: str, root: Path) -> Path:
    path = Path(source) if Path(source).is_absolute() else root / source
    if not path.exists():
        raise CatdogError(f"data.source {source!r} does not exist: point it at a train.zip or an image folder")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise CatdogError(f"data.source {source!r} is a file but not a zip archive")
    return path


# --- listing: which files, which labels (the rules of the module docstring) ---


def list_candidates(source: Path, labels_csv: str | None) -> Listing:
    files, rejected = list_files(source)
    if labels_csv is not None:
        listing = labels_from_csv(source, labels_csv, files)
    else:
        images = [name for name in files if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES]
        listing = labels_from_layout(images)
        listing.unlabelled += len(files) - len(images)
    listing.rejected = rejected + listing.rejected
    return listing


def list_files(source: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Visible file names (posix, relative to the source), sorted; rejected (name, ``unsafe_path``)."""
    if source.is_file():
        with zipfile.ZipFile(source) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
    else:
        names = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    files, rejected = [], []
    for name in sorted(names):
        if _unsafe(PurePosixPath(name)):
            rejected.append((name, "unsafe_path"))
        elif not any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name).parts):
            files.append(name)
    return files, rejected


def _unsafe(path: PurePosixPath) -> bool:
    return path.is_absolute() or ".." in path.parts


def kaggle_label(name: str) -> str | None:
    """The class of a Kaggle-style name: ``cat`` for ``train/cat.12.jpg``, None for other names."""
    match = _KAGGLE_NAME.fullmatch(PurePosixPath(name).name)
    return match.group(1) if match else None


def kaggle_labels(images: list[str]) -> dict[str, str] | None:
    """Rule 2: {image: label} when the images are Kaggle-named in one folder, else None."""
    named = {name: label for name in images if (label := kaggle_label(name)) is not None}
    folders = {PurePosixPath(name).parent for name in named}
    if len(folders) != 1 or len(set(named.values())) < 2:
        return None
    if any(PurePosixPath(name).parent in folders for name in images if name not in named):
        return None
    return named


def labels_from_layout(images: list[str]) -> Listing:
    named = kaggle_labels(images)
    if named is None:
        return labels_from_folders(images)
    folder = PurePosixPath(next(iter(named))).parent
    where = f" in {folder}/" if folder.parts else ""
    elsewhere = _labelled_elsewhere([name for name in images if name not in named])
    if elsewhere is not None:
        raise CatdogError(
            f"ambiguous layout in data.source: <class>.<n>.<ext> names{where} and {elsewhere.layout} "
            f"({elsewhere.description}) beside them: use one layout, or a path,label CSV (data.labels)"
        )
    return _listing("kaggle_names", f"labels from file names <class>.<n>.<ext>{where}", images, named)


def _labelled_elsewhere(images: list[str]) -> Listing | None:
    """The images outside Kaggle's folder as a layout of their own (two classes or more), if they are one."""
    try:
        listing = labels_from_folders(images)
    except CatdogError:
        return None
    return listing if len({candidate.label for candidate in listing.candidates}) > 1 else None


def labels_from_folders(images: list[str]) -> Listing:
    """Rules 3 and 4."""
    depth = layout_root_depth(images)
    below = {name: PurePosixPath(name).parts[depth:] for name in images}
    tops = {parts[0] for parts in below.values() if len(parts) > 1}
    if tops & set(SPLITS):
        return labels_from_split_folders(images, below, tops)
    root = "/".join(PurePosixPath(images[0]).parts[:depth]) + "/" if depth else "the source root"
    labels = {name: parts[0] for name, parts in below.items() if len(parts) > 1}
    return _listing("class_folders", f"labels from the folders in {root}", images, labels)


def layout_root_depth(images: list[str]) -> int:
    """Rule 3: how many single folders, each holding every image (some in its subfolders), to descend."""
    parents = [PurePosixPath(name).parent.parts for name in images]
    depth = 0
    while (
        all(len(parts) > depth for parts in parents)
        and len({parts[depth] for parts in parents}) == 1
        and any(len(parts) > depth + 1 for parts in parents)
    ):
        depth += 1
    return depth


def labels_from_split_folders(images: list[str], below: dict[str, tuple[str, ...]], tops: set[str]) -> Listing:
    if tops - set(SPLITS) or "train" not in tops:
        raise CatdogError(
            f"ambiguous layout in data.source: top folders {sorted(tops)} "
            + ("mix split folders (train, val, test) with other folders" if tops - set(SPLITS) else "have no train/")
            + ": use root/<class>/..., root/train|val|test/<class>/... or a path,label CSV (data.labels)"
        )
    labels, splits, kinds = {}, {}, set()
    for split_name in SPLITS:
        inside = {
            "/".join(parts[1:]): name for name, parts in below.items() if len(parts) > 1 and parts[0] == split_name
        }
        named = kaggle_labels(list(inside))
        found = named if named is not None else {rel: rel.split("/")[0] for rel in inside if "/" in rel}
        if found:
            kinds.add("split_kaggle_names" if named is not None else "split_folders")
            labels.update({inside[rel]: label for rel, label in found.items()})
            splits.update(dict.fromkeys((inside[rel] for rel in found), split_name))
    if len(kinds) > 1:
        raise CatdogError(
            "ambiguous layout in data.source: some split folders hold <class>/ folders, others <class>.<n>.jpg "
            "names: use one of them in every split folder"
        )
    if "train" not in splits.values():
        raise CatdogError(f"data.source has split folders but no labelled image in train/: {_EXPECTED}")
    given = [s for s in SPLITS if s in splits.values()]
    carved = [s for s in SPLITS if s not in given]
    source_of_labels = "file names" if kinds == {"split_kaggle_names"} else "class folders"
    description = f"labels from {source_of_labels}; given splits: {', '.join(given)}" + (
        f"; {' and '.join(carved)} carved from train/" if carved else ""
    )
    return _listing(kinds.pop(), description, images, labels, splits)


def _listing(layout, description, images, labels, splits=None) -> Listing:
    candidates = [Candidate(name, labels[name], (splits or {}).get(name)) for name in sorted(labels)]
    return Listing(layout, description, candidates, [], len(images) - len(labels))


def labels_from_csv(source: Path, labels_csv: str, files: list[str]) -> Listing:
    """Rule 1: the CSV's rows, each (path, label); rows without their file rejected as ``missing_file``."""
    rows = read_labels_csv(source, labels_csv, set(files))
    labels: dict[str, set[str]] = defaultdict(set)
    rejected = []
    for path, label in rows:
        pure = PurePosixPath(path)
        if _unsafe(pure):
            rejected.append((path, "unsafe_path"))
        else:
            labels[pure.as_posix()].add(label)
    present = set(files)
    candidates = []
    for path, found in sorted(labels.items()):
        if len(found) > 1:
            rejected.append((path, "conflicting_labels"))
        elif path not in present:
            rejected.append((path, "missing_file"))
        else:
            candidates.append(Candidate(path, found.pop()))
    unlabelled = len(present - set(labels) - {PurePosixPath(labels_csv).as_posix()})
    return Listing("csv", f"labels from {labels_csv}", candidates, rejected, unlabelled)


def read_labels_csv(source: Path, labels_csv: str, files: set[str]) -> list[tuple[str, str]]:
    """(path, label) of each row of the labels CSV after its header; CatdogError when it cannot be read."""
    what = f"data.labels {labels_csv!r}"
    if _unsafe(PurePosixPath(labels_csv)):
        raise CatdogError(f"{what} must be a path inside data.source (DVC tracks the source, not the CSV beside it)")
    try:
        if source.is_file():
            with zipfile.ZipFile(source) as archive:
                raw = archive.read(PurePosixPath(labels_csv).as_posix())
        else:
            raw = (source / labels_csv).read_bytes()
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    except (KeyError, FileNotFoundError, IsADirectoryError):
        raise CatdogError(f"{what} is not in data.source {str(source)!r}: the CSV goes inside the source") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CatdogError(f"{what} cannot be read as a UTF-8 CSV: {exc}") from None
    if not rows or len(rows[0]) < 2:
        raise CatdogError(f"{what} needs a header row and two columns, path and label")
    if PurePosixPath(rows[0][0].strip()).as_posix() in files:
        raise CatdogError(f"{what}: its first row names a file, {rows[0][0]!r}; the first row must be a header")
    pairs = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise CatdogError(f"{what} line {line}: expected path,label, got {row}")
        pairs.append((row[0].strip(), row[1].strip()))
    return pairs


def choose_classes(listing: Listing, fixed: list[str] | None, source: str):
    """The classes (sorted, or ``data.classes`` in its order), their candidates, and {other class: images}."""
    found = Counter(candidate.label for candidate in listing.candidates)
    if not found:
        raise CatdogError(f"no labelled images in {source} ({listing.layout}, {listing.description}): {_EXPECTED}")
    if fixed is not None:
        missing = [name for name in fixed if name not in found]
        if missing:
            raise CatdogError(
                f"data.classes lists {', '.join(map(repr, missing))} but {source} has no image of it "
                f"(classes found: {', '.join(map(repr, sorted(found)))})"
            )
    classes = list(fixed) if fixed is not None else sorted(found)
    if len(classes) < 2:
        raise CatdogError(
            f"{source} holds one class, {classes[0]!r} ({listing.layout}, {listing.description}): "
            f"a classifier needs two or more; {_EXPECTED}"
        )
    others = {label: count for label, count in sorted(found.items()) if label not in classes}
    return [c for c in listing.candidates if c.label in classes], classes, others


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


def _init_worker(source, cache_file, count, size, min_size, max_bytes, current, slot) -> None:
    _worker_state.update(
        archive=zipfile.ZipFile(source) if os.path.isfile(source) else None,
        root=Path(source),
        images=np.lib.format.open_memmap(cache_file, mode="r+", dtype=np.uint8, shape=(count, size, size, 3)),
        size=size,
        min_size=min_size,
        max_bytes=max_bytes,
        current=current,  # shared: 1 + the index this worker is decoding (names it if the worker dies)
        slot=slot,
    )


def _read(name: str) -> bytes:
    """The file's bytes, refused before reading when over ``data.max_image_bytes``."""
    state = _worker_state
    if state["archive"] is None:
        return read_file(state["root"] / name, state["max_bytes"])
    info = state["archive"].getinfo(name)
    with state["archive"].open(info) as stream:
        return read_bounded(stream, info.file_size, state["max_bytes"])


def _decode_one(task: tuple[int, str]) -> tuple[int, str | None, str]:
    """Returns (index, pixel md5 or None, reject reason or '')."""
    index, name = task
    state = _worker_state
    state["current"][state["slot"]] = index + 1
    try:
        pixels = decode_image(_read(name), state["size"], state["min_size"])
    except BadImage as exc:
        return index, None, exc.reason
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError):  # unreadable member or file
        return index, None, "unreadable"
    state["images"][index] = pixels
    return index, hashlib.md5(pixels.tobytes()).hexdigest(), ""


def _decode_chunk(tasks: list[tuple[int, str]]) -> list[tuple[int, str | None, str]]:
    return [_decode_one(task) for task in tasks]


def decode_all(source: Path, candidates: list[Candidate], data: DataParams, scratch: Path) -> list[tuple]:
    """Decode candidate i into row i of ``scratch``; returns (pixel md5 or None, reject reason) per candidate."""
    size, count = data.cache_size, len(candidates)
    np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(count, size, size, 3)).flush()
    workers = min(data.workers or os.cpu_count() or 1, count)
    init_args = (str(source), str(scratch), count, size, data.min_image_size, data.max_image_bytes)
    tasks = [(i, c.path) for i, c in enumerate(candidates)]
    results = [None] * count
    progress = {"total": count, "desc": "decode", "unit": "img", "mininterval": 1.0}
    if workers == 1:
        _init_worker(*init_args, multiprocessing.RawArray("q", 1), 0)
        decoded = map(_decode_one, tasks)
    else:
        decoded = _decode_in_pools(tasks, workers, init_args, [c.path for c in candidates])
    try:
        for index, md5, reason in tqdm(decoded, **progress):
            results[index] = (md5, reason)
    finally:
        _worker_state.clear()
    return results


def _decode_in_pools(tasks, workers: int, init_args: tuple, names: list[str]):
    """Decode results in any order, each worker in a one-process pool fed two chunks at a time: a worker
    that dies (the kernel's OOM killer) is then known, and so is the image it was on."""
    current = multiprocessing.RawArray("q", workers)
    size = max(1, min(64, len(tasks) // (workers * 8)))
    chunks = iter([tasks[start : start + size] for start in range(0, len(tasks), size)])
    with ExitStack() as stack:
        pools = [
            stack.enter_context(ProcessPoolExecutor(1, initializer=_init_worker, initargs=(*init_args, current, k)))
            for k in range(workers)
        ]
        running = {}

        def feed(slot: int) -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                running[pools[slot].submit(_decode_chunk, chunk)] = slot

        for slot in [*range(workers), *range(workers)]:
            feed(slot)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                slot = running.pop(future)
                try:
                    yield from future.result()
                except BrokenProcessPool:
                    for other in running:
                        other.cancel()
                    doing = f"while decoding {names[current[slot] - 1]}" if current[slot] else "before decoding"
                    raise CatdogError(
                        f"a decode worker was killed {doing} (out of memory?): remove that file, "
                        "lower data.max_image_bytes or data.workers"
                    ) from None
                feed(slot)


def reject_conflicts(candidates: list[Candidate], results: list[tuple]) -> None:
    """Same pixels under two labels: every copy ``conflicting_labels``. With given splits, a copy in a
    later split than another (train < val < test): ``duplicate_across_splits``."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, (md5, _) in enumerate(results):
        if md5 is not None:
            groups[md5].append(index)
    order = {None: 0, **{name: position for position, name in enumerate(SPLITS)}}
    for members in groups.values():
        if len({candidates[i].label for i in members}) > 1:
            for index in members:
                results[index] = (None, "conflicting_labels")
            continue
        first = min(order[candidates[i].split] for i in members)
        for index in members:
            if order[candidates[index].split] > first:
                results[index] = (None, "duplicate_across_splits")


def store_cache(scratch: Path, keep: list[int], cache_file: Path) -> None:
    """``scratch`` without the rows of rejected files, as ``cache_file``."""
    decoded = np.load(scratch, mmap_mode="r")
    if len(keep) == len(decoded):
        del decoded
        scratch.replace(cache_file)
        return
    images = np.lib.format.open_memmap(cache_file, mode="w+", dtype=np.uint8, shape=(len(keep), *decoded.shape[1:]))
    for start in range(0, len(keep), 1024):
        images[start : start + 1024] = decoded[keep[start : start + 1024]]
    images.flush()
    del decoded, images
    scratch.unlink()


def check_class_counts(kept: list[tuple[Candidate, str]], classes: list[str], minimum: int, given: set[str]) -> None:
    counts = Counter(candidate.label for candidate, _ in kept)
    for label in classes:
        if counts[label] < minimum:
            raise CatdogError(
                f"only {counts[label]} usable {label!r} image(s), need data.min_per_class={minimum}: "
                "add images or lower the param"
            )
    in_split = Counter((candidate.split, candidate.label) for candidate, _ in kept)
    for split_name in sorted(given, key=SPLITS.index):
        for label in classes:
            if not in_split[(split_name, label)]:
                carve = f", or leave {split_name}/ out to carve it from train/" if split_name != "train" else ""
                raise CatdogError(f"the given {split_name}/ folder has no usable {label!r} image: add some{carve}")


def split(
    kept: list[tuple[Candidate, str]], classes: list[str], data: DataParams, given: set[str]
) -> tuple[list[str], int]:
    """Split per kept image (given ones kept, the rest stratified and seeded) and how many groups merged.

    Images with identical pixels form one group and land in one split, so the same photo can
    never be both trained on and tested on. Group order depends only on content and names,
    never on listing order.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for index, (_, md5) in enumerate(kept):
        groups[md5].append(index)
    assignment = [""] * len(kept)
    by_label: dict[str, list[list[int]]] = defaultdict(list)
    for members in groups.values():
        candidate = kept[members[0]][0]
        if candidate.split in ("val", "test"):
            for index in members:
                assignment[index] = candidate.split
        else:
            by_label[candidate.label].append(members)

    fractions = {"test": data.test_fraction, "val": data.val_fraction}
    for label in classes:
        label_groups = sorted(by_label[label], key=lambda members: kept[members[0]][0].path)
        random.Random(f"{data.seed}-{label}").shuffle(label_groups)
        # at least one of each class in a carved split (min_per_class >= 3 leaves one for train)
        carved = [
            name
            for name in ("test", "val")
            if name not in given
            for _ in range(max(1, round(len(label_groups) * fractions[name])))
        ]
        for position, members in enumerate(label_groups):
            for index in members:
                assignment[index] = carved[position] if position < len(carved) else "train"
    merged = sum(1 for members in groups.values() if len(members) > 1)
    return assignment, merged


def warn_if_imbalanced(splits: dict[str, dict[str, int]], classes: list[str]) -> None:
    totals = {label: sum(counts[label] for counts in splits.values()) for label in classes}
    largest, smallest = max(totals, key=totals.get), min(totals, key=totals.get)
    if totals[largest] > IMBALANCE_WARNING * totals[smallest]:
        tqdm.write(
            f"warning: imbalanced classes: {totals[largest]} {largest!r} vs {totals[smallest]} {smallest!r} images "
            f"(more than {IMBALANCE_WARNING}:1); accuracy flatters the largest class, see balanced accuracy"
        )


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
