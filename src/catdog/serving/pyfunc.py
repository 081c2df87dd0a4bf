"""The registered model: an MLflow pyfunc that takes encoded images and answers their class.

It wraps the exported ONNX model with the very preprocessing of ``catdog predict``
(:class:`catdog.serving.predict.ExportedModel`), so ``mlflow.pyfunc.load_model("models:/catdog@champion")``
and ``mlflow models serve`` classify photos. Input: a DataFrame whose ``image`` column (or only
column) holds encoded images, as bytes or strict base64 strings. Output: one row per image with
``label``, ``p_<class>`` for each class (the names as in labels.json, verbatim) and ``error``
(``<cause>: <detail>``, with the others None, for an image that cannot be used; the rest of the
batch is still classified). Every column has object dtype, so a missing value stays None: the
scoring server writes it as JSON ``null`` (a float column would hold NaN, which it writes as the
invalid JSON ``NaN``).

The registered model is this file (MLflow's models from code): loading it runs this module, which
sets the model with ``mlflow.models.set_model``; nothing is pickled.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import modulefinder
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd

from catdog.data.images import BadImage
from catdog.serving import precision
from catdog.serving.predict import ExportedModel

IMAGE_COLUMN = "image"
BATCH_SIZE = 64
LOAD_LOG = logging.getLogger("catdog.registered_model")  # which precision a load chose


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """``artifacts``: ``onnx_model`` (model.onnx), with labels.json, preprocess.json, variants.json and
    the variants' files beside it. At load, the precision is ``$CATDOG_PRECISION`` or ``auto``: the
    fastest shipped variant this CPU runs (:mod:`catdog.serving.precision`); one line on stderr names it."""

    def load_context(self, context) -> None:
        asked = os.environ.get(precision.ENV) or "auto"
        self.model = ExportedModel.load(context.artifacts["onnx_model"], asked)
        _announce(f"catdog: the registered model runs {self.model.precision} ({precision.ENV}={asked})")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        column = model_input[IMAGE_COLUMN] if IMAGE_COLUMN in model_input else model_input.iloc[:, 0]
        return classify(self.model, column.tolist())


def _announce(line: str) -> None:
    """One line on stderr (a scoring server's log), through a logger: export silences it (``silent_loads``)."""
    if not LOAD_LOG.handlers:
        LOAD_LOG.addHandler(logging.StreamHandler(sys.stderr))
        LOAD_LOG.setLevel(logging.INFO)
        LOAD_LOG.propagate = False
    LOAD_LOG.info(line)


@contextlib.contextmanager
def silent_loads() -> Iterator[None]:
    """MLflow loads the model once while logging it (to check the input example): no load to announce.
    By the logger's name: that load runs a fresh copy of this file, not this module."""
    LOAD_LOG.disabled = True
    try:
        yield
    finally:
        LOAD_LOG.disabled = False


def classify(model: ExportedModel, images: list[bytes | str]) -> pd.DataFrame:
    """One row per image: label and class probabilities, or an error (the others None)."""
    columns = ["label", *probability_columns(model.classes), "error"]
    rows = []
    for start in range(0, len(images), BATCH_SIZE):
        loaded = [_pixels(model, image) for image in images[start : start + BATCH_SIZE]]
        good = [i for i, item in enumerate(loaded) if isinstance(item, np.ndarray)]
        probabilities = dict(zip(good, model.probabilities(np.stack([loaded[i] for i in good])) if good else []))
        for i, item in enumerate(loaded):
            p = probabilities.get(i)
            if p is None:
                rows.append([None] * (len(columns) - 1) + [item])
            else:
                rows.append([model.classes[int(p.argmax())], *(float(x) for x in p), None])
    return pd.DataFrame(rows, columns=columns, dtype=object)


def probability_columns(classes: list[str]) -> list[str]:
    return [f"p_{name}" for name in classes]


def _pixels(model: ExportedModel, image: bytes | str | None) -> np.ndarray | str:
    """The model input of one image, or why there is none (``<cause>: <detail>``)."""
    try:
        data = decode_base64(image) if isinstance(image, str) else image
        if isinstance(data, (bytes, bytearray)):
            return model.preprocess(bytes(data))
        if pd.api.types.is_scalar(data) and pd.isna(data):  # JSON null: None, or NaN/NA in a pandas column
            return "empty: no image in this row"
        return f"not_an_image: expected bytes or a base64 string, got {type(image).__name__}"
    except BadImage as exc:
        return str(exc)


def decode_base64(text: str) -> bytes:
    """Strict RFC 4648 base64 (standard alphabet, canonical padding); whitespace, such as the line
    breaks of ``base64`` without ``-w0``, carries no data and is dropped. BadImage ``not_base64`` else
    (MLflow's own decoding of a binary column drops every stray character: ``%%%%`` gave empty bytes)."""
    compact = "".join(text.split())
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):  # ValueError: a non-ASCII character
        data = None
    if data is None or base64.b64encode(data).decode("ascii") != compact:  # bad padding or trailing bits
        raise BadImage("not_base64", "a string must hold the base64-encoded image (standard alphabet, padded)")
    return data


