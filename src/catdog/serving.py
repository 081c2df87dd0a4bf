"""The registered model: an MLflow pyfunc that takes encoded images and answers cat or dog.

It wraps the exported ONNX model with the very preprocessing of ``catdog predict``
(:class:`catdog.predict.ExportedModel`), so ``mlflow.pyfunc.load_model("models:/catdog@champion")``
and ``mlflow models serve`` classify photos. Input: a DataFrame whose ``image`` column (or only
column) holds encoded images, as bytes or base64 strings. Output: one row per image with
``label``, ``p_cat``, ``p_dog`` and ``error`` (set, with the others empty, for an image that
cannot be used; the rest of the batch is still classified).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from catdog.images import BadImage
from catdog.predict import ExportedModel

IMAGE_COLUMN = "image"
BATCH_SIZE = 64


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """``artifacts``: ``onnx_model`` (model.onnx), with labels.json and preprocess.json beside it."""

    def load_context(self, context) -> None:
        self.model = ExportedModel.load(context.artifacts["onnx_model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        column = model_input[IMAGE_COLUMN] if IMAGE_COLUMN in model_input else model_input.iloc[:, 0]
        return classify(self.model, column.tolist())


def classify(model: ExportedModel, images: list[bytes | str]) -> pd.DataFrame:
    """One row per image: label and class probabilities, or an error."""
    rows = []
    for start in range(0, len(images), BATCH_SIZE):
        loaded = [_pixels(model, image) for image in images[start : start + BATCH_SIZE]]
        good = [i for i, item in enumerate(loaded) if isinstance(item, np.ndarray)]
        probabilities = dict(zip(good, model.probabilities(np.stack([loaded[i] for i in good])) if good else []))
        for i, item in enumerate(loaded):
            p = probabilities.get(i)
            rows.append(
                {
                    "label": model.classes[int(p.argmax())] if p is not None else None,
                    **{f"p_{name}": float(p[k]) if p is not None else np.nan for k, name in enumerate(model.classes)},
                    "error": None if p is not None else item,
                }
            )
    return pd.DataFrame(rows, columns=["label", *(f"p_{name}" for name in model.classes), "error"])


def _pixels(model: ExportedModel, image: bytes | str) -> np.ndarray | str:
    """The model input of one image, or why there is none."""
    try:
        data = base64.b64decode(image, validate=True) if isinstance(image, str) else image
        if not isinstance(data, (bytes, bytearray)):
            return f"not_an_image: expected bytes or a base64 string, got {type(image).__name__}"
        return model.preprocess(bytes(data))
    except binascii.Error:
        return "not_base64: a string must hold the base64-encoded image"
    except BadImage as exc:
        return str(exc)


def pyfunc_model(artifacts: dict[str, Path], classes: list[str], example_image: bytes) -> dict:
    """What ``mlflow.pyfunc.log_model`` needs to log it: ``artifacts`` (``onnx_model`` with the labels
    and preprocessing files beside it), the catdog code (so it loads where catdog is not installed),
    a signature, ``example_image`` as input example and pinned requirements."""
    return {
        "python_model": ImageClassifier(),
        "artifacts": {key: str(path) for key, path in artifacts.items()},
        "code_paths": [str(Path(__file__).parent)],
        "signature": signature(classes),
        "input_example": pd.DataFrame({IMAGE_COLUMN: [example_image]}),
        "pip_requirements": requirements(),
    }


def signature(classes: list[str]):
    """Encoded image in; label, one probability per class and an error out (all optional)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "label", required=False),
                *(ColSpec(DataType.double, f"p_{name}", required=False) for name in classes),
                ColSpec(DataType.string, "error", required=False),
            ]
        ),
    )


def requirements() -> list[str]:
    """What loading and serving it imports, pinned to the versions it was exported with."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in ("mlflow", "onnxruntime", "numpy", "pandas", "pillow")]
