"""The training options of params.train: transfer modes, optimisation, schedules, stopping,
augmentation on the device."""

from __future__ import annotations

import csv
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from catdog.core.params import ParamsError, parse_params
from catdog.data.transforms import train_transforms
from catdog.models.architectures import ARCHITECTURES
from catdog.models.device import resolve_runtime
from catdog.models.engine import train_one_epoch
from catdog.models.factory import create_model
from catdog.models.optim import create_optimizer, create_scheduler
from catdog.pipeline import train, train_state

from conftest import client_for, prepared_project, repo_params_raw


def with_train(**values) -> dict:
    raw = repo_params_raw()
    raw["train"].update(values)
    return raw


# --- params ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"mode": "top", "unfreeze_blocks": 0}, r"train\.unfreeze_blocks must be greater than or equal to 1, got 0"),
        (
            {"mode": "full", "head_warmup_epochs": 30},
            r"train\.head_warmup_epochs must be below train\.epochs \(30\), got 30",
        ),
        ({"mode": "head", "head_warmup_epochs": 2}, r"train\.head_warmup_epochs must be 0 in 'head' mode"),
        ({"backbone_lr_factor": 0}, r"train\.backbone_lr_factor must be greater than 0, got 0"),
        ({"optimizer": "adam"}, r"train\.optimizer must be 'adamw' or 'sgd', got 'adam'"),
        ({"momentum": 1.0}, r"train\.momentum must be less than 1, got 1\.0"),
        ({"scheduler": "step"}, r"train\.scheduler must be 'onecycle' or 'cosine', got 'step'"),
        (
            {"scheduler": "cosine", "warmup_epochs": 30},
            r"train\.warmup_epochs must be below train\.epochs \(30\), got 30",
        ),
        ({"warmup_epochs": 2}, r"train\.warmup_epochs must be 0 with scheduler 'onecycle'"),
        ({"label_smoothing": 1.0}, r"train\.label_smoothing must be less than 1, got 1\.0"),
        ({"grad_clip_norm": 0}, r"train\.grad_clip_norm must be greater than 0, got 0"),
        ({"early_stopping_patience": 0}, r"train\.early_stopping_patience must be greater than or equal to 1, got 0"),
        ({"compile": "yes"}, r"train\.compile must be a valid boolean, got 'yes'"),
        ({"nproc": 0}, r"train\.nproc must be greater than or equal to 1, got 0"),
        ({"nproc": 2}, r"train\.nproc must be 1 in 'features' mode"),
        ({"log_every_n_steps": 0}, r"train\.log_every_n_steps must be greater than or equal to 1, got 0"),
    ],
)
def test_bad_training_options_are_rejected_by_name(values, expected):
    with pytest.raises(ParamsError, match=expected):
        parse_params(with_train(**values))


# --- models: the blocks 'top' mode unfreezes ---------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_blocks_cover_every_backbone_weight_once(arch):
    model = create_model(arch, pretrained=False, image_size=64)
    listed = [id(w) for block in model.blocks for w in block.parameters()]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(w) for w in model.backbone.parameters()}


def test_top_mode_unfreezes_the_last_blocks_only():
    model = create_model("simple_cnn", pretrained=False, image_size=32)
    model.freeze_backbone(except_last=1).train()
    first, last = model.blocks[0], model.blocks[-1]
    assert all(w.requires_grad for w in last.parameters()) and all(w.requires_grad for w in model.head.parameters())
    assert not any(w.requires_grad for w in first.parameters())
    batch_norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.training for m in batch_norms] == [False, False, False, True]  # frozen blocks keep their statistics
    model.unfreeze_backbone()
    assert all(w.requires_grad for w in model.parameters()) and all(m.training for m in batch_norms)


# --- the training loop -------------------------------------------------------------------------


def _one_batch_loader(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=generator), torch.tensor([0, 1] * 4))]


def _sgd_epoch(module: nn.Module, lr: float, **options):
    """One train_one_epoch over ``_one_batch_loader`` with plain SGD at a constant ``lr``, fp32."""
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return train_one_epoch(
        module, _one_batch_loader(), optimizer, scheduler, resolve_runtime("fp32"), None, "t", **options
    )


def test_grad_clip_norm_bounds_the_step():
    module = nn.Linear(4, 2)
    before = [w.detach().clone() for w in module.parameters()]
    _sgd_epoch(
        module, 1.0, criterion=lambda logits, targets: 100 * F.cross_entropy(logits, targets), grad_clip_norm=0.01
    )
    step = torch.cat([(w.detach() - b).flatten() for w, b in zip(module.parameters(), before)])
    assert step.norm().item() == pytest.approx(0.01, rel=1e-4)  # lr 1 x the clipped gradient norm


def test_label_smoothing_is_in_the_train_loss():
    module = nn.Linear(4, 2)
    inputs, targets = _one_batch_loader()[0]
    with torch.no_grad():
        expected = F.cross_entropy(module(inputs), targets, label_smoothing=0.2).item()
    steps = []
    stats = _sgd_epoch(module, 1e-3, criterion=nn.CrossEntropyLoss(label_smoothing=0.2), on_step=steps.append)
    assert stats.loss == pytest.approx(expected, rel=1e-6) and steps == [pytest.approx(expected, rel=1e-6)]
    with torch.no_grad():
        plain = F.cross_entropy(module(inputs), targets).item()
    assert abs(expected - plain) > 1e-3  # the smoothed loss is told apart from the plain one


