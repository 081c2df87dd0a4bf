"""The loops: one training epoch, validation, prediction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from catdog.models.device import Runtime


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer,
    scheduler,
    runtime: Runtime,
    scaler: torch.amp.GradScaler | None,
    desc: str,
    *,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    grad_clip_norm: float | None = None,
    batch_transform: Callable | None = None,
    on_step: Callable[[float], None] | None = None,
) -> EpochStats:
    """One pass over ``loader``, the scheduler stepped per batch; ``batch_transform`` runs on the
    device (GPU augmentation), ``on_step`` gets each step's loss. Under DDP the returned loss and
    accuracy cover every rank's batches."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    progress = tqdm(
        loader, desc=desc, unit="batch", leave=False, mininterval=1.0, disable=None
    )  # inner bars only on a terminal: they flood logs
    for inputs, targets in progress:
        inputs, targets = runtime.to_device(inputs, batch_transform), targets.to(runtime.device)
        with runtime.autocast():
            logits = model(inputs)
            loss = criterion(logits, targets)
        _optimizer_step(model, loss, optimizer, scaler, grad_clip_norm)
        scheduler.step()
        step_loss = loss.item()
        total_loss += step_loss * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
        progress.set_postfix(loss=f"{total_loss / seen:.4f}", refresh=False)
        if on_step is not None:
            on_step(step_loss)
    totals = torch.tensor([total_loss, correct, seen], dtype=torch.float64, device=runtime.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    total_loss, correct, seen = totals.tolist()
    return EpochStats(total_loss / seen, correct / seen)


def _optimizer_step(
    model: nn.Module,
    loss: torch.Tensor,
    optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip_norm: float | None,
) -> None:
    """Gradients of ``loss`` (through ``scaler`` under mixed precision), clipped if asked, then one
    optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()


@torch.inference_mode()
def predict_logits(
    model: nn.Module, loader, runtime: Runtime, desc: str, mirror: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32 [N, C], targets [N]) on the CPU; ``mirror`` flips images left-right."""
    model.eval()
    all_logits, all_targets = [], []
    for inputs, targets in tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=1.0, disable=None):
        if mirror:
            inputs = torch.flip(inputs, dims=[3])
        with runtime.autocast():
            logits = model(runtime.to_device(inputs))
        all_logits.append(logits.float().cpu())
        all_targets.append(targets)
    return torch.cat(all_logits), torch.cat(all_targets)


def predict_probabilities(model: nn.Module, loader, runtime: Runtime, tta: bool, desc: str):
    """(softmax probabilities [N, C], targets [N]); with ``tta`` averaged with the mirrored image."""
    logits, targets = predict_logits(model, loader, runtime, desc)
    probabilities = torch.softmax(logits, dim=1)
    if tta:
        mirrored, _ = predict_logits(model, loader, runtime, f"{desc} (mirrored)", mirror=True)
        probabilities = (probabilities + torch.softmax(mirrored, dim=1)) / 2
    return probabilities, targets


def validate(model: nn.Module, loader, runtime: Runtime, desc: str) -> EpochStats:
    """Loss and accuracy of ``model`` over ``loader`` (the val split, after each epoch)."""
    logits, targets = predict_logits(model, loader, runtime, desc)
    loss = F.cross_entropy(logits, targets).item()
    return EpochStats(loss, (logits.argmax(1) == targets).float().mean().item())
