"""One typed, frozen view of params.yaml, validated before any stage does work.

params.yaml is the single source of every value: no key has a default here, so a missing key
is an error, like an unknown key or a bad value, each reported in one line naming the key, the
value and what is allowed. Each section belongs to one stage (``data`` to prepare, ``audit``, ``train``,
``evaluate``, ``export``); ``tracking`` is read by every stage that logs to MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from catdog.core.errors import CatdogError


class ParamsError(CatdogError):
    """params.yaml is missing a key, has an unknown key, or holds a bad value."""


def _yaml_number(value):
    """YAML 1.1 reads ``1e-3`` as a string: accept numbers written that way, nothing looser."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


Float = Annotated[float, BeforeValidator(_yaml_number)]


def _check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"{key} {rule}, got {value!r}")


class _Section(BaseModel):
    # strict: no 1 -> True, no "10" -> 10, no 2.5 -> 2; ints are accepted as floats
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class DataParams(_Section):
    source: str
    labels: str | None  # a path,label CSV inside the source; null: labels from names or folders
    classes: list[str] | None  # fixed classes in output order; null: every class found, sorted
    cache_size: int = Field(ge=32)
    val_fraction: Float = Field(gt=0, lt=1)
    test_fraction: Float = Field(gt=0, lt=1)
    seed: int
    limit_per_class: int | None = Field(gt=0)
    min_image_size: int = Field(ge=1)
    min_per_class: int = Field(ge=3)  # one image per split
    workers: int = Field(ge=0)  # 0: one process per CPU core
    max_image_bytes: int = Field(ge=1)  # larger files are rejected before they are read
    exclude: str = Field(pattern=r"\S")  # a `path` CSV of images left out (a DVC dep: a file, header-only for none)
    relabel: str = Field(pattern=r"\S")  # a `path,label` CSV of corrected labels (likewise)

    @field_validator("classes")
    @classmethod
    def _distinct_names(cls, classes: list[str] | None) -> list[str] | None:
        if classes is not None:
            _check(len(classes) >= 2, "data.classes", "must name at least two classes", classes)
            _check(all(name.strip() for name in classes), "data.classes", "must not hold empty names", classes)
            _check(len(set(classes)) == len(classes), "data.classes", "must not repeat a name", classes)
        return classes

    @model_validator(mode="after")
    def _leaves_training_data(self):
        total = self.val_fraction + self.test_fraction
        _check(total < 0.9, "data.val_fraction + data.test_fraction", "must leave at least 10% for training", total)
        return self


class TrainParams(_Section):
    arch: str
    weights: str | None  # local weights file for archs without a bundled one
    pretrained: bool
    image_size: int = Field(ge=32)
    mode: Literal["features", "head", "top", "full"]
    unfreeze_blocks: int = Field(ge=1)  # 'top' mode: how many of the backbone's last blocks train
    head_warmup_epochs: int = Field(ge=0)  # top/full: only the head trains for the first N epochs
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    optimizer: Literal["adamw", "sgd"]
    lr: Float = Field(gt=0)
    backbone_lr_factor: Float = Field(gt=0)  # top/full: backbone lr = lr * factor
    momentum: Float = Field(ge=0, lt=1)  # sgd only
    weight_decay: Float = Field(ge=0)
    scheduler: Literal["onecycle", "cosine"]  # stepped every batch
    warmup_epochs: int = Field(ge=0)  # cosine only (onecycle warms up over 10% of the steps itself)
    label_smoothing: Float = Field(ge=0, lt=1)  # train loss only; val loss stays plain cross-entropy
    class_weights: Literal["balanced"] | None  # inverse-frequency loss weights; val loss stays unweighted
    grad_clip_norm: Float | None = Field(gt=0)  # null: no clipping
    dropout: Float = Field(ge=0, lt=1)
    # logistic: features mode, standardised L2 logistic regression; auto: logistic in features mode, else gradient
    head: Literal["auto", "gradient", "logistic"]
    logistic_c: Literal["auto"] | Float  # head logistic: inverse L2 strength (scikit-learn's C); auto: chosen on val
    augment: bool
    monitor: Literal["val_loss", "val_accuracy"]  # picks the epoch that is kept
    early_stopping_patience: int | None = Field(ge=1)  # null: off
    precision: Literal["auto", "fp32", "bf16"]
    compile: bool  # torch.compile, CUDA only
    seed: int
    workers: int = Field(ge=0)
    nproc: int = Field(ge=1)  # > 1: the stage re-launches itself under torchrun, one DDP process each
    log_every_n_steps: int = Field(ge=1)  # step-level train loss to MLflow

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        from catdog.models.architectures import ARCHITECTURES  # late: models imports torch

        _check(arch in ARCHITECTURES, "train.arch", f"must be one of {sorted(ARCHITECTURES)}", arch)
        return arch

    @field_validator("logistic_c", mode="before")
    @classmethod
    def _positive_or_auto(cls, value):
        value = _yaml_number(value)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        positive = number and 0 < value < float("inf")
        _check(value == "auto" or positive, "train.logistic_c", "must be 'auto' or > 0", value)
        return value

    def resolved(self) -> TrainParams:
        """``head: auto`` made concrete: in 'features' mode the logistic head (fitted once: one epoch,
        no schedule), in the modes where the backbone runs every epoch the gradient head."""
        if self.head != "auto":
            return self
        if self.mode != "features":
            return self.model_copy(update={"head": "gradient"})
        return self.model_copy(update={"head": "logistic", "epochs": 1, "warmup_epochs": 0})

    @model_validator(mode="after")
    def _options_fit_the_mode(self):
        _check(
            not (self.mode == "features" and self.augment),
            "train.augment",
            "must be false in 'features' mode (features are computed once); use mode 'head'",
            self.augment,
        )
        _check(
            self.head_warmup_epochs < self.epochs,
            "train.head_warmup_epochs",
            f"must be below train.epochs ({self.epochs})",
            self.head_warmup_epochs,
        )
        _check(
            self.head_warmup_epochs == 0 or self.mode in ("top", "full"),
            "train.head_warmup_epochs",
            f"must be 0 in '{self.mode}' mode (only the head trains anyway); use mode 'top' or 'full'",
            self.head_warmup_epochs,
        )
        _check(
            self.warmup_epochs < self.epochs,
            "train.warmup_epochs",
            f"must be below train.epochs ({self.epochs})",
            self.warmup_epochs,
        )
        _check(
            self.warmup_epochs == 0 or self.scheduler == "cosine",
            "train.warmup_epochs",
            "must be 0 with scheduler 'onecycle' (it warms up over the first 10% of the steps itself)",
            self.warmup_epochs,
        )
        _check(
            self.head != "logistic" or (self.mode == "features" and self.epochs == 1),
            "train.head",
            "'logistic' is fitted once on the frozen features: needs mode 'features' and epochs 1",
            self.head,
        )
        _check(
            self.nproc == 1 or self.mode != "features",
            "train.nproc",
            "must be 1 in 'features' mode (one process trains the head on cached embeddings)",
            self.nproc,
        )
        return self


