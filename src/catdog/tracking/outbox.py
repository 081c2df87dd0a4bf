"""Tracking writes held back while the MLflow server is unreachable, kept on disk until sent.

One journal per run, ``<store root>/mlflow-outbox/<run id>.jsonl``: one JSON line per write
(``{"uri": tracking URI, "op": ..., "payload": {...}}``), in the order the stage made them. Files to log as artifacts
are copied beside the journal, because a later run may overwrite the originals. Replaying is
done by :mod:`catdog.tracking.writes`; this module only keeps the journal.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from catdog.core import atomic

try:
    import fcntl
except ImportError:  # Windows: no journal lock
    fcntl = None

DIRECTORY = "mlflow-outbox"


class Outbox:
    """The journal of one run's held-back writes."""

    def __init__(self, store_root: Path, run_id: str, uri: str):
        self.run_id, self.uri = run_id, uri
        self.journal = store_root / DIRECTORY / f"{run_id}.jsonl"
        self.files = self.journal.with_suffix("")  # artifacts, copied: the originals may change

    def add(self, op: str, payload: dict) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        if op == "artifact":
            copy = self.files / str(len(self._lines())) / Path(payload["path"]).name  # logged under its own name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(payload["path"], copy)
            payload = {**payload, "path": str(copy)}
        with self.locked(), self.journal.open("a") as out:
            out.write(self._line(op, payload))

    def ops(self) -> list[tuple[str, dict]]:
        return [(entry["op"], entry["payload"]) for entry in map(json.loads, self._lines())]

    def keep_only(self, ops: list[tuple[str, dict]]) -> None:
        """What is left to send after a partial replay; nothing left removes the journal and files."""
        if not ops:
            self.journal.unlink(missing_ok=True)
            shutil.rmtree(self.files, ignore_errors=True)
            return
        with atomic.replacing(self.journal) as temporary:
            temporary.write_text("".join(self._line(op, payload) for op, payload in ops))

    def summary(self) -> str:
        """What is held, in words: '12 metric values, 3 tags, 2 artifacts, the run's end'."""
        counts = Counter()
        for op, payload in self.ops():
            counts[op] += len(payload["metrics"]) if op == "metrics" else len(payload) if op in _COUNTED else 1
        return ", ".join(f"{counts[op]} {name}" for op, name in _NAMES.items() if counts[op]) or "nothing"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the journal (a stage adding, another process sending)."""
        if fcntl is None:
            yield
            return
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _line(self, op: str, payload: dict) -> str:
        return json.dumps({"uri": self.uri, "op": op, "payload": payload}) + "\n"

    def _lines(self) -> list[str]:
        return self.journal.read_text().splitlines() if self.journal.is_file() else []


_COUNTED = ("params", "tags")
_NAMES = {
    "metrics": "metric values",
    "params": "params",
    "tags": "tags",
    "artifact": "artifacts",
    "checkpoint": "checkpoint record",
    "end": "run end",
}


def pending(store_root: Path, uri: str) -> list[Outbox]:
    """The outboxes with writes still to send to ``uri``, oldest first."""
    journals = sorted((store_root / DIRECTORY).glob("*.jsonl"), key=lambda path: path.stat().st_mtime)
    outboxes = (Outbox(store_root, journal.stem, uri) for journal in journals)
    return [box for box in outboxes if (lines := box._lines()) and json.loads(lines[0])["uri"] == uri]
