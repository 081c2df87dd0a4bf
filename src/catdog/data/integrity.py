"""The content of ``data/prepared``: recorded by prepare, verified by every stage that reads it.

``manifest.csv`` holds every image's pixel md5 but not the decoded cache ``images.npy`` that
training reads: a cache overwritten or truncated after prepare would train silently on other
pixels under the same lineage. prepare records size and md5 of both files, and the class names
(in model output order), in ``content.json``;
train, evaluate and export verify them before reading and refuse a differing cache in one line.
The md5 of that record is the data hash of the MLflow lineage and of train's resume fingerprint.

md5 runs at disk speed: 0.2 s for the sample's cache, about 6 s for the full dataset's, in each of
three stages of every trial. So a file once hashed is not hashed again while its stat is the same
(:func:`verified_md5`), as DVC's own state trusts an unchanged file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from catdog.core import atomic
from catdog.core.errors import CatdogError
from catdog.core.paths import Paths, cache_root

# a file changed within this long before it is hashed may change again within the same timestamp
# tick (a few ms on Linux) without its stat showing it: its md5 is not remembered ("racy git")
_SETTLED_NS = 2_000_000_000

_RESTORE = "restore it with `dvc checkout data/prepared` or rebuild it with `dvc repro prepare`"


def record(paths: Paths, classes: list[str]) -> None:
    """Written last by prepare, once ``images.npy`` and ``manifest.csv`` are complete."""
    content = {"classes": list(classes), **{path.name: _describe(path) for path in (paths.images, paths.manifest)}}
    atomic.write_text(paths.prepared_content, json.dumps(content, indent=2, sort_keys=True) + "\n")


def verify(paths: Paths) -> None:
    """Raise CatdogError unless ``data/prepared`` is exactly what prepare recorded."""
    if not paths.prepared_content.is_file():
        raise CatdogError(f"{paths.prepared_content} not found: run the prepare stage (`dvc repro prepare`)")
    recorded = json.loads(paths.prepared_content.read_text())
    for path in (paths.images, paths.manifest):
        expected = recorded.get(path.name)
        if not path.is_file():
            raise CatdogError(f"{path} is missing: {_RESTORE}")
        size = path.stat().st_size
        if expected is None or size != expected["bytes"]:
            raise CatdogError(
                f"{path} has {size} bytes, prepare wrote {expected and expected['bytes']} "
                f"(truncated or replaced): {_RESTORE}"
            )
        if verified_md5(path) != expected["md5"]:
            raise CatdogError(f"{path} differs from what prepare wrote (md5 mismatch): {_RESTORE}")


def recorded_classes(paths: Paths) -> list[str]:
    """The class names prepare found (or ``data.classes`` fixed), in the order of the model's outputs."""
    if not paths.prepared_content.is_file():
        raise CatdogError(f"{paths.prepared_content} not found: run the prepare stage (`dvc repro prepare`)")
    classes = json.loads(paths.prepared_content.read_text()).get("classes")
    if not classes:
        raise CatdogError(f"{paths.prepared_content} names no classes (written by older code): {_RESTORE}")
    return classes


def check_classes(found: list[str], paths: Paths, what: str) -> None:
    """Refuse a model trained on other classes (or another order) than the prepared data's."""
    expected = recorded_classes(paths)
    if list(found) != expected:
        raise CatdogError(
            f"{what} was trained on classes {list(found)}, data/prepared has {expected}: rerun `dvc repro train`"
        )


def data_hash(paths: Paths) -> str:
    """md5 of the recorded content (cheap: the files are hashed by ``verify``, once per stage)."""
    return hashlib.md5(paths.prepared_content.read_bytes()).hexdigest()


def _describe(path) -> dict:
    return {"bytes": path.stat().st_size, "md5": file_md5(path)}


def file_md5(path) -> str:
    """md5 of a file, read in blocks (the checkpoint, the image cache: any size)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def verified_md5(path: Path) -> str:
    """``file_md5(path)``, remembered in the user's cache under the file's stat (device, inode, size,
    mtime and ctime): every write or replacement changes the ctime, which no user can set back."""
    stat = path.stat()
    signature = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    memo = cache_root() / "md5" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]}.json"
    try:
        remembered = json.loads(memo.read_text())
        if remembered["stat"] == signature:
            return remembered["md5"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: hash the file
        pass
    md5 = file_md5(path)
    if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > _SETTLED_NS:
        with contextlib.suppress(OSError):  # a cache it cannot write: the next stage hashes again
            atomic.write_text(memo, json.dumps({"path": os.fspath(path), "stat": signature, "md5": md5}) + "\n")
    return md5


def recorded_md5(paths: Paths, name: str) -> str:
    """The md5 prepare recorded for ``name`` (``images.npy``, ``manifest.csv``): a content key,
    trusted once ``verify`` has passed."""
    return json.loads(paths.prepared_content.read_text())[name]["md5"]