class EvaluateParams(_Section):
    batch_size: int = Field(ge=1)
    tta: bool  # average with the horizontally flipped image
    calibration_bins: int = Field(ge=2)
    gallery_size: int = Field(ge=1)  # most confidently wrong test images shown
    # the grad-cam library's method of the heatmaps (catdog.explain.cam.CAM_METHODS: the same names)
    cam_method: Literal[
        "gradcam",
        "hirescam",
        "gradcam++",
        "xgradcam",
        "layercam",
        "eigencam",
        "eigengradcam",
        "scorecam",
        "ablationcam",
    ]


class AuditParams(_Section):
    enabled: bool
    folds: int = Field(ge=2)  # k of the cross-validated logistic head
    c: Float = Field(gt=0)  # the head's inverse L2 strength
    filter_by: Literal[
        "prune_by_noise_rate",
        "prune_by_class",
        "both",
        "confident_learning",
        "predicted_neq_given",
        "low_normalized_margin",
        "low_self_confidence",
    ]  # cleanlab.filter.find_label_issues
    gallery_size: int = Field(ge=1)
    seed: int


class ExportParams(_Section):
    opset: int = Field(ge=17)
    tolerance: Float = Field(gt=0)  # max abs logit difference exported vs eager PyTorch
    parity_images: int = Field(ge=1)  # test images the exported models are checked on
    registered_model_name: str | None  # null: skip the model registry
    promote_champion: bool  # move alias 'champion' when test accuracy beats it
    precision: list[Literal["int8", "bf16"]]  # variants beside the fp32 model (catdog.models.variants)
    calibration_images: int = Field(ge=1)  # train images the int8 variant's activation ranges come from
    variant_min_agreement: Float = Field(gt=0, le=1)  # top-1 agreement with fp32 on the test split, at least
    variant_max_accuracy_drop: Float = Field(ge=0, le=1)  # test accuracy below fp32's by at most this

    @field_validator("precision")
    @classmethod
    def _distinct_precisions(cls, precision: list[str]) -> list[str]:
        _check(len(set(precision)) == len(precision), "export.precision", "must not repeat a precision", precision)
        return precision


class TrackingParams(_Section):
    experiment_name: str = Field(pattern=r"\S")  # not empty
    log_pytorch_model: bool  # train also logs the full PyTorch model (~15 MB per run)


class Params(_Section):
    data: DataParams
    audit: AuditParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    tracking: TrackingParams

    def flat(self, *sections: str) -> dict[str, object]:
        """``{"train.lr": 0.001, ...}`` for the given sections (all when none given)."""
        names = sections or tuple(type(self).model_fields)
        return {f"{name}.{key}": value for name in names for key, value in getattr(self, name).model_dump().items()}


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
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(f"{source}: " + "; ".join(describe_error(error) for error in exc.errors())) from None


def describe_error(error) -> str:
    """One pydantic error as ``key rule, got value``."""
    key = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return f"missing required key {key}"
    if kind == "extra_forbidden":
        section = key.rpartition(".")[0]
        model = getattr(Params.model_fields.get(section), "annotation", Params)
        return f"unknown key {key} (known in {section or 'top level'}: {', '.join(model.model_fields)})"
    if kind == "value_error":  # our own checks: the message names the key already
        return str(error["ctx"]["error"])
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key or 'top level'} must be a mapping, got {value!r}"
    rule = (
        error["msg"]
        .replace("Input should be", "must be")
        .replace("String should match pattern '\\S'", "must not be empty")
    )
    return f"{key} {rule}, got {value!r}"
