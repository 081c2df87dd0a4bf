"""The eval preset: torchvision's Resize + ToDtype bit for bit, without importing torchvision for
images already at the input size (the default, where prepare caches at ``train.image_size``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torchvision.transforms import v2

from catdog.data.transforms import eval_preset


@pytest.mark.parametrize("shape", [(3, 64, 64), (3, 80, 70), (3, 40, 96), (1, 64, 64)])
def test_the_eval_preset_is_torchvisions_resize_and_scaling(shape):
    image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(sum(shape)))
    torchvision_preset = v2.Compose([v2.Resize((64, 64), antialias=True), v2.ToDtype(torch.float32, scale=True)])
    assert torch.equal(eval_preset(64)(image), torchvision_preset(image))


def test_images_at_the_input_size_never_import_torchvision():
    code = (
        "import sys, torch\n"
        "from catdog.data.transforms import eval_preset\n"
        "out = eval_preset(32)(torch.zeros(3, 32, 32, dtype=torch.uint8))\n"
        "assert out.dtype == torch.float32\n"
        "print('torchvision' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
