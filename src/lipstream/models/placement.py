"""Device and dtype placement shared by every network. Device and dtype are always explicit arguments."""

from __future__ import annotations

import torch
from torch import nn


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """`device` as a torch.device with an index for CUDA ("cuda" -> "cuda:<current>"); None -> cuda if available, else cpu."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on CUDA (what MuseTalk's real-time script runs), float32 elsewhere (CPUs without fast half math)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def for_inference(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move `module` to device/dtype, switch to eval mode and freeze its parameters; returns it."""
    # nn.Module.to, not diffusers' ModelMixin.to override: that one warns about `_keep_in_fp32_modules`
    # on every dtype cast even when the list is empty, as it is for the UNet and the VAE.
    return nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)
