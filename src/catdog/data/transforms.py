"""Transform presets shared by train and eval (torchvision references style).

Inputs are uint8 CHW tensors from prepare's cache; outputs float32 in [0, 1]
(normalisation lives in the model). torchvision is imported when an augmenting preset is built or
an image needs resizing: a stage that reads cached features, or images already at the input size,
never loads it.
"""

from __future__ import annotations

import torch


def train_preset(image_size: int, augment: bool):
    if not augment:
        return eval_preset(image_size)
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


class EvalPreset:
    """Resize to ``image_size`` squared (torchvision's antialiased bilinear), then float32 in [0, 1].

    An image already at that size (prepare's cache at ``train.image_size``, the default) never
    touches torchvision, whose import costs a stage 1.6 s (it imports torch._dynamo): its Resize
    returns such an image as it is and its ToDtype scales by 1/255, as here; so a stage that reads
    only such images never imports it.
    """

    def __init__(self, image_size: int):
        self.image_size = image_size
        self._resize = None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            if self._resize is None:
                from torchvision.transforms import v2

                self._resize = v2.Resize((self.image_size, self.image_size), antialias=True)
            image = self._resize(image)
        return image.to(torch.float32).mul_(1.0 / 255)


def eval_preset(image_size: int) -> EvalPreset:
    return EvalPreset(image_size)


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
