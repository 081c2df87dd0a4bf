"""The one model factory: ``create_model(arch, ...)`` -> ``Classifier``, and its checkpoints.

Owns ``Classifier`` (a backbone, its normalisation and the head, frozen or not, split at a stage),
``create_model`` and checkpoint save/load; the backbones themselves are in ``architectures``.
Every model takes float32 NCHW images in [0, 1]; normalisation is part of the model, so
train, evaluate, the ONNX export and ``catdog predict`` can never disagree about it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from catdog.core import atomic
from catdog.core.errors import CatdogError
from catdog.models.architectures import ARCHITECTURES, torch_load


class Classifier(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        dropout: float,
        blocks: list[nn.Module],
        stages: list[nn.Module],
    ):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
        # The backbone's blocks, input to output; a plain list, so they are not registered twice.
        self.blocks = [block for block in blocks if any(True for _ in block.parameters())]
        # The backbone as a chain: stages[-1](...stages[0](x)) == backbone(x) (plain list, as above).
        self.stages = stages
        self.backbone_frozen = False
        self._unfrozen_blocks: list[nn.Module] = []

    def last_blocks(self, count: int) -> list[nn.Module]:
        """The backbone's last ``count`` blocks that hold weights (all of them if it has fewer)."""
        return self.blocks[-count:] if count > 0 else []

    def freeze_backbone(self, except_last: int = 0) -> Classifier:
        """No gradients, and BatchNorm statistics stay those of the pretrained weights, except in
        the last ``except_last`` blocks ('top' mode), which train with the head."""
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        self._unfrozen_blocks = self.last_blocks(except_last)
        for block in self._unfrozen_blocks:
            block.requires_grad_(True)
        return self.train(self.training)

    def unfreeze_backbone(self) -> Classifier:
        self.backbone_frozen = False
        self._unfrozen_blocks = []
        self.backbone.requires_grad_(True)
        return self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
            for block in self._unfrozen_blocks:
                block.train(mode)
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, [N, num_features]."""
        return self.backbone((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def split(self, trainable_blocks: int) -> tuple[nn.Module, nn.Module]:
        """(frozen prefix, rest): ``rest(prefix(images)) == self(images)``, cut before the stage
        that holds the first of the last ``trainable_blocks`` blocks (0: the whole backbone frozen).
        The prefix normalises, so it takes the model's input; both share this model's weights."""
        first = [w for block in self.last_blocks(trainable_blocks) for w in block.parameters()][:1]
        cut = (
            next(
                (i for i, stage in enumerate(self.stages) if any(w is first[0] for w in stage.parameters())),
                len(self.stages),
            )
            if first
            else len(self.stages)
        )
        return _Prefix(self, self.stages[:cut]), _Rest(self, [*self.stages[cut:], self.head])


class _Rest(nn.Sequential):
    """The stages after the cut and the head; train()/eval() go through the whole model, so frozen
    blocks keep their BatchNorm statistics as in ``Classifier.train``."""

    def __init__(self, model: Classifier, modules: list[nn.Module]):
        super().__init__(*modules)
        self._model = [model]  # a list: not registered as a submodule

    def train(self, mode: bool = True) -> _Rest:
        self._model[0].train(mode)
        self.training = mode
        return self


class _Prefix(nn.Module):
    def __init__(self, model: Classifier, stages: list[nn.Module]):
        super().__init__()
        self.register_buffer("mean", model.mean)
        self.register_buffer("std", model.std)
        self.stages = nn.Sequential(*stages)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages((images - self.mean) / self.std)


def create_model(
    arch: str,
    pretrained: bool = True,
    num_classes: int = 2,
    weights: str | None = None,
    image_size: int = 224,
    dropout: float = 0.2,
) -> Classifier:
    if arch not in ARCHITECTURES:
        raise CatdogError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    backbone, features = spec.build(pretrained, weights, image_size)
    return Classifier(
        backbone, features, num_classes, spec.mean, spec.std, dropout, spec.blocks(backbone), spec.stages(backbone)
    )


def save_checkpoint(path: Path, model: Classifier, config: dict) -> None:
    """``config`` holds what rebuilding needs (arch, image_size, classes, ...), saved with the weights."""
    # to a file object: torch names the archive's records after a file name (here a temporary one)
    with atomic.replacing(path) as temporary, temporary.open("wb") as handle:
        torch.save({"config": config, "state_dict": model.state_dict()}, handle)


def load_checkpoint(path: Path) -> tuple[Classifier, dict]:
    if not path.is_file():
        raise CatdogError(f"{path} not found: run the train stage first (dvc repro train)")
    checkpoint = torch_load(path)
    config = checkpoint["config"]
    model = create_model(
        config["arch"],
        pretrained=False,
        num_classes=len(config["classes"]),
        image_size=config["image_size"],
        dropout=config["dropout"],
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), config
