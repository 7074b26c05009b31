"""The Stable Diffusion VAE (sd-vae-ft-mse), diffusers `AutoencoderKL`, from the sd-vae/ folder.

    encode: [B, 3, 256, 256] RGB in [-1, 1] -> latent_dist over [B, 4, 32, 32] (unscaled)
    decode: [B, 4, 32, 32] latents * (1 / scaling_factor) -> [B, 3, 256, 256] RGB in ~[-1, 1]
in the VAE's dtype, on its device. sd-vae-ft-mse's config.json has no `scaling_factor`, so diffusers'
default 0.18215 applies; read it from `vae.config.scaling_factor`."""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL
from diffusers.utils import is_accelerate_available

from lipstream.errors import IncompatibleWeightsError
from lipstream.models.placement import for_inference

# stabilityai/sd-vae-ft-mse's config.json (no scaling_factor: diffusers' default 0.18215 applies).
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 256,
}
SD_VAE_PARAMETERS = 83_653_863  # of which the decoder + post_quant_conv: 49,490,199


def load_vae(directory: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """AutoencoderKL from `directory` (config.json + diffusion_pytorch_model.bin), eval, frozen, on device/dtype.

    Raises `IncompatibleWeightsError` when the weights do not cover the network."""
    vae, info = AutoencoderKL.from_pretrained(
        directory, use_safetensors=False, low_cpu_mem_usage=is_accelerate_available(), output_loading_info=True
    )
    missing = info.get("missing_keys") or []
    if missing:
        raise IncompatibleWeightsError(
            f"{directory} holds VAE weights that do not fit its config.json ({len(missing)} missing tensors, "
            f"e.g. {', '.join(sorted(missing)[:3])}); delete the folder and run `lipstream models download`."
        )
    return for_inference(vae, device, dtype)
