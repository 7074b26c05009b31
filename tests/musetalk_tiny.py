"""Tiny random MuseTalk networks written in the official file layout, for the loading code to read back.

Same code paths and the same interface shapes as the real models (latents [B,8,32,32], audio
[B,50,384], faces [B,256,256,3]); only the widths and depths are small."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from lipstream.models.tiny import TINY_UNET_CONFIG as TEST_UNET_CONFIG
from lipstream.models.tiny import TINY_VAE_CONFIG as TEST_VAE_CONFIG
from lipstream.models.tiny import TINY_WHISPER_CONFIG as TEST_WHISPER_CONFIG
from lipstream.models.unet import build_unet


def write_tiny_musetalk(root: Path, seed: int = 0, whisper_file: str = "pytorch_model.bin") -> dict[str, torch.nn.Module]:
    """Write tiny random models under `root` in MuseTalk's layout; return the in-memory originals
    ("unet", "vae", "whisper_encoder"), fp32, eval mode. whisper_file: "pytorch_model.bin" (as
    openai/whisper-tiny's, torch.save) or "model.safetensors" (what transformers >= 5 saves)."""
    torch.manual_seed(seed)
    unet = build_unet(TEST_UNET_CONFIG).eval()
    (root / "musetalkV15").mkdir(parents=True)
    json_config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0.dev0", **TEST_UNET_CONFIG}
    (root / "musetalkV15" / "musetalk.json").write_text(json.dumps(json_config, indent=2))
    torch.save(unet.state_dict(), root / "musetalkV15" / "unet.pth")

    vae = AutoencoderKL(**TEST_VAE_CONFIG).eval()
    vae.save_pretrained(root / "sd-vae", safe_serialization=False)
    # sd-vae-ft-mse's config.json has no scaling_factor: the loader must fall back to 0.18215.
    config_path = root / "sd-vae" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("scaling_factor")
    config_path.write_text(json.dumps(config))

    # As openai/whisper-tiny: a WhisperForConditionalGeneration checkpoint ("model." key prefix, tied
    # proj_out not saved) in pytorch_model.bin, read back through WhisperModel.
    whisper_config = WhisperConfig(**TEST_WHISPER_CONFIG, architectures=["WhisperForConditionalGeneration"])
    whisper = WhisperForConditionalGeneration(whisper_config).eval()
    (root / "whisper").mkdir()
    whisper_config.save_pretrained(root / "whisper")
    state = {k: v for k, v in whisper.state_dict().items() if k != "proj_out.weight"}
    if whisper_file == "model.safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, root / "whisper" / whisper_file)
    else:
        torch.save(state, root / "whisper" / whisper_file)
    WhisperFeatureExtractor().save_pretrained(root / "whisper")
    return {"unet": unet, "vae": vae, "whisper_encoder": whisper.model.encoder}
