"""Every MuseTalk network, loaded once per process and shared.

`load_musetalk(root, device, dtype)` returns the same `MuseTalkModels` for the same (root, device,
dtype): the networks are read-only at inference, so every engine and session can share them."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from lipstream.models.layout import UNET_DIR, VAE_DIR, WHISPER_DIR, require_musetalk_weights
from lipstream.models.placement import default_dtype, for_inference, resolve_device
from lipstream.models.positional import PositionalEncoding
from lipstream.models.unet import load_unet
from lipstream.models.vae import load_vae
from lipstream.models.whisper import load_feature_extractor, load_whisper_encoder


@dataclass(frozen=True)
class MuseTalkModels:
    """The MuseTalk networks, all in eval mode with frozen parameters, on `device` in `dtype`
    (the feature extractor is NumPy on the CPU). Shapes are documented in each network's module."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    whisper_encoder: WhisperEncoder
    feature_extractor: WhisperFeatureExtractor
    positional_encoding: PositionalEncoding
    device: torch.device
    dtype: torch.dtype

    @property
    def scaling_factor(self) -> float:
        """The VAE latent scale (0.18215 for sd-vae-ft-mse)."""
        return float(self.vae.config.scaling_factor)


_cache: dict[tuple[Path, torch.device, torch.dtype], MuseTalkModels] = {}
_cache_lock = threading.Lock()


def load_musetalk(root: str | os.PathLike | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> MuseTalkModels:
    """The MuseTalk networks from the models root (default: env LIPSTREAM_MODELS or ./models).

    device: default cuda if available, else cpu. dtype: default float16 on CUDA, float32 on CPU.
    Loaded once per (root, device, dtype) and shared. Raises `MissingWeightsError` when files are
    missing and `IncompatibleWeightsError` when weights do not fit their config."""
    root = require_musetalk_weights(root).resolve()
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    key = (root, device, dtype)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = MuseTalkModels(
                unet=load_unet(root / UNET_DIR / "musetalk.json", root / UNET_DIR / "unet.pth", device, dtype),
                vae=load_vae(root / VAE_DIR, device, dtype),
                whisper_encoder=load_whisper_encoder(root / WHISPER_DIR, device, dtype),
                feature_extractor=load_feature_extractor(root / WHISPER_DIR),
                positional_encoding=for_inference(PositionalEncoding(), device, dtype),
                device=device,
                dtype=dtype,
            )
        return _cache[key]
