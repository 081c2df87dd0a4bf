"""Transform presets shared by train and eval (torchvision references style).

Inputs are uint8 CHW tensors from prepare's cache; outputs float32 in [0, 1]
(normalisation lives in the model). torchvision is imported when a preset is built: a stage that
reads cached features instead of images (evaluate, see catdog.pipeline.features) never loads it.
"""

from __future__ import annotations

import torch


def train_preset(image_size: int, augment: bool):
    from torchvision.transforms import v2

    if not augment:
        return eval_preset(image_size)
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def eval_preset(image_size: int):
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def train_transforms(image_size: int, augment: bool, on_device: bool):
    """(per-image transform for the DataLoader, batch transform on the device or None).

    With augmentation on CUDA (``on_device``) the loader only collates the cached uint8 images
    (a quarter of the float32 bytes to copy) and the augmentation runs on the GPU image by image:
    given a whole batch, a v2 transform would draw one crop and one flip for all of it.
    """
    preset = train_preset(image_size, augment)
    if not (augment and on_device):
        return preset, None
    from torchvision.transforms import v2

    return v2.Identity(), lambda batch: torch.stack([preset(image) for image in batch])
