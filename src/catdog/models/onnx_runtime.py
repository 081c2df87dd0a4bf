"""ONNX Runtime for every forward pass that needs no gradient, on a CPU.

On a CPU, ONNX Runtime runs the frozen backbones 5-7x faster than eager PyTorch (fused
convolutions, no autograd bookkeeping). The frozen part of a model (``Classifier.embed``, or the
prefix of blocks that ``top`` mode keeps frozen) is exported to ONNX once per (architecture,
image size, weights) and cached by the content hash of those, outside the DVC outputs
(``$CATDOG_CACHE`` or ``~/.cache/catdog``), so every experiment with the same backbone reuses it.
CUDA keeps PyTorch (bf16 autocast, channels_last): ``FrozenPart.build`` picks.

One session factory (``create_session``) serves training, evaluate, export's parity check and
``catdog predict``: full graph optimisation, intra-op threads = the cores this process may use,
one inter-op thread, sequential execution (one batch at a time is the only workload).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from catdog.core import atomic
from catdog.core.paths import cache_root

GRAPH_VERSION = "2"  # bump when the exported graph changes for the same weights (model.onnx is built from it)


def usable_cores() -> int:
    """The cores this process may run on (CPU affinity, e.g. under taskset or a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = usable_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def create_session(model: str | Path | bytes) -> ort.InferenceSession:
    """The tuned CPU session every ONNX Runtime caller uses."""
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, session_options(), providers=["CPUExecutionProvider"])


CACHE_OPSET = 18  # of the cached frozen graphs


def export_onnx(
    module, example, path: Path, opset: int = CACHE_OPSET, names: tuple[str, str] = ("input", "output")
) -> None:
    """``module`` (in eval mode) to ONNX at ``path`` with a dynamic batch dimension and the given
    (input, output) names; written to a temporary file first, so a reader never sees half a model."""
    import inspect

    import torch

    module.eval()
    argument = next(iter(inspect.signature(module.forward).parameters))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about its own internals
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_shapes={argument: {0: batch}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    for node in program.model.graph.all_nodes():  # stack traces naming this machine's source paths
        node.metadata_props.clear()  # the same weights then give the same bytes anywhere
    with atomic.replacing(path) as temporary:
        program.save(str(temporary))


def append_linear(
    graph: Path,
    weight: np.ndarray,
    bias: np.ndarray,
    path: Path,
    names: tuple[str, str],
    metadata: dict[str, str] | None = None,
) -> None:
    """``graph`` (one input, one ``[batch, features]`` output) followed by ``x @ weight.T + bias``,
    saved at ``path`` with the given (input, output) names and ``metadata`` (the model's metadata_props)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(graph))
    body = model.graph
    old_input, old_output = body.input[0].name, body.output[0].name
    for node in body.node:
        node.input[:] = [names[0] if name == old_input else name for name in node.input]
    body.input[0].name = names[0]
    body.initializer.extend(
        numpy_helper.from_array(array, name) for array, name in ((weight, "head.weight"), (bias, "head.bias"))
    )
    body.node.append(helper.make_node("Gemm", [old_output, "head.weight", "head.bias"], [names[1]], transB=1))
    batch = body.output[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    del body.output[:]
    body.output.append(helper.make_tensor_value_info(names[1], onnx.TensorProto.FLOAT, [batch, weight.shape[0]]))
    onnx.checker.check_model(model)
    if metadata:
        onnx.helper.set_model_props(model, {**{e.key: e.value for e in model.metadata_props}, **metadata})
    with atomic.replacing(path) as temporary:
        onnx.save(model, str(temporary))


def content_hash(module, *identity) -> str:
    """sha256 of ``identity`` (arch, sizes, ...) and every tensor of ``module``'s state, in order."""
    digest = hashlib.sha256(repr((GRAPH_VERSION, *identity)).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def graph_hash(module, input_shape: tuple[int, ...], *identity) -> str:
    """The content hash that names frozen ``module``'s cached graph (and its cached features)."""
    return content_hash(module, tuple(input_shape[1:]), *identity)


def cached_graph(module, input_shape: tuple[int, ...], *identity, known_hash: str | None = None) -> Path:
    """The ONNX graph of frozen ``module`` for inputs of ``input_shape`` (batch dynamic), exported
    on first use and then found by content hash (``known_hash``: already computed by the caller)."""
    import torch

    path = cache_root() / "onnx" / f"{known_hash or graph_hash(module, input_shape, *identity)}.onnx"
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):  # training draws the same random numbers, cache hit or not
            export_onnx(module, torch.rand(2, *input_shape[1:]), path)
    return path


class OrtFunction:
    """A frozen module as a numpy/torch function run by ONNX Runtime."""

    def __init__(self, path: Path):
        self.path = path
        self.session = create_session(path)
        self.input_name = self.session.get_inputs()[0].name

    def numpy(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def __call__(self, batch):
        import torch

        return torch.from_numpy(self.numpy(batch.detach().cpu().numpy()))
