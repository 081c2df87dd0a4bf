"""Batch prediction through ONNX Runtime; imports no training code so it starts fast."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from catdog.errors import CatdogError
from catdog.images import BadImage, decode_image, resize

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
DEFAULT_MODEL = Path("models/export/model.onnx")


@dataclass(frozen=True)
class ExportedModel:
    session: object
    input_name: str
    classes: list[str]
    cache_size: int
    image_size: int

    @classmethod
    def load(cls, path: Path) -> "ExportedModel":
        import onnxruntime as ort

        if not path.is_file():
            raise CatdogError(f"model {path} not found: run `dvc repro` first or pass --model")
        try:
            labels = json.loads((path.parent / "labels.json").read_text())
            preprocess = json.loads((path.parent / "preprocess.json").read_text())
        except FileNotFoundError as exc:
            raise CatdogError(f"{exc.filename} not found: the export stage writes it beside {path.name}") from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return cls(session, session.get_inputs()[0].name, labels["classes"],
                   preprocess["cache_size"], preprocess["image_size"])

    def preprocess(self, data: bytes) -> np.ndarray:
        """The same decode as prepare, then the model's input size; CHW float32 in [0, 1]."""
        pixels = resize(decode_image(data, self.cache_size), self.image_size)
        return pixels.transpose(2, 0, 1).astype(np.float32) / 255.0

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: batch})[0]
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)


def expand_paths(paths: Iterable[str]) -> list[Path]:
    """Files as given; folders expand to the image files below them, sorted."""
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            files.append(path)
    return files


def predict(model: ExportedModel, files: list[Path], batch_size: int = 64) -> Iterator[dict]:
    """One result per file, in order: {path, label, confidence} or {path, error}."""

    def load(path: Path):
        try:
            return model.preprocess(path.read_bytes())
        except FileNotFoundError:
            return "no such file"
        except IsADirectoryError:
            return "is a directory"
        except PermissionError:
            return "permission denied"
        except BadImage as exc:
            return str(exc)

    with ThreadPoolExecutor() as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            loaded = list(pool.map(load, chunk))
            good = [i for i, item in enumerate(loaded) if isinstance(item, np.ndarray)]
            probs = model.probabilities(np.stack([loaded[i] for i in good])) if good else []
            by_index = dict(zip(good, probs))
            for i, path in enumerate(chunk):
                if i in by_index:
                    p = by_index[i]
                    yield {"path": str(path), "label": model.classes[int(p.argmax())],
                           "confidence": round(float(p.max()), 6)}
                else:
                    yield {"path": str(path), "error": loaded[i]}
