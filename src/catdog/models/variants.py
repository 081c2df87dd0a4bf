"""Reduced-precision variants of an exported classifier, and the CPU runtimes that run each precision.

- ``fp32``: ``model.onnx`` on ONNX Runtime (:func:`catdog.models.onnx_runtime.create_session`).
- ``int8``: ``model.int8.onnx``, ONNX Runtime's static quantisation (QDQ, per-channel int8 weights,
  uint8 activations whose ranges come from calibration images by min/max: the same images give the
  same bytes). Per-tensor weights would collapse the depthwise convolutions; per-channel does not.
  The head (after the last convolution) stays fp32, so nothing quantised depends on its weights: the
  quantised model is cached by everything else (``$CATDOG_CACHE/int8/``) and a model that differs
  only in its head (every trial of a head search) gets the cached one with its own head copied in.
- ``bf16``: the fp32 ``model.onnx`` compiled by OpenVINO's CPU plugin at bf16 inference precision.
  It has no file of its own: OpenVINO casts the weights when it compiles, and a saved IR would be a
  second copy of them. Only on a CPU with bf16 units (OpenVINO's ``OPTIMIZATION_CAPABILITIES``
  lists ``BF16``): elsewhere OpenVINO would quietly run fp32, which is not what export checked.

:func:`auto_order` ranks the precisions by what is fastest on this CPU (from /proc/cpuinfo's flags):
AMX runs bf16 fastest, VNNI int8; without either, fp32 (int8 without VNNI gains little and its
uint8 x int8 products can saturate).
"""

from __future__ import annotations

import functools
import hashlib
import platform
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from catdog.core import atomic
from catdog.core.errors import CatdogError
from catdog.core.paths import CLASSES_METADATA, cache_root
from catdog.models.onnx_runtime import create_session, usable_cores

PRECISIONS = ("fp32", "int8", "bf16")
INT8_VERSION = 1  # bump when how models are quantised changes: the cache key
CPUINFO = Path("/proc/cpuinfo")


class VariantUnavailable(CatdogError):
    """A variant that cannot run here: its file is missing or corrupted, or the CPU or runtime lacks it."""


@dataclass(frozen=True)
class Runtime:
    """One precision of the model, ready to run: ``logits(batch)`` for float32 NCHW batches."""

    precision: str
    logits: Callable[[np.ndarray], np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)  # the ONNX file's metadata_props
    outputs: int | None = None  # the logits' width, where the graph fixes it


