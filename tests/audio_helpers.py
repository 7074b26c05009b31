"""Shared by the audio tests: a tiny random-init Whisper encoder built the same way as the real one."""

from __future__ import annotations

import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel


def tiny_whisper(hidden: int = 32) -> tuple[torch.nn.Module, WhisperFeatureExtractor]:
    """A random-init Whisper encoder with whisper-tiny's structure (4 layers -> 5 hidden states),
    d_model `hidden` instead of 384, and the standard 80-mel feature extractor."""
    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=hidden, encoder_layers=4, encoder_attention_heads=2, encoder_ffn_dim=2 * hidden,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=2 * hidden, num_mel_bins=80,
        vocab_size=64, max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )
    return WhisperModel(config).encoder.eval(), WhisperFeatureExtractor()
