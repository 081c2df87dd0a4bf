"""Class activation maps with the ``grad-cam`` library, for every architecture of ``catdog.models``.

``TARGET_LAYERS`` names, per ``train.arch``, the module whose output the maps weigh: one that ``forward()``
runs (``Classifier.stages`` re-compose the backbone and are never called by it, so hooks there never fire),
the last convolutional feature map before pooling. The names reach the same module in an eager ``Classifier``
and in ``torch.export.unflatten`` of its export, so one table serves the checkpoint and ``model.pt2``.
"""

from __future__ import annotations

import numpy as np
import pytorch_grad_cam
import torch
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from catdog.core.errors import CatdogError
from catdog.explain.gradients import weights_without_grad
from catdog.models.device import eager_batch

_LITE, _TORCHVISION_FEATURES = "backbone.net._conv_head", "backbone.features"
TARGET_LAYERS = {
    "efficientnet_lite0": _LITE,
    "efficientnet_lite1": _LITE,
    "efficientnet_lite2": _LITE,
    "resnet18": "backbone.layer4",
    "resnet50": "backbone.layer4",
    "vgg16": _TORCHVISION_FEATURES,
    "efficientnet_b0": _TORCHVISION_FEATURES,
    "mobilenet_v3_large": _TORCHVISION_FEATURES,
    "convnext_tiny": _TORCHVISION_FEATURES,
    "simple_cnn": "backbone.15",  # the last block's pooled output (its ReLU works in place)
}

# evaluate.cam_method -> the library's class (core.params lists the same names)
CAM_METHODS = {
    "gradcam": pytorch_grad_cam.GradCAM,
    "hirescam": pytorch_grad_cam.HiResCAM,
    "gradcam++": pytorch_grad_cam.GradCAMPlusPlus,
    "xgradcam": pytorch_grad_cam.XGradCAM,
    "layercam": pytorch_grad_cam.LayerCAM,
    "eigencam": pytorch_grad_cam.EigenCAM,
    "eigengradcam": pytorch_grad_cam.EigenGradCAM,
    "scorecam": pytorch_grad_cam.ScoreCAM,
    "ablationcam": pytorch_grad_cam.AblationCAM,
}
DEFAULT_METHOD = "gradcam"


def target_layer(model: nn.Module, arch: str) -> nn.Module:
    if arch not in TARGET_LAYERS:
        raise CatdogError(f"no class activation layer known for arch {arch!r}")
    return model.get_submodule(TARGET_LAYERS[arch])


def activation_maps(
    model: nn.Module, arch: str, images: torch.Tensor, classes: list[int], method: str = DEFAULT_METHOD
) -> np.ndarray:
    """[N, H, W] float32 in [0, 1] (H, W: the input's): where ``images`` (the model's input) show ``classes[i]``.

    Gradients are on for the maps alone, from the output back to the target layer; the weights stay as they were."""
    if method not in CAM_METHODS:
        raise CatdogError(f"unknown class activation method {method!r}: choose one of {', '.join(CAM_METHODS)}")
    if not len(images):
        return np.zeros((0, *images.shape[-2:]), np.float32)
    layer = target_layer(model, arch)
    # The graph starts at the layer's output (hooked before the library's hooks): the backward pass stops
    # there, and neither the weights nor the layers below it compute or hold a gradient.
    graph_start = layer.register_forward_hook(lambda _module, _inputs, output: output.detach().requires_grad_(True))
    cam = CAM_METHODS[method](model=model.eval(), target_layers=[layer])
    images = images.contiguous(memory_format=torch.channels_last)  # CPU convolutions run ~1.4x faster on it
    batch = eager_batch(next((w.device for w in model.parameters()), images.device))
    try:
        with torch.enable_grad(), weights_without_grad(model):
            maps = [
                cam(images[start : start + batch], [ClassifierOutputTarget(c) for c in classes[start : start + batch]])
                for start in range(0, len(images), batch)
            ]
    finally:
        cam.activations_and_grads.release()
        graph_start.remove()
    return np.concatenate(maps).astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """uint8 HxWx3: ``image`` (HxWx3, uint8 or float in [0, 1]) under the jet-coloured ``heatmap`` (HxW)."""
    pixels = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    return show_cam_on_image(pixels, heatmap, use_rgb=True, image_weight=0.55)


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Model input (NCHW float in [0, 1]) as NHWC uint8 for figures."""
    return (images.detach().permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
