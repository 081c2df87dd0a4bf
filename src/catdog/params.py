"""One typed, frozen view of params.yaml, validated before any stage does work.

Each section belongs to one stage (``data`` to prepare, ``train``, ``evaluate``,
``export``); ``tracking`` is read by every stage that logs to MLflow.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from catdog.errors import CatdogError


class ParamsError(CatdogError):
    """params.yaml is missing a key, has an unknown key, or holds a bad value."""


@dataclass(frozen=True)
class DataParams:
    source: str
    cache_size: int = 224
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42
    limit_per_class: int | None = None
    min_image_size: int = 32
    min_per_class: int = 10
    workers: int = 0  # 0: one process per CPU core

    def __post_init__(self):
        _check(self.cache_size >= 32, "data.cache_size", "must be at least 32", self.cache_size)
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _check(0 < value < 1, f"data.{name}", "must be between 0 and 1", value)
        _check(self.val_fraction + self.test_fraction < 0.9, "data.val_fraction + data.test_fraction",
               "must leave at least 10% for training", self.val_fraction + self.test_fraction)
        _check(self.limit_per_class is None or self.limit_per_class > 0, "data.limit_per_class",
               "must be a positive integer or null", self.limit_per_class)
        _check(self.min_image_size >= 1, "data.min_image_size", "must be >= 1", self.min_image_size)
        _check(self.min_per_class >= 3, "data.min_per_class", "must be >= 3 (one image per split)",
               self.min_per_class)
        _check(self.workers >= 0, "data.workers", "must be >= 0", self.workers)


@dataclass(frozen=True)
class TrainParams:
    arch: str = "efficientnet_lite0"
    weights: str | None = None  # local weights file for archs without a bundled one
    pretrained: bool = True
    image_size: int = 224
    mode: Literal["features", "head", "top", "full"] = "features"
    unfreeze_blocks: int = 1  # 'top' mode: how many of the backbone's last blocks train
    head_warmup_epochs: int = 0  # top/full: only the head trains for the first N epochs
    epochs: int = 30
    batch_size: int = 64
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    backbone_lr_factor: float = 1.0  # top/full: backbone lr = lr * factor
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    scheduler: Literal["onecycle", "cosine"] = "onecycle"  # stepped every batch
    warmup_epochs: int = 0  # cosine only: linear warm-up (onecycle warms up over 10% of the steps itself)
    label_smoothing: float = 0.0  # train loss only; val loss stays plain cross-entropy
    grad_clip_norm: float | None = None  # null: no clipping
    dropout: float = 0.2
    augment: bool = False
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"  # picks the epoch that is kept
    early_stopping_patience: int | None = None  # stop after N epochs without a better monitor; null: off
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False  # torch.compile, CUDA only
    seed: int = 42
    workers: int = 2
    nproc: int = 1  # > 1: the stage re-launches itself under torchrun, one DDP process each
    log_every_n_steps: int = 20  # step-level train loss to MLflow

    def __post_init__(self):
        from catdog.models import ARCHITECTURES  # late: models imports torch

        _check(self.arch in ARCHITECTURES, "train.arch", f"must be one of {sorted(ARCHITECTURES)}", self.arch)
        _check(self.image_size >= 32, "train.image_size", "must be at least 32", self.image_size)
        _check(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        _check(self.lr > 0, "train.lr", "must be > 0", self.lr)
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _check(0 <= self.dropout < 1, "train.dropout", "must be in [0, 1)", self.dropout)
        _check(self.workers >= 0, "train.workers", "must be >= 0", self.workers)
        _check(not (self.mode == "features" and self.augment), "train.augment",
               "must be false in 'features' mode (features are computed once); use mode 'head'", self.augment)
        _check(self.unfreeze_blocks >= 1, "train.unfreeze_blocks", "must be >= 1", self.unfreeze_blocks)
        _check(0 <= self.head_warmup_epochs < self.epochs, "train.head_warmup_epochs",
               f"must be >= 0 and below train.epochs ({self.epochs})", self.head_warmup_epochs)
        _check(self.head_warmup_epochs == 0 or self.mode in ("top", "full"), "train.head_warmup_epochs",
               f"must be 0 in '{self.mode}' mode (only the head trains anyway); use mode 'top' or 'full'",
               self.head_warmup_epochs)
        _check(self.backbone_lr_factor > 0, "train.backbone_lr_factor", "must be > 0", self.backbone_lr_factor)
        _check(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)", self.momentum)
        _check(0 <= self.warmup_epochs < self.epochs, "train.warmup_epochs",
               f"must be >= 0 and below train.epochs ({self.epochs})", self.warmup_epochs)
        _check(self.warmup_epochs == 0 or self.scheduler == "cosine", "train.warmup_epochs",
               "must be 0 with scheduler 'onecycle' (it warms up over the first 10% of the steps itself)",
               self.warmup_epochs)
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)", self.label_smoothing)
        _check(self.grad_clip_norm is None or self.grad_clip_norm > 0, "train.grad_clip_norm",
               "must be > 0 or null (no clipping)", self.grad_clip_norm)
        _check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
               "train.early_stopping_patience", "must be >= 1 or null (off)", self.early_stopping_patience)
        _check(self.nproc >= 1, "train.nproc", "must be >= 1", self.nproc)
        _check(self.nproc == 1 or self.mode != "features", "train.nproc",
               "must be 1 in 'features' mode (one process trains the head on cached embeddings)", self.nproc)
        _check(self.log_every_n_steps >= 1, "train.log_every_n_steps", "must be >= 1", self.log_every_n_steps)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 64
    tta: bool = False  # average with the horizontally flipped image
    calibration_bins: int = 10
    gallery_size: int = 16  # most confidently wrong test images shown

    def __post_init__(self):
        _check(self.batch_size >= 1, "evaluate.batch_size", "must be >= 1", self.batch_size)
        _check(self.calibration_bins >= 2, "evaluate.calibration_bins", "must be >= 2", self.calibration_bins)
        _check(self.gallery_size >= 1, "evaluate.gallery_size", "must be >= 1", self.gallery_size)


@dataclass(frozen=True)
class ExportParams:
    opset: int = 18
    tolerance: float = 1e-3  # max abs logit difference exported vs eager PyTorch
    parity_images: int = 256  # test images the exported models are checked on
    registered_model_name: str | None = "catdog"  # null: skip the model registry
    promote_champion: bool = True  # move alias 'champion' when test accuracy beats it

    def __post_init__(self):
        _check(self.opset >= 17, "export.opset", "must be >= 17", self.opset)
        _check(self.tolerance > 0, "export.tolerance", "must be > 0", self.tolerance)
        _check(self.parity_images >= 1, "export.parity_images", "must be >= 1", self.parity_images)


@dataclass(frozen=True)
class TrackingParams:
    experiment_name: str = "catdog"
    log_pytorch_model: bool = False  # train also logs the full PyTorch model (~15 MB per run)

    def __post_init__(self):
        _check(bool(self.experiment_name.strip()), "tracking.experiment_name", "must not be empty",
               self.experiment_name)


@dataclass(frozen=True)
class Params:
    data: DataParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    tracking: TrackingParams

    def flat(self, *sections: str) -> dict[str, object]:
        """``{"train.lr": 0.001, ...}`` for the given sections (all when none given)."""
        names = sections or tuple(f.name for f in dataclasses.fields(self))
        return {f"{name}.{key}": value
                for name in names
                for key, value in dataclasses.asdict(getattr(self, name)).items()}


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path} not found: run from the project root or pass --params") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    return parse_params(raw or {}, source=str(path))


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return _build(Params, raw, "")
    except ParamsError as exc:
        raise ParamsError(f"{source}: {exc}") from None


def _build(cls, raw, prefix: str):
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"unknown key {prefix}{unknown[0]} (known in {where}: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name not in raw:
            if field.default is dataclasses.MISSING:
                raise ParamsError(f"missing required key {prefix}{name}")
            continue
        values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
    return cls(**values)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ParamsError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    # YAML reads 1e-3 as a string; accept numbers written that way, nothing looser.
    if hint is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"{key} must be a finite number, got {value!r}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ParamsError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def _check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ParamsError(f"{key} {rule}, got {value!r}")
