"""export's reduced-precision variants (``export.precision``): built beside the fp32 ``model.onnx``,
each checked against fp32 on the whole test split and shipped only when it agrees. Each model runs
cut at its head: the backbone's activations over the split are cached (a trial that changes only the
head runs only the head again), and images/s are timed on the first test images with whole models.

A variant ships when its top-1 agreement with fp32 is at least ``export.variant_min_agreement`` and
its test accuracy at most ``export.variant_max_accuracy_drop`` below fp32's; else one line says why
and its file is removed (fp32 always ships). ``variants.json`` lists the shipped ones with each
file's md5 (what serving loads and checks); ``parity.json`` and the model card hold every variant's
agreement and accuracy. Images/s are timings: they go to MLflow and the git-ignored
``models/variant_speed.json``, never into a DVC output.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from catdog.core import reports
from catdog.core.params import Params
from catdog.core.paths import INT8_FILE, ONNX_FILE, Paths
from catdog.data import integrity
from catdog.data.dataset import CachedImages, Split, load_split
from catdog.data.transforms import eval_preset
from catdog.models.feature_cache import cached_features, feature_key
from catdog.models.head_split import split_at_head
from catdog.models.variants import (
    Runtime,
    VariantUnavailable,
    cpu_name,
    open_runtime,
    quantize_int8,
    runtime_version,
)
from catdog.pipeline.features import PRESET

BATCH_SIZE = 32  # test images per timed batch, each run by every precision in turn
TIMED_IMAGES = 16  # one batch of the first test images (after a warm-up one): each precision's images/s
CALIBRATION_BATCH = 16
VARIANT_FILES = {"fp32": ONNX_FILE, "int8": INT8_FILE, "bf16": ONNX_FILE}  # bf16: OpenVINO compiles the fp32 file


@dataclass
class VariantReport:
    figures: dict[str, dict] = field(default_factory=dict)  # per variant: agreement, accuracy, shipped, why not
    images_per_s: dict[str, float] = field(default_factory=dict)  # per precision, fp32 included: a timing
    shipped: list[str] = field(default_factory=list)


def build(params: Params, paths: Paths, test: Split, image_size: int) -> VariantReport:
    """The variants of ``export.precision``, checked on ``test``; variants.json and variant_speed.json."""
    p = params.export
    report = VariantReport()
    runtimes = {}
    for precision in p.precision:
        try:
            if precision == "int8":
                calibration = calibration_batches(paths, image_size, p.calibration_images)
                quantize_int8(paths.onnx_model, paths.int8_model, calibration)
            runtimes[precision] = open_runtime(precision, paths.exported / VARIANT_FILES[precision])
        except VariantUnavailable as exc:
            _skip(report, precision, f"not built: {exc}")
    if not runtimes:  # fp32 alone: nothing to check or time
        paths.int8_model.unlink(missing_ok=True)
        write_manifest(paths, [])
        return report
    runtimes = {"fp32": open_runtime("fp32", paths.onnx_model), **runtimes}
    images = CachedImages(paths, test, eval_preset(image_size))
    _, report.images_per_s = run_on_split(runtimes, Subset(images, range(min(len(images), TIMED_IMAGES))))
    identity = _images_identity(paths, test)
    files = {name: paths.exported / VARIANT_FILES[name] for name in runtimes}
    with tempfile.TemporaryDirectory() as scratch:  # each file cut once: fp32 and bf16 both run model.onnx
        cuts = {file: split_at_head(file, Path(scratch)) for file in set(files.values())}
        logits = {
            name: split_logits(name, file, cuts[file], images, image_size, identity) for name, file in files.items()
        }
    reference = logits.pop("fp32").argmax(1)
    fp32_accuracy = float((reference == test.labels).mean())
    for precision, values in logits.items():
        predicted = values.argmax(1)
        agreement, accuracy = float((predicted == reference).mean()), float((predicted == test.labels).mean())
        report.figures[precision] = {"agreement": agreement, "accuracy": accuracy, "fp32_accuracy": fp32_accuracy}
        why_not = _refusal(agreement, fp32_accuracy - accuracy, len(reference), p)
        if why_not:
            _skip(report, precision, f"not shipped: {why_not}")
        else:
            report.figures[precision]["shipped"] = True
            report.shipped.append(precision)
    if "int8" not in report.shipped:
        paths.int8_model.unlink(missing_ok=True)
    write_manifest(paths, report.shipped)
    _write_speed(paths, report.images_per_s, len(reference))
    return report


def clear(paths: Paths) -> None:
    """No variant of an earlier export: its variants.json would name another model.onnx's md5."""
    paths.variants.unlink(missing_ok=True)
    paths.int8_model.unlink(missing_ok=True)


def calibration_batches(paths: Paths, image_size: int, count: int) -> list[np.ndarray]:
    """``count`` train images (``export.calibration_images``), spread evenly over the train split."""
    train = load_split(paths, "train")
    images = CachedImages(paths, train, eval_preset(image_size))
    picks = np.unique(np.linspace(0, len(images) - 1, min(count, len(images))).astype(int))
    return [
        torch.stack([images[int(i)][0] for i in picks[start : start + CALIBRATION_BATCH]]).numpy()
        for start in range(0, len(picks), CALIBRATION_BATCH)
    ]


