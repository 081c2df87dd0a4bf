"""export: deployable models (ONNX with dynamic batch, torch.export .pt2), each checked
against the eager model, a label map, the preprocessing config and a model card.

The stage fails when an exported model's logits on test images differ from PyTorch's by
more than ``export.tolerance``, or its test accuracy differs: a model that deploys
differently from how it was evaluated is worse than no model. The ONNX model, wrapped in the
pyfunc of :mod:`catdog.serving.pyfunc` (encoded images in, labels out), is then logged to MLflow and
registered (alias ``candidate``; ``champion`` moves only when the test accuracy beats the
current champion's on the same test images). Reduced-precision variants (``export.precision``) are
built and checked by :mod:`catdog.pipeline.variants`, the card written by :mod:`catdog.pipeline.model_card`.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from catdog import tracking
from catdog.core import atomic, reports
from catdog.core.errors import CatdogError
from catdog.core.params import Params
from catdog.core.paths import CLASSES_METADATA, PT2_EXTRA, Paths
from catdog.data import integrity
from catdog.data.dataset import CachedImages, Split, load_split, split_digest
from catdog.data.transforms import eval_preset
from catdog.models.device import eager_batch
from catdog.models.exported_program import export_program
from catdog.models.factory import load_checkpoint
from catdog.models.frozen import export_whole_model
from catdog.models.onnx_runtime import CACHE_OPSET, export_onnx
from catdog.pipeline import variants
from catdog.pipeline.model_card import model_card
from catdog.serving import pyfunc
from catdog.serving.predict import ExportedModel


def run(params: Params, paths: Paths) -> dict:
    p = params.export
    tracking.check_server(paths.root)
    integrity.verify(paths)
    model, config = load_checkpoint(paths.checkpoint)
    integrity.check_classes(config["classes"], paths, str(paths.checkpoint.relative_to(paths.root)))
    paths.exported.mkdir(parents=True, exist_ok=True)
    variants.clear(paths)
    size = config["image_size"]
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # saved in model.pt2
    if p.opset == CACHE_OPSET:  # the cached backbone graph and the head: seconds instead of a full export
        stamp = {CLASSES_METADATA: json.dumps(list(config["classes"]))}  # as stamp_classes writes it
        export_whole_model(model, config["arch"], size, paths.onnx_model, ("image", "logits"), stamp)
    else:
        export_onnx(model, example, paths.onnx_model, p.opset, names=("image", "logits"))
        stamp_classes(paths.onnx_model, config["classes"])
    program = export_pt2(model, example, paths.pt2_model, config["arch"])
    write_labels_and_preprocess(params, config, paths)
    exported = ExportedModel.load(paths.onnx_model)  # as `catdog predict` and the registered model load it
    integrity.check_classes(exported.classes, paths, str(paths.onnx_model.relative_to(paths.root)))

    test = load_split(paths, "test")
    results = check_parity(model, exported, program, paths, test, p.parity_images, p.tolerance)
    shipped = variants.build(params, paths, test, size)
    reports.write_json(paths.parity, {**results, "variants": shipped.figures})
    with tracking.stage_run(params, paths, "export") as mlflow_run:
        test_metrics = json.loads(paths.evaluate_metrics.read_text())
        card = model_card(params, config, test_metrics, results, paths)
        atomic.write_text(paths.model_card, f"{card}\n{variants.card_section(shipped)}\n")
        # model.onnx, model.pt2 (for predict --explain), labels and preprocessing live in the logged model
        mlflow_run.log_artifact(paths.model_card, "export")
        # dvc.lock as it stands now: every upstream stage's hashes (export's own entry lands after this)
        for lineage_file in (paths.params_file, paths.dvc_yaml, paths.dvc_lock):
            mlflow_run.log_artifact(lineage_file, "lineage")
        mlflow_run.log_metrics("export", {k: v for k, v in results.items() if k != "parity_images"})
        mlflow_run.log_metrics("export", variants.run_metrics(shipped))
        registry = register(mlflow_run, params, config["classes"], paths, test, test_metrics["accuracy"], shipped)
        precisions = ",".join(["fp32", *shipped.shipped])
        mlflow_run.log_facts({"parity_images": results["parity_images"], "precisions": precisions, **registry})
        results.update(registry)
    return results


def register(
    mlflow_run: tracking.Run,
    params: Params,
    classes: list[str],
    paths: Paths,
    test: Split,
    accuracy: float,
    shipped: variants.VariantReport,
) -> dict:
    """The ONNX model (and its shipped variants) as the run's pyfunc (catdog.serving.pyfunc), registered as
    ``export.registered_model_name`` (if set); the registry figures for the stage's results."""
    p = params.export
    score = tracking.Score(accuracy, split_digest(test))
    artifacts = {
        "onnx_model": paths.onnx_model,
        "pt2_model": paths.pt2_model,  # the differentiable copy `catdog predict --explain` needs
        "labels": paths.labels,
        "preprocess": paths.preprocess,
        "variants": paths.variants,
    }
    if "int8" in shipped.shipped:  # bf16 runs model.onnx: no file of its own
        artifacts["int8_model"] = paths.int8_model
    with tempfile.TemporaryDirectory() as scratch:
        classifier = pyfunc.pyfunc_model(
            artifacts,
            classes,
            example_jpeg(paths, test),
            Path(scratch),
        )
        with pyfunc.silent_loads():
            registration = mlflow_run.log_pyfunc_model(classifier, p.registered_model_name, score, p.promote_champion)
    if registration is None:
        return {}
    if registration.incomparable_champion:
        print(
            f"export: champion stays version {registration.incomparable_champion} of {p.registered_model_name}: "
            f"its test accuracy is not from these test images; to promote version {registration.version}, set its "
            "'champion' alias in the MLflow UI",
            file=sys.stderr,
        )
    return {"registered_version": registration.version, "promoted_champion": registration.promoted}


