"""Tiny configurations of the MuseTalk networks: the same architectures and interface shapes as the
real ones (latents [B, 8, 32, 32], audio [B, 50, 384], faces [B, 256, 256, 3]), only narrow and
shallow, so that a CPU runs them in milliseconds. For tests, and for the benchmarks' dry runs
(`--tiny`: every code path of a GPU run, in seconds, its figures meaningless)."""

from __future__ import annotations

from lipstream.models.unet import MUSETALK_UNET_CONFIG
from lipstream.models.vae import SD_VAE_CONFIG

TINY_UNET_CONFIG = {
    **MUSETALK_UNET_CONFIG,
    "block_out_channels": [32, 64],
    # cross-attention at 16x16 only: attention over 32x32 = 1024 tokens costs most of a CPU forward
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
}
# Four blocks, so the VAE downsamples x8 like sd-vae-ft-mse: 256x256 crops <-> 32x32 latents.
TINY_VAE_CONFIG = {**SD_VAE_CONFIG, "block_out_channels": [4, 4, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}
# d_model stays 384 (the UNet's cross_attention_dim) and the input stays 30 s ([1, 80, 3000]), as real whisper.
TINY_WHISPER_CONFIG = {
    "d_model": 384, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 6,
    "decoder_attention_heads": 6, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_source_positions": 1500,
    "max_target_positions": 16, "vocab_size": 100, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "decoder_start_token_id": 1,
}
