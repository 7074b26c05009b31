"""The MuseTalk UNet: diffusers `UNet2DConditionModel` built from `musetalk.json`, weights from `unet.pth`.

Call contract (MuseTalk's single step, no noise, no scheduler):
    unet(sample, timestep=0, encoder_hidden_states=audio).sample
    sample: [B, 8, 32, 32] (4 masked-face + 4 reference latent channels, x scaling factor)
    audio:  [B, 50, 384]   whisper window features + positional encoding
    out:    [B, 4, 32, 32] predicted face latents (x scaling factor)
all in the UNet's dtype, on its device."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from lipstream.errors import IncompatibleWeightsError
from lipstream.models.placement import for_inference

# The constructor kwargs of musetalkV15/musetalk.json (reference spec §1.2). Stable Diffusion 1.x
# UNet except in_channels 8 (masked + reference latents) and cross_attention_dim 384 (whisper-tiny).
# `attention_head_dim` 8 has diffusers' legacy meaning: 8 heads per attention layer.
MUSETALK_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# Parameters of the UNet built from MUSETALK_UNET_CONFIG (3.4 GB in fp32, 1.7 GB in fp16).
MUSETALK_UNET_PARAMETERS = 849_947_844


def build_unet(config: Mapping[str, Any]) -> UNet2DConditionModel:
    """A UNet from musetalk.json-style kwargs (keys starting with "_" are metadata and ignored).

    Parameters are random, or shape-only when called under `with torch.device("meta"):`."""
    return UNet2DConditionModel.from_config(dict(config))


def read_unet_config(path: str | os.PathLike) -> dict[str, Any]:
    """The kwargs stored in a musetalk.json."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain torch state_dict file, on the CPU, tensors only (`weights_only`), memory-mapped when the
    file is in torch's zip format, so a 3.4 GB checkpoint is paged in rather than copied."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def assign_weights(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module` strictly, by assignment (so `module` may live on the meta device).

    Raises `IncompatibleWeightsError` listing missing, unexpected and resized tensors."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
               for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                for what, keys in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                   ("tensors with another shape", resized)) if keys]
    if problems:
        raise IncompatibleWeightsError(
            f"{source} does not fit the network built from its config: {'; '.join(problems)}. "
            f"The weights and the config must come from the same release: delete them and run "
            f"`lipstream models download`."
        )
    module.load_state_dict(state, strict=True, assign=True)


def load_unet(config_path: str | os.PathLike, weights_path: str | os.PathLike,
              device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """The MuseTalk UNet from musetalk.json + unet.pth, in eval mode, frozen, on device/dtype.

    The network is built on the meta device and the checkpoint's tensors are assigned to it, so no
    time goes into a random initialisation that would be overwritten."""
    with torch.device("meta"):
        unet = build_unet(read_unet_config(config_path))
    assign_weights(unet, read_state_dict(weights_path), source=str(weights_path))
    return for_inference(unet, device, dtype)