def check_parity(
    model: torch.nn.Module,
    exported: ExportedModel,
    program: torch.export.ExportedProgram,
    paths: Paths,
    test: Split,
    parity_images: int,
    tolerance: float,
) -> dict:
    """Logits and accuracy of the exported models (ONNX as predict loads it, the program model.pt2
    holds) vs eager PyTorch on the first test images (parity.json); CatdogError when one differs by
    more than ``tolerance``."""
    size = exported.image_size
    images = CachedImages(paths, test, eval_preset(size))
    count = min(len(images), parity_images)
    batch = torch.stack([images[i][0] for i in range(count)])
    targets = test.labels[:count]
    # channels-last input: PyTorch's CPU convolutions (eager and the program) run ~1.5x faster on it
    torch_batch = batch.contiguous(memory_format=torch.channels_last)
    eager = eager_logits(model, torch_batch)
    results = {"parity_images": count, "eager_accuracy": _accuracy(eager, targets)}
    for name, logits in (
        ("onnx", exported.runtime.logits(batch.numpy())),
        ("pt2", eager_logits(program.module(), torch_batch)),
    ):
        results[f"{name}_max_abs_diff"] = float(np.abs(logits - eager).max())
        results[f"{name}_accuracy"] = _accuracy(logits, targets)
        if results[f"{name}_max_abs_diff"] > tolerance or results[f"{name}_accuracy"] != results["eager_accuracy"]:
            reports.write_json(paths.parity, results)
            raise CatdogError(
                f"{name} parity check failed over {count} test images: max |logit diff| "
                f"{results[f'{name}_max_abs_diff']:.2e} (export.tolerance {tolerance:.0e}), accuracy "
                f"{results[f'{name}_accuracy']:.4f} vs eager {results['eager_accuracy']:.4f}"
            )
    results["onnx_mb"] = round(paths.onnx_model.stat().st_size / 2**20, 2)
    reports.write_json(paths.parity, results)
    return results


def stamp_classes(path: Path, classes: list[str]) -> None:
    """The class names into the ONNX model's own metadata (``metadata_props``, key
    ``predict.CLASSES_METADATA``, JSON in output order): the file names its outputs wherever it goes,
    and a labels.json beside it that names others is refused at load."""
    import onnx

    model = onnx.load(str(path))
    props = {entry.key: entry.value for entry in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, CLASSES_METADATA: json.dumps(list(classes))})
    with atomic.replacing(path) as temporary:
        onnx.save(model, str(temporary))


def write_labels_and_preprocess(params: Params, config: dict, paths: Paths) -> None:
    atomic.write_text(paths.labels, json.dumps({"classes": config["classes"]}, indent=2) + "\n")
    preprocess = {
        "cache_size": config["cache_size"],  # decode: EXIF-rotate, RGB, squash-resize (bilinear)
        "min_image_size": params.data.min_image_size,  # smaller images are refused, as prepare does
        "max_image_bytes": params.data.max_image_bytes,  # bigger files are refused (too_large), as prepare does
        "image_size": config["image_size"],  # then resize to the model input
        "layout": "NCHW",
        "dtype": "float32",
        "scale": [0.0, 1.0],
        "normalization": "inside the model",
    }
    atomic.write_text(paths.preprocess, json.dumps(preprocess, indent=2) + "\n")


def example_jpeg(paths: Paths, test: Split) -> bytes:
    """The registered model's input example: the first test image as a JPEG (cached decode, ~20 KB)."""
    pixels = np.load(paths.images, mmap_mode="r")[test.rows[0]]
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def export_pt2(model: torch.nn.Module, example: torch.Tensor, path: Path, arch: str) -> torch.export.ExportedProgram:
    """torch.export, loadable with ``torch.export.load`` alone; ``arch`` inside (``PT2_EXTRA``) for explanations.
    Returns the program saved (loaded from a file already: :mod:`catdog.models.exported_program`)."""
    program = export_program(model, example, {"images": {0: _batch_dim()}})  # traced once per architecture
    # to a file object: torch names the archive's records after a file name (here a temporary one)
    with atomic.replacing(path) as temporary, temporary.open("wb") as handle:
        torch.export.save(program, handle, extra_files={PT2_EXTRA: json.dumps({"arch": arch})})
    return program


def eager_logits(module: torch.nn.Module, batch: torch.Tensor) -> np.ndarray:
    """``module``'s logits over ``batch``, in the CPU's eager batches (catdog.models.device.eager_batch)."""
    size = eager_batch(torch.device("cpu"))
    with torch.inference_mode():
        return torch.cat([module(batch[start : start + size]) for start in range(0, len(batch), size)]).numpy()


def _accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    return float((logits.argmax(1) == targets).mean())


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=4096)
