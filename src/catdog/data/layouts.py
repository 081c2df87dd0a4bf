"""Finding a labelled image set's layout: which files are images, their labels, classes and given splits.

The layout found is printed in one line by prepare and recorded as ``layout`` in summary.json. Only
image files (``IMAGE_SUFFIXES``, any case) are labelled: other files (a README, a licence) are
ignored and counted as ``unlabelled_ignored``; hidden files and ``__MACOSX`` are skipped silently;
names with ``..`` or an absolute path are rejected as ``unsafe_path``. The rules, in this order:

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
classes is an error naming what was found.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from catdog.core.errors import CatdogError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_KAGGLE_NAME = re.compile(r"([^.]+)\.\d+\.[^.]+")
_EXPECTED = (
    "expected <class>.<n>.jpg names, <class>/ folders, train|val|test/<class>/ folders, "
    "or a path,label CSV in data.labels"
)


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
