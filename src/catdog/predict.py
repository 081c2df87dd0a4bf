"""Batch prediction through ONNX Runtime; imports no training code so it starts fast."""

from __future__ import annotations

import glob
import json
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from catdog.errors import CatdogError
from catdog.images import BadImage, decode_image, resize
from catdog.onnx_runtime import create_session, usable_cores
from catdog.paths import LABELS_FILE, ONNX_FILE, PREPROCESS_FILE, Paths, find_root

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
DEFAULT_MODEL = Paths(Path(".")).onnx_model  # relative to the project root


@dataclass(frozen=True)
class ExportedModel:
    session: object
    input_name: str
    classes: list[str]
    cache_size: int
    image_size: int
    min_image_size: int = 1  # prepare's data.min_image_size (exports before it was recorded: 1)

    @classmethod
    def load(cls, spec: str | Path) -> ExportedModel:
        """``spec``: an exported ``model.onnx`` (labels.json and preprocess.json beside it) or a
        registry URI such as ``models:/catdog@champion``."""
        path = _download_registered(str(spec)) if str(spec).startswith("models:/") else Path(spec)
        if not path.is_file():
            raise CatdogError(f"model {path} not found: run `dvc repro` first or pass --model")
        config = {}
        for name in (LABELS_FILE, PREPROCESS_FILE):
            # export writes them beside the model; a registered MLflow model keeps them in extra_files/
            found = [f for f in (path.parent / name, path.parent / "extra_files" / name) if f.is_file()]
            if not found:
                raise CatdogError(f"{name} not found beside {path}: the export stage writes it")
            config.update(json.loads(found[0].read_text()))
        try:
            session = create_session(path)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise CatdogError(f"cannot load {path} as an ONNX model: {str(exc).splitlines()[0]}") from None
        return cls(
            session,
            session.get_inputs()[0].name,
            config["classes"],
            config["cache_size"],
            config["image_size"],
            config.get("min_image_size", 1),
        )

    def preprocess(self, data: bytes) -> np.ndarray:
        """The same decode and checks as prepare (BadImage ``too_small`` below its minimum size),
        then the model's input size; CHW float32 in [0, 1]."""
        pixels = resize(decode_image(data, self.cache_size, self.min_image_size), self.image_size)
        return pixels.transpose(2, 0, 1).astype(np.float32) / 255.0

    def probabilities(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        probabilities = _softmax(self.session.run(None, {self.input_name: batch})[0])
        if tta:  # average with the left-right mirror image, as evaluate.tta does
            mirrored = np.ascontiguousarray(batch[..., ::-1])
            probabilities = (probabilities + _softmax(self.session.run(None, {self.input_name: mirrored})[0])) / 2
        return probabilities


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _download_registered(uri: str) -> Path:
    from catdog.tracking import download_registered_model  # imports mlflow: only for registry URIs

    store_root = find_root(Path.cwd()) or Path.cwd()  # the project's mlflow.db, from any subfolder
    folder = download_registered_model(uri, store_root)
    # the pyfunc of catdog.serving keeps it in artifacts/; versions registered before it, at the top
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


def predict(model: ExportedModel, files: Iterable[Path], batch_size: int = 16, tta: bool = False) -> Iterator[dict]:
    """One result per file, in order: {path, label, confidence} or {path, error}. Files decode in
    threads up to two batches ahead while ONNX Runtime runs the current one; at most those batches
    are held, so memory depends on the batch size, not on the number of files."""

    def load(path: Path):
        try:
            return model.preprocess(path.read_bytes())
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
            probs = model.probabilities(np.stack([batch[i][1] for i in good]), tta) if good else []
            by_index = dict(zip(good, probs))
            for i, (path, loaded) in enumerate(batch):
                if i in by_index:
                    p = by_index[i]
                    yield {
                        "path": str(path),
                        "label": model.classes[int(p.argmax())],
                        "confidence": round(float(p.max()), 6),
                    }
                else:
                    yield {"path": str(path), "error": loaded}


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
