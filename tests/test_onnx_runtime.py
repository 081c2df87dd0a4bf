"""Frozen inference on ONNX Runtime (catdog.models.onnx_runtime, catdog.models.frozen): equal to eager PyTorch,
exported once per (arch, size, weights) and found again by content hash, one tuned session."""

from __future__ import annotations

import os

import onnxruntime as ort
import pytest
import torch

from catdog.core.paths import cache_root
from catdog.models.device import resolve_runtime
from catdog.models.factory import create_model
from catdog.models.frozen import cached_activations, inference_module, split_for_training
from catdog.models.onnx_runtime import create_session, session_options

SIZE = 64


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return create_model("efficientnet_lite0", pretrained=True, image_size=SIZE).eval()


@pytest.fixture
def images():
    return torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode, trainable_blocks", [("features", 1), ("top", 1), ("top", 3)])
def test_frozen_part_on_onnx_runtime_equals_eager_pytorch(lite0, images, mode, trainable_blocks):
    frozen, rest = split_for_training(lite0, "efficientnet_lite0", SIZE, mode, trainable_blocks, resolve_runtime())
    assert frozen.onnx is not None  # a CPU: ONNX Runtime
    with torch.inference_mode():
        eager_prefix, _ = lite0.split(trainable_blocks if mode == "top" else 0)
        assert torch.allclose(frozen(images), eager_prefix(images), atol=1e-3)
        assert torch.allclose(rest(frozen(images)), lite0(images), atol=1e-3)
    assert not list(frozen.parameters())  # optimizers and state dicts never see it


def test_inference_module_equals_the_eager_model(lite0, images):
    module = inference_module(lite0, "efficientnet_lite0", SIZE, resolve_runtime())
    with torch.inference_mode():
        assert (module(images) - lite0(images)).abs().max() < 1e-3


def test_graph_is_exported_once_per_weights_and_reused(lite0, images):
    runtime = resolve_runtime()
    first, _ = split_for_training(lite0, "efficientnet_lite0", SIZE, "features", 1, runtime)
    path, mtime = first.onnx.path, first.onnx.path.stat().st_mtime_ns
    assert path.parent == cache_root() / "onnx" and str(cache_root()) == os.environ["CATDOG_CACHE"]
    again, _ = split_for_training(lite0, "efficientnet_lite0", SIZE, "features", 1, runtime)
    assert again.onnx.path == path and path.stat().st_mtime_ns == mtime  # found, not exported again

    other = create_model("efficientnet_lite0", pretrained=True, image_size=SIZE).eval()
    with torch.no_grad():
        other.backbone.net._conv_stem.weight.mul_(1.01)
    changed, _ = split_for_training(other, "efficientnet_lite0", SIZE, "features", 1, runtime)
    assert changed.onnx.path != path  # other weights: another graph
    with torch.inference_mode():
        assert torch.allclose(changed(images), other.embed(images), atol=1e-3)


def test_cached_activations_cover_every_image_in_order(lite0, images):
    frozen, _ = split_for_training(lite0, "efficientnet_lite0", SIZE, "features", 1, resolve_runtime())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(5)), batch_size=2)
    activations, labels = cached_activations(frozen, loader, desc="test")
    assert labels.tolist() == [0, 1, 2, 3, 4]
    with torch.inference_mode():
        assert torch.allclose(activations, lite0.embed(images), atol=1e-3)


def test_one_tuned_session_for_every_caller():
    options = session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == len(os.sched_getaffinity(0))
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    session = create_session(next((cache_root() / "onnx").glob("*.onnx")))
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_exporting_a_graph_draws_no_random_numbers():
    """Training must draw the same random numbers (head init, dropout) on a cache hit or miss."""
    from catdog.models.onnx_runtime import cached_graph

    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    cached_graph(module, (1, 3, 2, 2), "rng test")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.gpu
def test_on_cuda_the_frozen_part_stays_pytorch_with_autocast(lite0, images):
    import copy

    runtime = resolve_runtime()
    model = runtime.prepare_model(copy.deepcopy(lite0))
    frozen, rest = split_for_training(model, "efficientnet_lite0", SIZE, "top", 1, runtime)
    assert frozen.onnx is None
    batch = runtime.to_device(images)
    with torch.inference_mode(), runtime.autocast():
        logits = rest(frozen(batch)).float().cpu()
        reference = model(batch).float().cpu()
    assert torch.allclose(logits, reference, atol=5e-2)  # bf16
