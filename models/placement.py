"""Where a model runs and at what precision: the choices every model spec (ClipSpec, CaptionerSpec) offers,
checked the same way."""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def check_placement(precision: str, device: str) -> None:
    """Raise ValueError naming the field for a precision or device the specs do not offer."""
    if precision not in TORCH_DTYPES:
        raise ValueError(f"precision must be one of {sorted(TORCH_DTYPES)}, got {precision!r}")
    if device not in DEVICE_CHOICES:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def resolve_device(device: str) -> torch.device:
    """ "auto": the GPU when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
