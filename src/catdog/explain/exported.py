"""The exported model as a differentiable one, for ``catdog predict --explain``: ``model.pt2`` (torch.export),
unflattened so the layers of ``cam.TARGET_LAYERS`` are modules again, with its arch from the archive itself.

Why model.pt2 and not the ONNX file predict runs: ONNX Runtime computes no gradients. Why not the checkpoint:
a registered model (``models:/NAME@ALIAS``) carries no checkpoint, and ``model.pt2`` needs neither the training
code nor pickle (``torch.export.load``), so it ships among the registered model's artifacts as its one PyTorch
file, beside model.onnx.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from catdog.core.errors import CatdogError
from catdog.core.paths import PT2_EXTRA
from catdog.explain.cam import DEFAULT_METHOD, activation_maps, overlay, to_pixels


class Explainer:
    """Writes, per image, ``<name>.png`` (the map over the image) and ``<name>.npy`` (float32 HxW in [0, 1],
    the model input's size) into ``folder``; names are the inputs' stems, made unique in order."""

    def __init__(self, pt2: Path, folder: Path, method: str = DEFAULT_METHOD):
        if not pt2.is_file():
            raise CatdogError(f"{pt2.name} not found beside the model: explanations need it (dvc repro export)")
        extra = {PT2_EXTRA: ""}
        program = torch.export.load(str(pt2), extra_files=extra)
        if not extra[PT2_EXTRA]:
            raise CatdogError(f"{pt2} does not record its arch: export it again (dvc repro export)")
        self.arch = json.loads(extra[PT2_EXTRA])["arch"]
        self.module = torch.export.unflatten(program)
        self.folder, self.method = folder, method
        self._taken: set[str] = set()

    def __call__(self, files: list[Path], batch: np.ndarray, classes: list[int]) -> list[dict]:
        """``batch``: the model input of ``files`` (NCHW float32 in [0, 1]); one map each, for ``classes[i]``."""
        images = torch.from_numpy(batch)
        maps = activation_maps(self.module, self.arch, images, classes, self.method)
        self.folder.mkdir(parents=True, exist_ok=True)
        written = []
        for file, pixels, heatmap in zip(files, to_pixels(images), maps):
            name = self._unique(Path(file).stem)
            overlay_file, map_file = self.folder / f"{name}.png", self.folder / f"{name}.npy"
            Image.fromarray(overlay(pixels, heatmap)).save(overlay_file)
            np.save(map_file, heatmap.astype(np.float32))
            written.append({"overlay": str(overlay_file), "map": str(map_file)})
        return written

    def _unique(self, stem: str) -> str:
        name, number = stem, 1
        while name in self._taken:
            number += 1
            name = f"{stem}_{number}"
        self._taken.add(name)
        return name
