"""Which precision of an exported model runs here: the one asked for, or (``auto``) the fastest
variant that passed export's check against fp32 and that this CPU runs; fp32 is always there.

The shipped variants are those in ``variants.json`` beside ``model.onnx`` (export writes it with each
file's md5). A variant whose file is missing or differs from its md5, or that this machine cannot
run (no bf16 units, OpenVINO missing), is refused in one line on stderr and the next one is used.
Asking for a variant the model does not have is an error (``catdog predict`` exits 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from catdog.core.errors import CatdogError
from catdog.core.paths import VARIANTS_FILE
from catdog.data.integrity import file_md5
from catdog.models.variants import PRECISIONS, Runtime, VariantUnavailable, auto_order, open_runtime

CHOICES = ("auto", *PRECISIONS)
ENV = "CATDOG_PRECISION"  # the registered model's choice at load time (auto when unset)


def beside(model_file: Path, name: str) -> Path | None:
    """A file export writes beside ``model_file``; a registered MLflow model may keep it in extra_files/."""
    return next((f for f in (model_file.parent / name, model_file.parent / "extra_files" / name) if f.is_file()), None)


def shipped_variants(model_file: Path) -> dict[str, dict]:
    """``{precision: {"file": ..., "md5": ...}}`` from variants.json, fp32's model.onnx included (empty
    for exports made before it)."""
    manifest = beside(model_file, VARIANTS_FILE)
    return json.loads(manifest.read_text())["variants"] if manifest else {}


def choose_runtime(model_file: Path, precision: str) -> Runtime:
    """The runtime of ``precision`` (one of ``CHOICES``) for the model exported at ``model_file``."""
    if precision not in CHOICES:
        raise CatdogError(f"precision {precision!r} is none of {', '.join(CHOICES)}")
    shipped = shipped_variants(model_file)
    if "fp32" in shipped:  # the model itself, as export wrote it, or no model at all
        verified(model_file.parent, shipped["fp32"], f"cannot load {model_file} as an ONNX model")
    if precision not in ("auto", "fp32", *shipped):
        have = ", ".join(dict.fromkeys(["fp32", *shipped]))
        raise CatdogError(f"{model_file} has no {precision} variant (it has {have}): use one of those, or auto")
    order = auto_order() if precision == "auto" else [precision, *auto_order()]
    faster = [p for p in dict.fromkeys(order[: order.index("fp32")]) if p in shipped]  # those before fp32 here
    for candidate, following in zip(faster, [*faster[1:], "fp32"]):
        try:
            return open_runtime(candidate, verified(model_file.parent, shipped[candidate]))
        except VariantUnavailable as exc:
            print(f"catdog: {candidate} variant refused: {exc}; using {following}", file=sys.stderr)
    return open_runtime("fp32", model_file)  # unloadable: a one-line CatdogError, as ever


def verified(folder: Path, entry: dict, context: str | None = None) -> Path:
    """The file of ``entry`` in ``folder``, as export wrote it (its md5 in variants.json); else
    VariantUnavailable, its message after ``context`` if given."""
    path = folder / entry["file"]
    problem = None
    if not path.is_file():
        problem = f"{path} is missing"
    elif file_md5(path) != entry["md5"]:
        problem = f"{path} differs from what export wrote (md5 in {VARIANTS_FILE}): corrupted"
    if problem:
        raise VariantUnavailable(f"{context}: {problem}" if context else problem)
    return path
