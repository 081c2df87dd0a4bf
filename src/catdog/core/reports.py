"""The one writer of the JSON and CSV reports the stages leave for DVC and git.

The same figures always give the same bytes: floats rounded to ``DECIMALS``, keys sorted, one
newline at the end. Four decimals keep every figure's meaning (0.01 percentage point of accuracy)
while the last-digit differences of ONNX Runtime/oneDNN between CPU models (about 1e-6, seen in
2 of 525 values of predictions.csv between an Intel Xeon and an AMD EPYC) almost never reach them.
A file is written to a temporary sibling and renamed into place, so a killed stage never leaves
half a report. Values that differ per run or per machine (timings, hostnames,
run ids, registry versions) do not belong here: they go to MLflow.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from catdog.core import atomic

DECIMALS = 4


def rounded(value):
    """``value`` with every float (numpy ones too) rounded to ``DECIMALS``, recursively."""
    if isinstance(value, dict):
        return {str(k): rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, float):
        return value if not math.isfinite(value) else round(value, DECIMALS) + 0.0  # + 0.0: no "-0.0"
    return value


def write_json(path: Path, data: dict) -> None:
    _write_atomic(path, json.dumps(rounded(data), indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rounded(list(row)) for row in rows)
    _write_atomic(path, buffer.getvalue())


def _write_atomic(path: Path, text: str) -> None:
    atomic.write_text(path, text)
