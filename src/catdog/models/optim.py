"""The optimizer and the learning-rate schedule of a fit, built from ``params.train``.

``create_optimizer`` groups the weights (the head at ``lr``, the backbone layers that will train at
``lr * backbone_lr_factor``); ``create_scheduler`` returns the per-batch schedule (one-cycle, or linear
warm-up then cosine decay).
"""

from __future__ import annotations

import math

import torch

from catdog.core.params import TrainParams
from catdog.models.factory import Classifier


def create_optimizer(model: Classifier, p: TrainParams) -> torch.optim.Optimizer:
    """The head at ``lr``; in top/full mode also the backbone layers that will train, at
    ``lr * backbone_lr_factor``. Frozen layers get no gradient, so the optimizer leaves them be
    until head warm-up ends."""
    groups = [{"params": list(model.head.parameters()), "lr": p.lr}]
    if p.mode in ("top", "full"):
        blocks = model.last_blocks(p.unfreeze_blocks) if p.mode == "top" else [model.backbone]
        groups.append(
            {"params": [w for block in blocks for w in block.parameters()], "lr": p.lr * p.backbone_lr_factor}
        )
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    return torch.optim.AdamW(groups, lr=p.lr, weight_decay=p.weight_decay)


def create_scheduler(
    optimizer: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped every batch: one-cycle, or linear warm-up then cosine decay to 0."""
    total = p.epochs * steps_per_epoch
    if p.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total, pct_start=0.1
        )
    warmup = p.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
