"""export: ONNX model (dynamic batch) + label map + preprocessing config, parity-checked.

The stage fails when ONNX Runtime's logits on test images differ from PyTorch's by more
than ``export.tolerance``: a model that deploys differently from how it was evaluated is
worse than no model.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import torch

from catdog import tracking
from catdog.data import CachedImages, load_split
from catdog.errors import CatdogError
from catdog.models import load_checkpoint
from catdog.params import Params
from catdog.paths import Paths
from catdog.transforms import eval_preset

MODEL_FILE, LABELS_FILE, PREPROCESS_FILE = "model.onnx", "labels.json", "preprocess.json"
PARITY_IMAGES = 256


def run(params: Params, paths: Paths) -> dict:
    p = params.export
    model, config = load_checkpoint(paths.checkpoint)
    out = paths.exported
    out.mkdir(parents=True, exist_ok=True)
    onnx_file = out / MODEL_FILE

    example = torch.rand(2, 3, config["image_size"], config["image_size"])
    export_onnx(model, example, onnx_file, p.opset)

    test = load_split(paths, "test")
    images = CachedImages(paths, test, eval_preset(config["image_size"]))
    count = min(len(images), PARITY_IMAGES)
    batch = torch.stack([images[i][0] for i in range(count)])
    with torch.inference_mode():
        expected = model(batch).numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    max_abs_diff = float(np.abs(actual - expected).max())
    targets = test.labels[:count]
    results = {
        "parity_images": count,
        "max_abs_diff": max_abs_diff,
        "argmax_agreement": float((actual.argmax(1) == expected.argmax(1)).mean()),
        "onnx_accuracy": float((actual.argmax(1) == targets).mean()),
        "torch_accuracy": float((expected.argmax(1) == targets).mean()),
        "onnx_mb": round(onnx_file.stat().st_size / 2**20, 2),
    }
    paths.export_reports.mkdir(parents=True, exist_ok=True)
    (paths.export_reports / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    if max_abs_diff > p.tolerance:
        raise CatdogError(f"ONNX parity check failed: max |logit diff| {max_abs_diff:.2e} > "
                          f"export.tolerance {p.tolerance:.0e} over {count} test images")

    (out / LABELS_FILE).write_text(json.dumps({"classes": config["classes"]}, indent=2) + "\n")
    (out / PREPROCESS_FILE).write_text(json.dumps({
        "cache_size": config["cache_size"],  # decode: EXIF-rotate, RGB, squash-resize (bilinear)
        "image_size": config["image_size"],  # then resize to the model input
        "layout": "NCHW", "dtype": "float32", "scale": [0.0, 1.0],
        "normalization": "inside the model",
    }, indent=2) + "\n")

    with tracking.resume_run(paths.root, paths.evaluate_reports / "mlflow_run.json",
                             paths.export_reports / "mlflow_run.json", params.flat("export")) as mlflow_run:
        mlflow_run.log_metrics({f"export_{k}": v for k, v in results.items()})
        for name in (MODEL_FILE, LABELS_FILE, PREPROCESS_FILE):
            mlflow_run.log_artifact(out / name, "onnx")
        # dvc.lock as it stands now: every upstream stage's hashes (export's own entry lands after this)
        for name in ("params.yaml", "dvc.yaml", "dvc.lock"):
            mlflow_run.log_artifact(paths.root / name, "lineage")
    return results


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about its own internals
        program = torch.onnx.export(model.eval(), (example,), input_names=["image"], output_names=["logits"],
                                    dynamic_shapes={"images": {0: batch}}, opset_version=opset,
                                    dynamo=True, verbose=False)
    program.save(str(path))
