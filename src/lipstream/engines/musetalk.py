"""MuseTalk v1.5: one UNet step in latent space, then the VAE decoder (reference spec §4).

    latents [B, 8, 32, 32] + audio [B, 50, 384] --(+PE)--> UNet(t=0) -> [B, 4, 32, 32]
    --(x (1 / scaling factor), as MuseTalk)--> VAE decode -> [B, 3, 256, 256] RGB in ~[-1, 1]
    --(NaN -> 0, x/2+0.5, clamp [0,1], x255, round)--> uint8 [B, 256, 256, 3] BGR

Everything stays on the engine's device; nothing is copied to the host. The fp16 VAE can overflow to
NaN or inf on unusual latents; those pixels become mid grey (NaN) or saturate (inf) instead of
whatever a float-to-uint8 cast of NaN gives."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from lipstream.audio.features import audio_features, encode_mels
from lipstream.audio.streaming import FeaturePass, StreamingFeatures, encode_passes
from lipstream.engines.base import Engine, FeatureStream, Material
from lipstream.models.latents import avatar_latents
from lipstream.models.load import MuseTalkModels, load_musetalk
from lipstream.stream.device import to_device

if TYPE_CHECKING:
    from lipstream.avatar.model import Avatar

# torch.compile modes that capture CUDA graphs: their outputs live in memory the next replay reuses.
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class MuseTalkEngine(Engine):
    """The MuseTalk engine over shared, loaded `MuseTalkModels`.

    compile_mode: None (eager) or a `torch.compile` mode ("default", "reduce-overhead" for CUDA
    graphs, "max-autotune"). Shapes are static, and each batch size compiles once (seconds to
    minutes): a compiled engine pads every batch up to the next of `batch_buckets` (default powers
    of two) so that only those sizes ever compile; `warmup(max_batch)` compiles them ahead."""

    name = "musetalk"

    def __init__(self, models: MuseTalkModels, compile_mode: str | None = None,
                 batch_buckets: Sequence[int] | None = None):
        super().__init__(models.device, models.dtype)
        self.models = models
        self.timestep = torch.zeros((), dtype=torch.long, device=self.device)
        self._cuda_graphs = compile_mode in _CUDA_GRAPH_MODES
        self._faces = self._faces_eager if compile_mode is None else torch.compile(
            self._faces_eager, mode=compile_mode, dynamic=False)
        if batch_buckets is None and compile_mode is not None:
            batch_buckets = [1 << i for i in range(11)]
        self.batch_buckets = sorted(batch_buckets) if batch_buckets else None

    @classmethod
    def load(cls, root: str | os.PathLike | None = None, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None, compile_mode: str | None = None) -> MuseTalkEngine:
        """An engine over `load_musetalk(root, device, dtype)` (loaded once per process, shared)."""
        return cls(load_musetalk(root, device, dtype), compile_mode=compile_mode)

    def warmup(self, max_batch: int) -> None:
        """Run every batch size a batch of up to `max_batch` frames can use, on random inputs: a compiled
        engine's buckets (three calls each: compiled, CUDA graph recorded, replayed), an eager one's
        sizes 1..max_batch on CUDA (cuDNN measures its convolutions for each shape; on the CPU one
        size loads everything); then the whisper encoder at 1, 2, 4, ... segments up to `max_batch`.
        Call it on the thread that runs `generate` (the scheduler does): CUDA graphs are per thread."""
        if self.batch_buckets:
            sizes, calls = sorted({self._bucket(b) for b in range(1, max_batch + 1)}), 3 if self._cuda_graphs else 1
        else:
            sizes, calls = (range(1, max_batch + 1) if self.device.type == "cuda" else [1]), 1
        generator = torch.Generator(self.device).manual_seed(0)
        for size in sizes:
            latents = torch.randn(size, 8, 32, 32, generator=generator, device=self.device, dtype=self.dtype)
            audio = torch.randn(size, 50, 384, generator=generator, device=self.device, dtype=self.dtype)
            for _ in range(calls):
                self.faces(latents, audio)
        encoder = self.models.whisper_encoder
        segments = 1
        while True:
            with torch.inference_mode():
                encode_mels(torch.randn(segments, 80, 3000, generator=generator, device=self.device), encoder,
                            batch_segments=segments)
            if segments >= max_batch or self.device.type != "cuda":
                break
            segments = min(2 * segments, max_batch)

    def _bucket(self, batch: int) -> int:
        """The batch size a batch of `batch` frames runs at: the next bucket up (or itself)."""
        if not self.batch_buckets:
            return batch
        return next((b for b in self.batch_buckets if b >= batch), batch)

    def _faces_eager(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        m = self.models
        audio = m.positional_encoding(audio)
        pred = m.unet(latents, self.timestep, encoder_hidden_states=audio, return_dict=False)[0]
        # MuseTalk multiplies by the reciprocal (dividing rounds differently: faces 1 LSB apart)
        image = m.vae.decode(pred * (1 / m.scaling_factor), return_dict=False)[0]
        image = (torch.nan_to_num(image, nan=0.0, posinf=1.0, neginf=-1.0) / 2 + 0.5).clamp(0, 1)
        # x255 and round in float32, as the released scripts do on the host (fp16 would round differently).
        faces = image.float().mul(255).round().to(torch.uint8)
        return faces.permute(0, 2, 3, 1).flip(-1).contiguous()

    def generate(self, material: Mapping[str, torch.Tensor], conditioning: torch.Tensor) -> torch.Tensor:
        """The engine interface: `faces(material["latents"], conditioning)`."""
        return self.faces(material["latents"], conditioning)

    def material(self, avatar: Avatar) -> Material:
        """{"latents": [N, 8, 32, 32]}: the avatar's stored latents, or computed from its crops (the
        VAE samples its posterior, as MuseTalk does; seeded so that it is reproducible). On a GPU the
        calling thread's stream is synchronized at the end: the material is then read on others."""
        if avatar.latents is not None:
            latents = to_device(avatar.latents, self.device, self.dtype)
        else:
            generator = torch.Generator(self.device).manual_seed(0)
            slots = avatar.mirrored_slots  # a forward+reversed cycle: encode its first half only
            if slots is None:
                latents = self.avatar_latents(avatar.crops, generator=generator)
            else:
                half = self.avatar_latents(avatar.crops[:len(avatar) // 2], generator=generator)
                latents = half.index_select(0, to_device(torch.tensor(slots, dtype=torch.long), half.device))
        if latents.device.type == "cuda":
            torch.cuda.current_stream(latents.device).synchronize()
        return {"latents": latents}

    def features(self, audio: np.ndarray, fps: int = 25) -> torch.Tensor:
        """Whisper window features [F, 50, 384] (no positional encoding) on the engine's device."""
        m = self.models
        return audio_features(audio, m.whisper_encoder, m.feature_extractor, fps=fps)

    def feature_stream(self, fps: int = 25) -> StreamingFeatures:
        """Live whisper features with the measured defaults (audio/streaming.py)."""
        return StreamingFeatures(self.models.whisper_encoder, self.models.feature_extractor, fps=fps)

    @torch.inference_mode()
    def feature_passes(self, passes: Sequence[tuple[FeatureStream, np.ndarray | None]]
                       ) -> list[torch.Tensor | Exception]:
        """The passes of many live streams (this engine's `StreamingFeatures`) with one encoder call:
        each stream prepares its pass on the host, the encoder runs once over all their segments, each
        stream cuts its frames' windows out of its share."""
        prepared: list[FeaturePass | Exception] = []
        for stream, samples in passes:
            try:
                prepared.append(stream.prepare(samples))
            except Exception as exc:  # noqa: BLE001 (that stream's caller gets it)
                prepared.append(exc)
        ready = [p for p in prepared if isinstance(p, FeaturePass)]
        try:
            outputs = iter(encode_passes(self.models.whisper_encoder, ready))
        except Exception as exc:  # noqa: BLE001 (the shared call failed: every pass in it did)
            return [exc if isinstance(p, FeaturePass) else p for p in prepared]
        results: list[torch.Tensor | Exception] = []
        for (stream, _), feature_pass in zip(passes, prepared):
            if isinstance(feature_pass, Exception):
                results.append(feature_pass)
                continue
            try:
                results.append(stream.finish(feature_pass, next(outputs)))
            except Exception as exc:  # noqa: BLE001
                results.append(exc)
        return results

    @torch.inference_mode()
    def faces(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """latents: [B, 8, 32, 32] (from `avatar_latents`), audio: float [B, 50, 384] whisper window
        features WITHOUT positional encoding (added here). Both are moved to the engine's device/dtype.

        Returns faces: uint8 [B, 256, 256, 3] BGR, contiguous, on the engine's device."""
        if latents.ndim != 4 or latents.shape[1] != 8 or audio.ndim != 3 or audio.shape[0] != latents.shape[0]:
            raise ValueError(f"expected latents [B, 8, h, w] and audio [B, T, 384], got {tuple(latents.shape)} "
                             f"and {tuple(audio.shape)}")
        batch = latents.shape[0]
        latents = latents.to(self.device, self.dtype)
        audio = audio.to(self.device, self.dtype)
        padded = self._bucket(batch)
        if padded > batch:  # repeat the last frame; its extra faces are dropped below
            latents = torch.cat([latents, latents[-1:].expand(padded - batch, -1, -1, -1)])
            audio = torch.cat([audio, audio[-1:].expand(padded - batch, -1, -1)])
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self._faces(latents, audio)[:batch].clone()
        faces = self._faces(latents, audio)
        return faces if padded == batch else faces[:batch].contiguous()

    def avatar_latents(self, crops: np.ndarray | torch.Tensor, generator: torch.Generator | None = None,
                       batch_size: int = 16) -> torch.Tensor:
        """An avatar's material: uint8 [N, 256, 256, 3] BGR face crops -> [N, 8, 32, 32] on the engine's
        device, in its dtype (see `lipstream.models.latents.avatar_latents`; pass a seeded `generator`
        for reproducible latents)."""
        return avatar_latents(self.models.vae, crops, generator=generator, batch_size=batch_size)
