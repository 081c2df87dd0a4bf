"""Transform presets shared by train and eval (torchvision references style).

Inputs are uint8 CHW tensors from prepare's cache; outputs float32 in [0, 1]
(normalisation lives in the model).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def train_preset(image_size: int, augment: bool) -> v2.Compose:
    if not augment:
        return eval_preset(image_size)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        v2.ToDtype(torch.float32, scale=True),
    ])


def eval_preset(image_size: int) -> v2.Compose:
    return v2.Compose([
        v2.Resize((image_size, image_size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
    ])