def pyfunc_model(artifacts: dict[str, Path], classes: list[str], example_image: bytes, scratch: Path) -> dict:
    """What ``mlflow.pyfunc.log_model`` needs to log it: this file as the model's code, ``artifacts``
    (``onnx_model`` with the labels, preprocessing and variants files beside it, and ``int8_model`` if
    shipped; each file once), a copy of the catdog package made in ``scratch`` (so it loads where catdog
    is not installed), a signature, ``example_image`` as input example and pinned requirements (OpenVINO's
    too when a bf16 variant ships)."""
    variants = json.loads(Path(artifacts["variants"]).read_text())["variants"] if "variants" in artifacts else {}
    return {
        "python_model": __file__,
        "artifacts": {key: str(path) for key, path in artifacts.items()},
        "code_paths": [str(_copy_imported_code(scratch))],
        "signature": signature(classes),
        "input_example": pd.DataFrame({IMAGE_COLUMN: [example_image]}),
        "pip_requirements": requirements(bf16="bf16" in variants),
    }


def _copy_imported_code(scratch: Path) -> Path:
    """The catdog modules this file imports (lazy imports too), copied into ``scratch``: the model loads
    where catdog is not installed, and this file is stored once, as the model's code."""
    package = Path(__file__).resolve().parents[1]
    (scratch / "source").mkdir()
    (scratch / "source" / package.name).symlink_to(package)  # the finder sees catdog and nothing else
    finder = modulefinder.ModuleFinder(path=[str(scratch / "source")])
    finder.run_script(__file__)
    copy = scratch / "code"
    for module in finder.modules.values():
        if module.__file__ and module.__name__ != "__main__":
            relative = Path(module.__file__).relative_to(scratch / "source")
            (copy / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(module.__file__, copy / relative)
    return copy / package.name


def signature(classes: list[str]):
    """A base64 string (or, in process, bytes) in; label, one probability per class and an error out.

    The input is a ``string`` column, not ``binary``: the scoring server would decode a binary column
    itself, leniently (stray characters dropped), before the model could refuse it as ``not_base64``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "label", required=False),
                *(ColSpec(DataType.double, name, required=False) for name in probability_columns(classes)),
                ColSpec(DataType.string, "error", required=False),
            ]
        ),
    )


def requirements(bf16: bool = False) -> list[str]:
    """What loading and serving it imports, pinned to the versions it was exported with."""
    from importlib.metadata import version

    packages = ("mlflow", "onnxruntime", "numpy", "pandas", "pillow", *(("openvino",) if bf16 else ()))
    return [f"{package}=={version(package)}" for package in packages]


mlflow.models.set_model(ImageClassifier())  # what MLflow loads from this file (see the module docstring)
