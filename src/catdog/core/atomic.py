"""Writing a stage output all at once: to a temporary file beside it, renamed over it when complete.

A stage that fails midway (disk full, permission denied, a signal) then leaves each output as it
was before, never a truncated file that looks new (a 0-byte PNG, half a metrics.json).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; it replaces ``path`` when the block
    succeeds and is removed when it fails. Same folder (so the rename is atomic), same suffix (so
    writers that go by the suffix, like matplotlib, still do)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as temporary:
        temporary.write_text(text)
