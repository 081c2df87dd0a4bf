"""Batch prediction through ONNX Runtime; imports no training code so it starts fast."""

from __future__ import annotations

import glob
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from catdog.core.errors import CatdogError
from catdog.core.paths import CLASSES_METADATA, LABELS_FILE, ONNX_FILE, PREPROCESS_FILE, Paths, find_root
from catdog.data.images import BadImage, check_size, decode_image, read_file, resize
from catdog.models.onnx_runtime import usable_cores
from catdog.models.variants import Runtime
from catdog.serving.precision import beside, choose_runtime

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
DEFAULT_MODEL = Paths(Path(".")).onnx_model  # relative to the project root


@dataclass(frozen=True)
class ExportedModel:
    runtime: Runtime  # the precision that runs: fp32 model.onnx, or a variant (catdog.models.variants)
    classes: list[str]  # labels.json: the model's output order
    cache_size: int
    image_size: int
    min_image_size: int = 1  # prepare's data.min_image_size (exports before it was recorded: 1)
    max_image_bytes: int | None = None  # data.max_image_bytes (exports before it was recorded: no cap)
    source: Path | None = None  # the model.onnx loaded: the exported folder's other files lie beside it

    @property
    def precision(self) -> str:
        return self.runtime.precision

    @classmethod
    def load(cls, spec: str | Path, precision: str = "fp32") -> ExportedModel:
        """``spec``: an exported ``model.onnx`` (labels.json, preprocess.json and variants.json beside it)
        or a registry URI such as ``models:/catdog@champion``; ``precision``: fp32, int8, bf16 or auto
        (:func:`catdog.serving.precision.choose_runtime`)."""
        path = _download_registered(str(spec)) if str(spec).startswith("models:/") else Path(spec)
        if not path.is_file():
            raise CatdogError(f"model {path} not found: run `dvc repro` first or pass --model")
        config = {}
        for name in (LABELS_FILE, PREPROCESS_FILE):
            found = beside(path, name)
            if found is None:
                raise CatdogError(f"{name} not found beside {path}: the export stage writes it")
            config.update(json.loads(found.read_text()))
        runtime = choose_runtime(path, precision)
        _check_classes(path, runtime, config["classes"])
        return cls(
            runtime,
            config["classes"],
            config["cache_size"],
            config["image_size"],
            config.get("min_image_size", 1),
            config.get("max_image_bytes"),
            path,
        )

    def read(self, path: Path) -> bytes:
        """A file's bytes; BadImage ``too_large`` over ``max_image_bytes``, before reading it."""
        return read_file(path, self.max_image_bytes) if self.max_image_bytes else path.read_bytes()

    def preprocess(self, data: bytes) -> np.ndarray:
        """The same decode and checks as prepare (BadImage ``too_large`` over its byte cap,
        ``too_small`` below its minimum size), then the model's input size; CHW float32 in [0, 1]."""
        if self.max_image_bytes:
            check_size(len(data), self.max_image_bytes)
        pixels = resize(decode_image(data, self.cache_size, self.min_image_size), self.image_size)
        return pixels.transpose(2, 0, 1).astype(np.float32) / 255.0

    def probabilities(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        probabilities = _softmax(self.runtime.logits(batch))
        if tta:  # average with the left-right mirror image, as evaluate.tta does
            mirrored = np.ascontiguousarray(batch[..., ::-1])
            probabilities = (probabilities + _softmax(self.runtime.logits(mirrored))) / 2
        return probabilities


def _check_classes(path: Path, runtime: Runtime, listed: list[str]) -> None:
    """Refuse a labels.json that does not name the model's outputs: other classes than the model's
    own metadata (export stamps them, ``CLASSES_METADATA``), or another number of them."""
    stamped = runtime.metadata.get(CLASSES_METADATA)
    if stamped is not None and json.loads(stamped) != list(listed):
        raise CatdogError(
            f"{path} was exported for classes {json.loads(stamped)}, its {LABELS_FILE} lists {list(listed)}: "
            "export it again (dvc repro export)"
        )
    width = runtime.outputs
    if width is not None and width != len(listed):
        raise CatdogError(
            f"{path} has {width} outputs, its {LABELS_FILE} lists {len(listed)} classes: "
            "export it again (dvc repro export)"
        )


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _download_registered(uri: str) -> Path:
    from catdog.tracking import download_registered_model  # imports mlflow: only for registry URIs

    store_root = find_root(Path.cwd()) or Path.cwd()  # the project's mlflow.db, from any subfolder
    folder = download_registered_model(uri, store_root)
    # the pyfunc of catdog.serving.pyfunc keeps it in artifacts/; versions registered before it, at the top
    return next(
        (f for f in (folder / "artifacts" / ONNX_FILE, folder / "model.onnx") if f.is_file()),
        folder / "artifacts" / ONNX_FILE,
    )


def expand_paths(paths: Iterable[str]) -> list[Path]:
    """Files as given; folders expand to the image files below them, globs to their matches."""
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif not path.exists() and glob.has_magic(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            files += [Path(m) for m in matches if Path(m).is_file()] or [path]
        else:
            files.append(path)
    return files


def predict(
    model: ExportedModel,
    files: Iterable[Path],
    batch_size: int = 16,
    tta: bool = False,
    top_k: int = 0,
    explain: Callable[[list[Path], np.ndarray, list[int]], list[dict]] | None = None,
    explain_class: int | None = None,
) -> Iterator[dict]:
    """One result per file, in order: {path, label, confidence} or {path, error}; with ``top_k``, also
    ``top_k``: the ``top_k`` most probable classes, best first (all of them when there are fewer); with
    ``explain`` (``catdog.explain.exported.Explainer``: files, their model input, the class of each -> what it
    wrote for each), also ``explanation``, for class ``explain_class`` or else the predicted one.
    Files decode in threads up to two batches ahead while ONNX Runtime runs the current one; at most
    those batches are held, so memory depends on the batch size, not on the number of files."""

    def load(path: Path):
        try:
            return model.preprocess(model.read(path))
        except FileNotFoundError:
            return "no such file" if not glob.has_magic(str(path)) else "no file matches this pattern"
        except IsADirectoryError:
            return "is a directory"
        except PermissionError:
            return "permission denied"
        except BadImage as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=usable_cores()) as pool:
        for batch in _decoded_ahead(files, load, batch_size, pool):
            good = [i for i, (_, item) in enumerate(batch) if isinstance(item, np.ndarray)]
            inputs = np.stack([batch[i][1] for i in good]) if good else None
            by_index = dict(zip(good, model.probabilities(inputs, tta) if good else []))
            if explain is not None and good:
                chosen = [explain_class if explain_class is not None else int(by_index[i].argmax()) for i in good]
                explained = dict(zip(good, explain([batch[i][0] for i in good], inputs, chosen)))
            for i, (path, loaded) in enumerate(batch):
                if i in by_index:
                    result = {"path": str(path), **_ranked(by_index[i], model.classes, top_k)}
                    yield {**result, "explanation": explained[i]} if explain is not None else result
                else:
                    yield {"path": str(path), "error": loaded}


def _ranked(probabilities: np.ndarray, classes: list[str], top_k: int) -> dict:
    result = {"label": classes[int(probabilities.argmax())], "confidence": round(float(probabilities.max()), 6)}
    if top_k:
        best = np.argsort(-probabilities, kind="stable")[:top_k]
        result["top_k"] = [{"label": classes[i], "probability": round(float(probabilities[i]), 6)} for i in best]
    return result


def _decoded_ahead(files: Iterable[Path], load, batch_size: int, pool: ThreadPoolExecutor):
    """Batches of (path, load(path)); the next batch is already decoding when one is handed out."""
    pending: deque = deque()
    remaining = iter(files)

    def submit_up_to(count: int) -> None:
        for path in islice(remaining, max(0, count - len(pending))):
            pending.append((path, pool.submit(load, path)))

    submit_up_to(2 * batch_size)
    while pending:
        batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
        submit_up_to(2 * batch_size)
        yield [(path, future.result()) for path, future in batch]