def _cpuinfo(*keys: str) -> str:
    """The value of the first /proc/cpuinfo line starting with one of ``keys`` ("" where there is none)."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return ""
    return next((line.partition(":")[2].strip() for line in lines if line.startswith(keys)), "")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``flags`` on x86, ``Features`` on Arm)."""
    return frozenset(_cpuinfo("flags", "Features").split())


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (what timings are labelled with)."""
    return _cpuinfo("model name") or platform.machine()


@functools.cache
def openvino_capabilities() -> frozenset[str]:
    """What OpenVINO's CPU plugin says this CPU computes natively (``BF16``, ``INT8``...); empty when
    OpenVINO does not load."""
    try:
        import openvino

        return frozenset(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # not installed, or its plugin fails on this machine: no bf16 here
        return frozenset()


def auto_order(flags: frozenset[str] | None = None) -> list[str]:
    """The precisions fastest first on a CPU with ``flags`` (default: this one's), fp32 last.
    AMX tiles make bf16 the fastest (2.8x fp32 vs int8's 2.4x on a Xeon, docs/speed.md); with VNNI
    alone (e.g. AMD EPYC), int8 dot products run twice as wide as avx512_bf16's."""
    flags = cpu_flags() if flags is None else flags
    vnni = bool({"avx512_vnni", "avx_vnni", "asimddp"} & flags)  # asimddp: Arm's int8 dot product
    bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    order = []
    if "amx_bf16" in flags:
        order.append("bf16")
    if vnni:
        order.append("int8")
    if bf16 and "bf16" not in order:
        order.append("bf16")
    return [*order, "fp32"]


def quantize_int8(fp32_model: Path, path: Path, calibration: list[np.ndarray]) -> None:
    """``fp32_model`` quantised to int8 at ``path`` (static, QDQ, per-channel), its activation ranges
    from the ``calibration`` batches (float32 NCHW); the same model and batches give the same bytes.
    Quantised once per model-but-its-head and batches; hit or miss, ``path`` is the cached model with
    this model's head weights, so both give the same bytes."""
    import onnx

    model = onnx.load(str(fp32_model))
    head = head_weights(model)
    cached = cache_root() / "int8" / f"{_int8_key(model, head, calibration)}.onnx"
    if not cached.is_file():
        _quantize(fp32_model, cached, calibration)
    quantized = onnx.load(str(cached))
    kept = [tensor for tensor in quantized.graph.initializer if tensor.name in head]
    if len(kept) != len(head):  # the quantiser renamed or folded one: no head to swap in, quantise this model
        _quantize(fp32_model, path, calibration)
        return
    for tensor in kept:
        tensor.CopyFrom(head[tensor.name])
    with atomic.replacing(path) as temporary:
        onnx.save(quantized, str(temporary))


def head_weights(model) -> dict:
    """The initializers only the nodes after the last convolution read (the head's Linear): kept fp32
    by :func:`_quantize`, so the quantised model holds them unchanged, under the same names."""
    nodes = list(model.graph.node)
    cut = _head_start(nodes)
    before = {name for node in nodes[:cut] for name in node.input}
    after = {name for node in nodes[cut:] for name in node.input} - before
    return {tensor.name: tensor for tensor in model.graph.initializer if tensor.name in after}


def _int8_key(model, head: dict, calibration: list[np.ndarray]) -> str:
    import onnx
    import onnxruntime

    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for tensor in skeleton.graph.initializer:
        if tensor.name in head:  # their names, shapes and types stay in the key; their values do not
            for values in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
                tensor.ClearField(values)
    digest = hashlib.sha256(f"{INT8_VERSION} onnxruntime {onnxruntime.__version__}".encode())
    digest.update(skeleton.SerializeToString(deterministic=True))
    for batch in calibration:
        digest.update(np.ascontiguousarray(batch, dtype=np.float32).tobytes())
    return digest.hexdigest()[:24]


def _quantize(fp32_model: Path, path: Path, calibration: list[np.ndarray]) -> None:
    """ONNX Runtime's documented flow: its pre-processing (shape inference, graph clean-up) first."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = create_session(fp32_model).get_inputs()[0].name
    batches = iter(calibration)

    class Batches(CalibrationDataReader):
        def get_next(self) -> dict | None:
            batch = next(batches, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    with tempfile.TemporaryDirectory() as scratch, atomic.replacing(path) as temporary:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_model), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(temporary),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
            nodes_to_exclude=_name_head_nodes(prepared),
        )


def _head_start(nodes: list) -> int:
    """Where the head begins in a graph's nodes (topologically sorted, as ONNX requires): after the last
    convolution; no head without one."""
    convolutions = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    return convolutions[-1] + 1 if convolutions else len(nodes)


def _name_head_nodes(model_file: Path) -> list[str]:
    """The nodes after the last convolution (pooling, the head's Linear), named in ``model_file`` and
    kept fp32: a logistic head folds the features' standardisation into its weights (w / sigma), whose
    spread per class row int8 cannot hold (on the 10-class digits, int8 agreed with fp32 on 16% of the
    test images), and the head is a sliver of the compute."""
    import onnx

    model = onnx.load(str(model_file))
    nodes = list(model.graph.node)
    head = nodes[_head_start(nodes) :]
    for i, node in enumerate(head):
        node.name = node.name or f"catdog_head_{i}"
    onnx.save(model, str(model_file))
    return [node.name for node in head]


def runtime_version(precision: str) -> str:
    """The runtime that runs ``precision`` and its version: what its results depend on besides the model."""
    if precision == "bf16":
        import openvino

        return f"openvino {openvino.__version__}"
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def open_runtime(precision: str, model_file: Path) -> Runtime:
    """``precision`` of the model in ``model_file`` (its own file for int8, model.onnx otherwise);
    VariantUnavailable, in one line, when this machine cannot run it."""
    if precision == "bf16":
        return _openvino_bf16(model_file)
    try:
        session = create_session(model_file)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise VariantUnavailable(f"cannot load {model_file} as an ONNX model: {str(exc).splitlines()[0]}") from None
    input_name = session.get_inputs()[0].name
    width = session.get_outputs()[0].shape[-1]
    return Runtime(
        precision,
        lambda batch: session.run(None, {input_name: batch})[0],
        dict(session.get_modelmeta().custom_metadata_map),
        width if isinstance(width, int) else None,
    )


def _openvino_bf16(model_file: Path) -> Runtime:
    if "BF16" not in openvino_capabilities():
        raise VariantUnavailable("this CPU has no bf16 units (or OpenVINO does not load here)")
    try:
        import openvino

        core = openvino.Core()
        model = core.read_model(str(model_file))
        config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
        compiled = core.compile_model(model, "CPU", {**config, "INFERENCE_NUM_THREADS": usable_cores()})
    except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line report
        raise VariantUnavailable(f"OpenVINO cannot compile {model_file}: {str(exc).strip().splitlines()[0]}") from None
    request, lock = compiled.create_infer_request(), threading.Lock()  # a request serves one call at a time

    def logits(batch: np.ndarray) -> np.ndarray:
        with lock:
            return request.infer({0: batch})[0].copy()  # copy: the request reuses its output buffer

    metadata = {}
    if model.has_rt_info(["framework", CLASSES_METADATA]):  # OpenVINO keeps ONNX metadata_props there
        metadata[CLASSES_METADATA] = model.get_rt_info(["framework", CLASSES_METADATA]).astype(str)
    width = model.outputs[0].get_partial_shape()[-1]
    return Runtime(
        "bf16",
        logits,
        metadata,
        width.get_length() if width.is_static else None,
    )
