"""MuseTalk's sinusoidal positional encoding of the audio tokens.

The standard Transformer sinusoid over the token index: dim 2i holds sin(pos / 10000^(2i/d)) and dim
2i+1 holds cos(pos / 10000^(2i/d)). It is ADDED to the whisper window features before the UNet
(the released inference scripts do; spec §3.8)."""

from __future__ import annotations

import math

import torch
from torch import nn

AUDIO_TOKENS = 50  # 10 whisper steps x 5 hidden states per video frame
AUDIO_DIM = 384  # whisper-tiny d_model = the UNet's cross_attention_dim


def sinusoid_table(length: int, d_model: int) -> torch.Tensor:
    """float32 [length, d_model]: row pos, even dims sin(pos * w_i), odd dims cos(pos * w_i), w_i = 10000^(-2i/d)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class PositionalEncoding(nn.Module):
    """x [B, T, d_model] -> x + table[:T] (T <= max_len), in x's dtype, on x's device.

    The table is a non-persistent buffer (it is no part of any checkpoint): computed in float32, then
    cast with the module (`.to(dtype)`), as the released scripts add it in the model dtype."""

    def __init__(self, d_model: int = AUDIO_DIM, max_len: int = AUDIO_TOKENS):
        super().__init__()
        self.register_buffer("table", sinusoid_table(max_len, d_model)[None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[:, : x.shape[1]]
