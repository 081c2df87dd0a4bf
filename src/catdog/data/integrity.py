"""The content of ``data/prepared``: recorded by prepare, verified by every stage that reads it.

``manifest.csv`` holds every image's pixel md5 but not the decoded cache ``images.npy`` that
training reads: a cache overwritten or truncated after prepare would train silently on other
pixels under the same lineage. prepare records size and md5 of both files, and the class names
(in model output order), in ``content.json``;
train, evaluate and export verify them before reading (md5 runs at disk speed: seconds for
the full dataset's cache) and refuse a differing cache in one line. The md5 of that record is
the data hash of the MLflow lineage and of train's resume fingerprint.
"""

from __future__ import annotations

import hashlib
import json

from catdog.core import atomic
from catdog.core.errors import CatdogError
from catdog.core.paths import Paths

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
        if file_md5(path) != expected["md5"]:
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


def recorded_md5(paths: Paths, name: str) -> str:
    """The md5 prepare recorded for ``name`` (``images.npy``, ``manifest.csv``): a content key,
    trusted once ``verify`` has passed."""
    return json.loads(paths.prepared_content.read_text())[name]["md5"]
