"""Gradients for an explanation only: the weights of a model left as they were (``requires_grad``, no ``.grad``).

Its own module so the views that need it do not import the grad-cam library (seconds of start-up).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def weights_without_grad(model: nn.Module) -> Iterator[None]:
    """No weight gradients are computed or kept; each weight's ``requires_grad`` is restored after."""
    flags = [(weight, weight.requires_grad) for weight in model.parameters()]
    try:
        for weight, _ in flags:
            weight.requires_grad_(False)
        yield
    finally:
        for weight, flag in flags:
            weight.requires_grad_(flag)
