"""Device and precision, decided once per process (timm-style) and passed around."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: plain fp32
    channels_last: bool

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def to_device(self, images: torch.Tensor, transform=None) -> torch.Tensor:
        """The batch on the device; ``transform`` (GPU augmentation) runs there, before the memory
        layout is set, since it rebuilds the batch."""
        images = images.to(self.device, non_blocking=True)
        if transform is not None:
            images = transform(images)
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def describe(self) -> str:
        precision = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32"
        return f"{self.device.type} {precision}{' channels_last' if self.channels_last else ''}"


def resolve_runtime(precision: str = "auto") -> Runtime:
    """CUDA: bf16 autocast (fp16 + GradScaler where bf16 is unsupported) and channels_last, or
    plain fp32 (TF32 off) when asked for. CPU: fp32, or bf16 autocast when asked for."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        if precision == "fp32":  # true fp32, as the exported ONNX model computes: no TF32 either
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            dtype = None
        else:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Runtime(torch.device("cuda"), dtype, channels_last=True)
    return Runtime(torch.device("cpu"), torch.bfloat16 if precision == "bf16" else None, channels_last=False)


def eager_batch(device: torch.device) -> int:
    """Images per eager forward pass where only inference or explanation runs (export's parity check,
    Grad-CAM). On a CPU four at a time: a batch's activations then stay in the cores' caches, and the
    memory-bound layers (batch norm, clamp, padding) run 1.5-2x faster than in one batch of 16 (Lite0/2)."""
    return 4 if device.type == "cpu" else 16
