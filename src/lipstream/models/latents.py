"""An avatar's UNet image input from its 256x256 face crops (reference spec §2.5).

For each crop: BGR -> RGB, [0, 255] -> [-1, 1]; a copy with the lower half (rows H/2..H-1) black;
both through the VAE encoder, `latent_dist.sample()` (a sample, not the mode, as the released
scripts cache), x scaling factor; concatenated [masked (4 ch), reference (4 ch)] -> [8, 32, 32]."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL


def crops_to_vae_input(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, H, W, 3] BGR -> (masked, reference), each float32 [B, 3, H, W] RGB in [-1, 1], on crops' device.

    `masked` has rows H/2..H-1 at -1 (black), as MuseTalk blanks the lower half of the face."""
    x = crops.flip(-1).permute(0, 3, 1, 2).float() / 255.0
    masked = x.clone()
    masked[:, :, x.shape[2] // 2:, :] = 0.0
    return masked * 2.0 - 1.0, x * 2.0 - 1.0


@torch.inference_mode()
def avatar_latents(vae: AutoencoderKL, crops: np.ndarray | torch.Tensor, *,
                   generator: torch.Generator | None = None, batch_size: int = 16) -> torch.Tensor:
    """UNet image latents for face crops.

    crops: uint8 [N, 256, 256, 3] BGR (NumPy or a tensor on any device).
    generator: makes `latent_dist.sample()` reproducible (its device may differ from the VAE's);
        the noise is drawn batch by batch, masked batch first, so results depend on `batch_size` too.
    Returns [N, 8, 32, 32] in the VAE's dtype, on its device: [masked, reference] x scaling factor."""
    crops = torch.as_tensor(crops)
    if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[-1] != 3 or len(crops) == 0:
        raise ValueError(f"crops must be uint8 [N>0, H, W, 3] BGR, got {crops.dtype} {tuple(crops.shape)}")
    scale = vae.config.scaling_factor
    out = []
    for start in range(0, len(crops), batch_size):
        masked, reference = crops_to_vae_input(crops[start:start + batch_size].to(vae.device))
        images = torch.cat([masked, reference]).to(vae.dtype)
        latents = vae.encode(images).latent_dist.sample(generator=generator) * scale
        out.append(torch.cat(latents.chunk(2), dim=1))
    return torch.cat(out)
