"""On CUDA (marked gpu: conftest skips these without it): mixed precision, channels_last,
augmentation on the GPU, the fp16 + GradScaler path, torch.compile and DDP over two GPUs,
all through the real train stage."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from catdog.core.paths import Paths
from catdog.models.device import Runtime, resolve_runtime
from catdog.models.factory import create_model, load_checkpoint
from catdog.pipeline import train

from conftest import REPO_ROOT, client_for, prepared_project

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu_project(tmp_path, mlflow_template):
    """10 + 10 images prepared at 64 px, with a store; ``params(**overrides)`` for full mode on it."""
    return prepared_project(
        tmp_path,
        mlflow_template,
        **{
            "train.mode": "full",
            "train.epochs": 1,
            "train.batch_size": 4,
            "train.lr": 0.001,
            "train.augment": True,
            "train.workers": 2,
        },
    )


def _trained(paths: Paths, metrics: dict) -> tuple[dict, dict]:
    """(the finished run's tags, the final training state) after checking the run is sound."""
    assert math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["train_loss"])
    state = torch.load(paths.train_state, map_location="cpu", weights_only=True)
    assert state["complete"]
    model, _ = load_checkpoint(paths.checkpoint)
    assert all(torch.isfinite(w).all() for w in model.state_dict().values() if w.is_floating_point())
    pretrained = create_model("efficientnet_lite0", pretrained=True, image_size=64).backbone.state_dict()
    assert any(not torch.equal(w, pretrained[k]) for k, w in model.backbone.state_dict().items())  # full mode
    return client_for(paths.root).get_run(state["run_id"]).data.tags, state


def test_full_mode_trains_with_bf16_autocast_and_channels_last(gpu_project):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16: the fp16 test covers it")
    paths, params = gpu_project
    runtime = resolve_runtime("auto")
    assert (runtime.device.type, runtime.amp_dtype, runtime.channels_last) == ("cuda", torch.bfloat16, True)
    assert not runtime.needs_grad_scaler
    model = runtime.prepare_model(create_model("efficientnet_lite0", pretrained=False, image_size=64))
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with runtime.autocast():
        assert model(runtime.to_device(torch.rand(2, 3, 64, 64))).dtype == torch.bfloat16

    tags, state = _trained(paths, train.run(params(), paths))
    assert tags["catdog.runtime"] == "cuda bfloat16 channels_last"
    assert state["scaler"] is None  # bf16 needs no loss scaling


def test_forced_fp16_trains_with_a_grad_scaler(gpu_project, monkeypatch):
    paths, params = gpu_project
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # as on a pre-Ampere GPU
    runtime = resolve_runtime("auto")
    assert runtime.amp_dtype == torch.float16 and runtime.needs_grad_scaler

    # clipping too: it must unscale the gradients first
    tags, state = _trained(paths, train.run(params(**{"train.grad_clip_norm": 1.0}), paths))
    assert tags["catdog.runtime"] == "cuda float16 channels_last"
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0


def test_compile_on_cuda(gpu_project, capsys):
    paths, params = gpu_project
    metrics = train.run(
        params(**{"train.arch": "simple_cnn", "train.pretrained": False, "train.epochs": 2, "train.compile": True}),
        paths,
    )
    assert "compile skipped" not in capsys.readouterr().out
    assert math.isfinite(metrics["val_loss"])


def test_ddp_over_two_gpus(gpu_project):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    paths, params = gpu_project
    p = params(**{"train.nproc": 2, "train.epochs": 2})
    (paths.root / "params.yaml").write_text(yaml.safe_dump(p.model_dump(), sort_keys=False))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "stages" / "train.py"),
            "--params",
            str(paths.root / "params.yaml"),
            "--root",
            str(paths.root),
        ],
        cwd=paths.root,
        env={**os.environ, "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client = client_for(paths.root)
    (run,) = client.search_runs([client.get_experiment_by_name("catdog").experiment_id])
    assert run.data.tags["catdog.processes"] == "2" and run.data.tags["catdog.runtime"].startswith("cuda")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/loss")) == [1, 2]


def test_evaluate_scores_in_fp32_like_the_deployed_onnx_model(gpu_project):
    """The champion is chosen on evaluate's numbers: on CUDA they must be fp32 (no bf16 autocast,
    no TF32), i.e. what the fp32 ONNX model computes on a CPU."""
    from catdog.data.dataset import CachedImages, load_split, make_loader
    from catdog.data.transforms import eval_preset
    from catdog.models.engine import predict_probabilities
    from catdog.pipeline import evaluate

    runtime = resolve_runtime("fp32")
    assert (runtime.device.type, runtime.amp_dtype) == ("cuda", None)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32

    paths, params = gpu_project
    p = params(**{"train.mode": "head", "train.augment": False})
    train.run(p, paths)
    evaluate.run(p, paths)
    with (paths.evaluate_reports / "predictions.csv").open() as handle:
        on_gpu = [float(row["prob_dog"]) for row in csv.DictReader(handle)]

    model, config = load_checkpoint(paths.checkpoint)
    test = load_split(paths, "test")
    loader = make_loader(CachedImages(paths, test, eval_preset(config["image_size"])), 8, 0)
    cpu = Runtime(torch.device("cpu"), amp_dtype=None, channels_last=False)
    on_cpu, _ = predict_probabilities(model.cpu(), loader, cpu, tta=False, desc="cpu")
    assert on_gpu == pytest.approx(on_cpu[:, 1].tolist(), abs=1e-4)
