"""The user's corrections to the source's labels, applied by prepare before any image is decoded.

``data.exclude`` is a CSV with the header ``path``: those images are left out (``excluded`` in
prepare's summary). ``data.relabel`` is a CSV with the header ``path,label``: those images get that
label instead of the source's. Paths are the manifest's ``path`` (what reports/audit/label_issues.csv
shows), so rows can be copied across. catdog never changes a label by itself. Both files are DVC deps
of prepare, so the committed defaults hold only their header (a missing file, possible outside DVC
only, corrects nothing and is said in one line). Every row is checked first: a path that
is no labelled image of the source, a label that is no class, a path in both files or relabelled twice,
or a file that is not such a CSV stops prepare in one line naming the file and line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from catdog.core.errors import CatdogError
from catdog.data.layouts import Candidate


@dataclass(frozen=True)
class Corrected:
    candidates: list[Candidate]
    excluded: int
    relabelled: int


def apply_corrections(
    candidates: list[Candidate], exclude_csv: Path, relabel_csv: Path, fixed_classes: list[str] | None
) -> Corrected:
    """``candidates`` less the excluded paths, with the relabelled ones' new labels. A new label must be
    one of ``fixed_classes`` (data.classes) or, when that is None, a class the source already has."""
    known = {candidate.path for candidate in candidates}
    classes = set(fixed_classes) if fixed_classes is not None else {candidate.label for candidate in candidates}
    excluded = {path for _, (path,) in _rows(exclude_csv, "data.exclude", ["path"], known)}
    relabelled: dict[str, str] = {}
    for line, (path, label) in _rows(relabel_csv, "data.relabel", ["path", "label"], known):
        where = f"data.relabel {relabel_csv} line {line}"
        if label not in classes:
            raise CatdogError(f"{where}: {label!r} is no class of the data (classes: {', '.join(sorted(classes))})")
        if path in excluded:
            raise CatdogError(f"{where}: {path} is excluded by data.exclude too: keep it in one of the two")
        if relabelled.setdefault(path, label) != label:
            raise CatdogError(f"{where}: {path} is relabelled twice, as {relabelled[path]!r} and {label!r}")
    kept = [
        replace(candidate, label=relabelled.get(candidate.path, candidate.label))
        for candidate in candidates
        if candidate.path not in excluded
    ]
    return Corrected(kept, len(excluded), len(relabelled))


def _rows(path: Path, key: str, header: list[str], known: set[str]) -> list[tuple[int, list[str]]]:
    """(line number, cells) of each non-empty row after the header; each names a labelled image."""
    what = f"{key} {path}"
    if not path.is_file():  # under DVC a missing dep stops `dvc repro` first; run from Python, none
        tqdm.write(f"prepare: {what} not found: no correction from it")
        return []
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CatdogError(f"{what} cannot be read as a UTF-8 CSV: {exc}") from None
    if not rows or [cell.strip() for cell in rows[0]] != header:
        raise CatdogError(f"{what}: the first row must be the header {','.join(header)}, got {rows[:1]}")
    found = []
    for line, row in enumerate(rows[1:], start=2):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if len(cells) != len(header) or not all(cells):
            raise CatdogError(f"{what} line {line}: expected {','.join(header)}, got {row}")
        if cells[0] not in known:
            raise CatdogError(f"{what} line {line}: {cells[0]} is no labelled image of data.source")
        found.append((line, cells))
    return found
