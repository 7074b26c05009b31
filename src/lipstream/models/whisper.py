"""whisper-tiny from the whisper/ folder (transformers format): only the encoder and the feature extractor.

    feature extractor: 16 kHz mono float audio (<= 30 s) -> log-mel [1, 80, 3000] float32 (zero-padded to 30 s)
    encoder(mel, output_hidden_states=True).hidden_states: 5 x [1, 1500, 384] (embedding, layers 1-3,
        layer 4 after the final LayerNorm), in the encoder's dtype, on its device; mel must be cast to both."""

from __future__ import annotations

import os

import torch
from transformers import WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from lipstream.errors import IncompatibleWeightsError
from lipstream.models.placement import for_inference

# The WhisperConfig kwargs of openai/whisper-tiny that shape the network (spec §1.3).
WHISPER_TINY_CONFIG = {
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "vocab_size": 51865,
}
WHISPER_TINY_ENCODER_PARAMETERS = 8_208_384


def load_whisper_encoder(directory: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> WhisperEncoder:
    """The encoder of `WhisperModel.from_pretrained(directory)` (model.safetensors or pytorch_model.bin,
    whichever is there), eval, frozen, on device/dtype.

    Raises `IncompatibleWeightsError` when the checkpoint lacks encoder tensors."""
    model, info = WhisperModel.from_pretrained(directory, output_loading_info=True)
    missing = [k for k in info.get("missing_keys") or [] if k.startswith("encoder.")]
    if missing:
        raise IncompatibleWeightsError(
            f"{directory} holds whisper weights that do not fit its config.json ({len(missing)} missing encoder "
            f"tensors, e.g. {', '.join(sorted(missing)[:3])}); delete the folder and run `lipstream models download`."
        )
    return for_inference(model.encoder, device, dtype)


def load_feature_extractor(directory: str | os.PathLike) -> WhisperFeatureExtractor:
    """The log-mel front end from `directory`/preprocessor_config.json (runs on the CPU, NumPy)."""
    return WhisperFeatureExtractor.from_pretrained(directory)
