"""The frozen part of a model, run without gradients: ONNX Runtime on a CPU, PyTorch on CUDA.

``split_for_training`` cuts a ``Classifier`` into the frozen prefix (``FrozenPart``) and the rest
that trains; ``cached_activations`` runs the prefix once over a dataset so that epochs run only
the rest (``features`` mode, and ``head``/``top`` without augmentation); ``inference_module``
is the whole model for evaluate, with the backbone on ONNX Runtime on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from catdog.models.device import Runtime
from catdog.models.factory import Classifier
from catdog.models.onnx_runtime import OrtFunction, append_linear, cached_graph, graph_hash


class FrozenPart(nn.Module):
    """A frozen prefix as a function: on a CPU its cached ONNX graph on ONNX Runtime (fp32);
    elsewhere the PyTorch prefix under no_grad and the runtime's autocast and memory layout.
    It registers no parameters, so optimizers, DDP and state dicts never see it."""

    def __init__(self, prefix: nn.Module, runtime: Runtime, input_size: int, identity: tuple, whole_backbone: bool):
        super().__init__()
        self.runtime = runtime
        self._prefix = [prefix.eval()]  # a list: not registered as a submodule
        self.input_shape = (1, 3, input_size, input_size)
        self.identity = identity
        self.whole_backbone = whole_backbone  # its output: the pooled features (feature_cache keeps those)
        self.graph_hash = graph_hash(prefix, self.input_shape, *identity)  # arch, size and weights
        self._onnx = None  # the session starts on first use: a cached-features run never needs it

    @property
    def variant(self) -> str:
        """How it computes (a feature cache entry is only valid for the same): ONNX fp32 on a CPU."""
        return "onnx-fp32" if self.runtime.device.type == "cpu" else f"torch-{self.runtime.describe()}"

    @property
    def onnx(self) -> OrtFunction | None:
        if self._onnx is None and self.runtime.device.type == "cpu":
            graph = cached_graph(self._prefix[0], self.input_shape, *self.identity, known_hash=self.graph_hash)
            self._onnx = OrtFunction(graph)
        return self._onnx

    def train(self, mode: bool = True) -> FrozenPart:
        return super().train(False)  # BatchNorm statistics of a frozen part never move

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if (onnx := self.onnx) is not None:
            return onnx(images)
        with torch.no_grad(), self.runtime.autocast():
            return self._prefix[0](images)


def export_whole_model(
    model: Classifier, arch: str, image_size: int, path: Path, names: tuple[str, str], metadata: dict[str, str]
) -> None:
    """The classifier as one ONNX graph with ``metadata``: the backbone's cached graph (the one training
    ran) followed by the head's Linear layer: seconds, where a full export takes 15 s for Lite0."""
    prefix, _ = model.split(0)
    graph = cached_graph(prefix, (1, 3, image_size, image_size), *_identity(prefix, arch, image_size))
    linear = model.head[-1]
    weight, bias = (t.detach().cpu().float().numpy() for t in (linear.weight, linear.bias))
    append_linear(graph, weight, bias, path, names, metadata)


def _identity(prefix, arch: str, image_size: int) -> tuple:
    return (arch, image_size, len(prefix.stages))


def split_for_training(
    model: Classifier, arch: str, image_size: int, mode: str, trainable_blocks: int, runtime: Runtime
) -> tuple[FrozenPart | None, nn.Module]:
    """(frozen prefix or None, what trains after it): features/head freeze the whole backbone,
    top all but its last ``trainable_blocks`` blocks, full nothing."""
    if mode == "full":
        return None, model
    cut = trainable_blocks if mode == "top" else 0
    prefix, rest = model.split(cut)
    return FrozenPart(prefix, runtime, image_size, _identity(prefix, arch, image_size), whole_backbone=cut == 0), rest


@torch.inference_mode()
def cached_activations(frozen: FrozenPart, loader, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen part's outputs for every image of ``loader`` (on the CPU, float32) and the labels."""
    outputs, labels = [], []
    with tqdm(total=len(loader.dataset), desc=desc, unit="img", mininterval=1.0) as progress:
        for inputs, targets in _read_ahead(loader):
            outputs.append(frozen(frozen.runtime.to_device(inputs)).float().cpu())
            labels.append(targets)
            progress.update(len(targets))
    return torch.cat(outputs), torch.cat(labels)


def _read_ahead(loader) -> Iterator:
    """The loader's batches, the next one read in a thread while the caller runs this one:
    ONNX Runtime and torch's kernels release the GIL, so reading hides behind inference."""
    batches = iter(loader)
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(next, batches, None)
        while (batch := ahead.result()) is not None:
            ahead = pool.submit(next, batches, None)
            yield batch


def inference_module(model: Classifier, arch: str, image_size: int, runtime: Runtime) -> nn.Module:
    """The whole model for inference: on a CPU the backbone runs on ONNX Runtime, then the head."""
    if runtime.device.type != "cpu":
        return model
    frozen, rest = split_for_training(model, arch, image_size, "head", 0, runtime)
    return nn.Sequential(frozen, rest).eval()