def test_optimizer_groups_and_backbone_lr_factor():
    model = create_model("simple_cnn", pretrained=False, image_size=32)
    p = parse_params(
        with_train(
            mode="top",
            unfreeze_blocks=2,
            optimizer="sgd",
            momentum=0.8,
            lr=0.1,
            backbone_lr_factor=0.1,
            arch="simple_cnn",
            pretrained=False,
        )
    ).train
    optimizer = create_optimizer(model, p)
    assert isinstance(optimizer, torch.optim.SGD)
    head, backbone = optimizer.param_groups
    assert head["lr"] == 0.1 and backbone["lr"] == pytest.approx(0.01) and head["momentum"] == 0.8
    assert {id(w) for w in backbone["params"]} == {id(w) for b in model.blocks[-2:] for w in b.parameters()}


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    p = parse_params(with_train(scheduler="cosine", warmup_epochs=2, epochs=10, lr=0.1)).train
    optimizer = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=p.lr)
    scheduler = create_scheduler(optimizer, p, steps_per_epoch=5)
    lrs = []
    for _ in range(50):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:10] == pytest.approx([0.1 * (step + 1) / 10 for step in range(10)])
    assert max(lrs) == pytest.approx(0.1) and lrs[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[-1] < 0.001
    assert lrs[30] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))


def test_augmentation_on_the_device_draws_per_image():
    loader_side, on_device = train_transforms(32, augment=True, on_device=True)
    image = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    assert torch.equal(loader_side(image), image)  # the loader passes the cached uint8 image on
    torch.manual_seed(0)
    batch = resolve_runtime("fp32").to_device(torch.stack([image] * 8), on_device)
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.float32
    assert len({tuple(b.flatten()[:64].tolist()) for b in batch}) > 1  # each image its own crop / flip / jitter
    preset, none = train_transforms(32, augment=True, on_device=False)
    assert none is None and preset(image).shape == (3, 32, 32)


# --- whole runs --------------------------------------------------------------------------------------


@pytest.fixture
def small_project(tmp_path, mlflow_template):
    return prepared_project(
        tmp_path, mlflow_template, **{"data.cache_size": 32, "train.image_size": 32, "train.batch_size": 4}
    )


def test_top_mode_with_head_warm_up_trains_the_head_first_then_the_last_block(small_project, capsys, monkeypatch):
    paths, params = small_project
    p = params(
        **{
            "train.mode": "top",
            "train.arch": "simple_cnn",
            "train.pretrained": False,
            "train.epochs": 2,
            "train.head_warmup_epochs": 1,
            "train.backbone_lr_factor": 0.5,
            "train.lr": 0.01,
            "train.scheduler": "cosine",
            "train.optimizer": "sgd",
            "train.label_smoothing": 0.1,
            "train.grad_clip_norm": 1.0,
            "train.monitor": "val_accuracy",
        }
    )
    torch.manual_seed(p.train.seed)  # train seeds the same way before it builds the model
    initial = create_model("simple_cnn", pretrained=False, image_size=32).state_dict()
    saved_weights = []  # each epoch's weights, as the resumable state gets them
    save = train_state.save
    monkeypatch.setattr(
        train_state,
        "save",
        lambda path, state: (
            saved_weights.append({k: v.clone() for k, v in state["model"].items()}),
            save(path, state),
        ),
    )
    train.run(p, paths)
    assert "head warm-up over: from epoch 2 the backbone trains too" in capsys.readouterr().out
    history = list(csv.DictReader((paths.train_reports / "history.csv").open()))
    assert [float(r["lr_backbone"]) / float(r["lr"]) for r in history] == pytest.approx([0.5, 0.5])

    def changed(weights):  # layer numbers of the simple_cnn backbone whose weights or statistics moved
        return {
            k.split(".")[1] for k in weights if k.startswith("backbone.") and not torch.equal(weights[k], initial[k])
        }

    after_warm_up, after_epoch_2 = saved_weights[0], saved_weights[1]
    assert changed(after_warm_up) == set()
    assert not torch.equal(after_warm_up["head.1.weight"], initial["head.1.weight"])
    assert changed(after_epoch_2) == {"12", "13"}  # the last block's conv and BatchNorm only


def test_early_stopping_stops_when_the_monitor_stalls(small_project, capsys):
    paths, params = small_project
    # lr 1e-12 moves no float32 weight: val loss never improves after epoch 1
    p = params(
        **{
            "train.mode": "features",
            "train.epochs": 10,
            "train.lr": 1e-12,
            "train.early_stopping_patience": 2,
            "train.compile": True,
        }
    )
    metrics = train.run(p, paths)
    out = capsys.readouterr().out
    assert "early stop: val_loss has not improved for 2 epochs" in out
    assert "compile skipped: torch.compile is used on CUDA only" in out
    assert metrics["best_epoch"] == 1
    assert len(list(csv.DictReader((paths.train_reports / "history.csv").open()))) == 3
    run_id = torch.load(paths.train_state, weights_only=True)["run_id"]
    assert client_for(paths.root).get_run(run_id).data.tags["catdog.epochs_trained"] == "3"