def split_logits(
    precision: str,
    model_file: Path,
    cut: tuple[Path, Path] | None,
    images: CachedImages,
    image_size: int,
    images_identity: str,
) -> np.ndarray:
    """``precision``'s logits of ``model_file`` over ``images``, as the backbone then the head it was
    ``cut`` into (catdog.models.head_split): the backbone's activations come from the feature cache, keyed
    by the backbone's bytes, the runtime and the images, so a model that differs only in its head runs
    only its head over the split. A graph that could not be cut (``cut`` None) runs whole."""
    if cut is None:
        return _batched(open_runtime(precision, model_file), images)
    backbone, head = cut
    variant = f"{precision} {runtime_version(precision)} {cpu_name()}"
    key = feature_key(integrity.file_md5(backbone), image_size, PRESET, variant, images_identity)
    features, _ = cached_features(key, len(images), lambda: _batched(open_runtime(precision, backbone), images))
    return open_runtime(precision, head).logits(features)


def _batches(images):
    """``images`` as float32 NCHW batches of ``BATCH_SIZE``, in order."""
    for start in range(0, len(images), BATCH_SIZE):
        yield torch.stack([images[i][0] for i in range(start, min(start + BATCH_SIZE, len(images)))]).numpy()


def _batched(runtime: Runtime, images: CachedImages) -> np.ndarray:
    return np.concatenate([runtime.logits(batch) for batch in _batches(images)])


def _images_identity(paths: Paths, test: Split) -> str:
    """Which images: images.npy's md5 and the test split's rows in it."""
    digest = hashlib.sha256(integrity.recorded_md5(paths, paths.images.name).encode())
    digest.update(np.ascontiguousarray(test.rows, dtype=np.int64).tobytes())
    return digest.hexdigest()


def run_on_split(runtimes: dict[str, Runtime], images) -> tuple[dict[str, np.ndarray], dict]:
    """Every runtime's logits over all ``images``, batch by batch in turn (the same batches, the same
    load on the machine), and each one's images/s (a first batch each, untimed, warms it up)."""
    logits: dict[str, list] = {name: [] for name in runtimes}
    seconds = dict.fromkeys(runtimes, 0.0)
    for index, batch in enumerate(_batches(images)):
        if index == 0:
            for runtime in runtimes.values():
                runtime.logits(batch)
        for name, runtime in runtimes.items():
            started = time.perf_counter()
            logits[name].append(runtime.logits(batch))
            seconds[name] += time.perf_counter() - started
    return {k: np.concatenate(v) for k, v in logits.items()}, {k: len(images) / s for k, s in seconds.items()}


def _refusal(agreement: float, accuracy_drop: float, count: int, p) -> str | None:
    # compared at report precision: the figures in parity.json are the ones the rule applies to
    if round(agreement, reports.DECIMALS) < p.variant_min_agreement:
        return (
            f"top-1 agreement with fp32 {agreement:.4f} over {count} test images "
            f"(export.variant_min_agreement {p.variant_min_agreement})"
        )
    if round(accuracy_drop, reports.DECIMALS) > p.variant_max_accuracy_drop:
        return (
            f"test accuracy {accuracy_drop * 100:.2f} points below fp32's "
            f"(export.variant_max_accuracy_drop {p.variant_max_accuracy_drop})"
        )
    return None


def _skip(report: VariantReport, precision: str, why: str) -> None:
    report.figures.setdefault(precision, {}).update({"shipped": False, "reason": why})
    print(f"export: {precision} variant {why}", file=sys.stderr)


def write_manifest(paths: Paths, shipped: list[str]) -> None:
    """variants.json: the file (beside model.onnx) and md5 of fp32 and each shipped variant, which serving checks."""
    files = {precision: VARIANT_FILES[precision] for precision in ["fp32", *shipped]}
    variants = {name: {"file": file, "md5": integrity.file_md5(paths.exported / file)} for name, file in files.items()}
    reports.write_json(paths.variants, {"variants": variants})


def _write_speed(paths: Paths, images_per_s: dict[str, float], images: int) -> None:
    speed = {"cpu": cpu_name(), "test_images": images, "images_per_s": images_per_s}
    paths.variant_speed.parent.mkdir(parents=True, exist_ok=True)
    paths.variant_speed.write_text(json.dumps(speed, indent=2) + "\n")


def run_metrics(report: VariantReport) -> dict[str, float]:
    """The MLflow run's ``export/<precision>_{agreement,accuracy,images_per_s}``."""
    metrics = {f"{name}_images_per_s": rate for name, rate in report.images_per_s.items()}
    for name, figures in report.figures.items():
        metrics.update({f"{name}_{key}": figures[key] for key in ("agreement", "accuracy") if key in figures})
    return metrics


def card_section(report: VariantReport) -> str:
    """The model card's table of variants: agreement and accuracy (images/s are timings: MLflow)."""
    if not report.figures:
        return "## Precision variants\nNone built (`export.precision: []`): `model.onnx` (fp32) only."
    rows = "\n".join(
        f"| {name} | `{VARIANT_FILES[name]}` | {_figure(f, 'agreement')} | {_figure(f, 'accuracy')} | "
        f"{'yes' if f.get('shipped') else 'no: ' + f.get('reason', '')} |"
        for name, f in report.figures.items()
    )
    return f"""## Precision variants (checked against fp32 on the whole test split)
| precision | file | top-1 agreement with fp32 | test accuracy | shipped |
|---|---|---|---|---|
{rows}

int8: ONNX Runtime (static QDQ, per-channel); bf16: OpenVINO's CPU plugin on `{ONNX_FILE}`, where the CPU
has bf16 units. `catdog predict --precision auto` and the registered model run the fastest shipped one
this CPU runs; images/s per precision are in the MLflow run (`export/<precision>_images_per_s`)."""


def _figure(figures: dict, key: str) -> str:
    return f"{figures[key]:.4f}" if key in figures else "-"
