"""The tutorials' other two views of a trained convnet: what each stage of the backbone makes of one image
(``activations``), and the input pattern that most excites a few channels of each stage (``filters``, by
gradient ascent on the input from noise).

Both walk ``Classifier.stages`` (the backbone re-composed as a chain, the same weights) and show one stage per
spatial resolution: the last stage before the map shrinks, where a resolution's features are complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from catdog.core import plots
from catdog.data.images import decode_image, read_file, resize
from catdog.explain.gradients import weights_without_grad
from catdog.models.factory import Classifier

ACTIVATION_CHANNELS = 8  # the most active channels shown per stage
MAX_IMAGE_BYTES = 50_000_000  # a person's own file: prepare's default byte cap


def stage_outputs(model: Classifier, images: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(stage index, output) of the last stage at each spatial size (4-D outputs only: the pooled head is none)."""
    x, outputs = (images - model.mean) / model.std, []
    for index, stage in enumerate(model.stages):
        x = stage(x)
        if x.dim() == 4:
            outputs.append((index, x))
    return [
        (i, out)
        for n, (i, out) in enumerate(outputs)
        if n + 1 == len(outputs) or outputs[n + 1][1].shape[-1] != out.shape[-1]
    ]


def load_image(path: Path, config: dict) -> torch.Tensor:
    """One file decoded as prepare and predict do, at the model's input size: [1, 3, H, W] in [0, 1]."""
    pixels = resize(decode_image(read_file(path, MAX_IMAGE_BYTES), config["cache_size"]), config["image_size"])
    return torch.tensor(pixels).permute(2, 0, 1)[None].float() / 255


def activations(model: Classifier, image: torch.Tensor, path: Path, title: str) -> Path:
    """One figure: the input, then per stage its ``ACTIVATION_CHANNELS`` most active feature maps."""
    with torch.inference_mode():
        outputs = stage_outputs(model.eval(), image)
    panels = [_as_rgb(image[0])] + [None] * (ACTIVATION_CHANNELS - 1)
    captions = ["input"] + [""] * (ACTIVATION_CHANNELS - 1)
    for index, output in outputs:
        maps = output[0]
        strongest = maps.mean(dim=(1, 2)).argsort(descending=True)[:ACTIVATION_CHANNELS].tolist()
        for channel in strongest:
            panels.append(_normalised(maps[channel].numpy()))
            captions.append(f"stage {index} ({maps.shape[-1]}px) ch {channel}")
    plots.gallery(panels, captions, path, title, columns=ACTIVATION_CHANNELS, panel_inches=1.8)
    return path


def filters(model: Classifier, path: Path, title: str, channels: int = 4, size: int = 96, steps: int = 30) -> Path:
    """One figure: per stage, for its first ``channels`` channels, the input that maximises the channel's mean
    activation: Adam on the pixels (kept in [0, 1] by a sigmoid) from seeded noise, the weights untouched."""
    model = model.eval()
    panels, captions = [], []
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        stages = [index for index, _ in stage_outputs(model, torch.rand(1, 3, size, size, generator=generator))]
    for index in stages:
        prefix = torch.nn.Sequential(*model.stages[: index + 1])
        logits = (torch.randn(channels, 3, size, size, generator=generator) * 0.1).requires_grad_(True)
        optimizer = torch.optim.Adam([logits], lr=0.1)
        with torch.enable_grad(), weights_without_grad(model):
            for _ in range(steps):
                output = prefix((logits.sigmoid() - model.mean) / model.std)
                loss = -output[torch.arange(channels), torch.arange(channels) % output.shape[1]].mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        for channel, pattern in enumerate(logits.detach().sigmoid()):
            panels.append(_as_rgb(pattern))
            captions.append(f"stage {index} ch {channel}")
    plots.gallery(panels, captions, path, title, columns=channels, panel_inches=2.2)
    return path


def _as_rgb(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).clamp(0, 1).numpy()


def _normalised(feature_map: np.ndarray) -> np.ndarray:
    spread = feature_map.max() - feature_map.min()
    return (feature_map - feature_map.min()) / spread if spread > 0 else np.zeros_like(feature_map)
