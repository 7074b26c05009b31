"""Shared by the Pipecat tests: TTS frames of speech-like audio, and what the service sent downstream."""

from __future__ import annotations

import asyncio

import numpy as np
import soxr
from pipecat.frames.frames import ErrorFrame, OutputImageRawFrame, SpeechOutputAudioRawFrame, TTSAudioRawFrame
from pipecat.tests.utils import run_test

from lipstream.synthetic import speech
from server_helpers import SR

TIMEOUT_S = 30  # no test may hang: a pipeline ends well within this or the test fails


async def run(service, frames) -> tuple[list, list]:
    """`run_test` of the service with these frames (then an EndFrame): (frames down, frames up)."""
    async with asyncio.timeout(TIMEOUT_S):
        return await run_test(service, frames_to_send=frames, start_timeout=20)


def errors(up) -> list[str]:
    """The messages of the ErrorFrames that went upstream."""
    return [f.error for f in up if isinstance(f, ErrorFrame)]


def tts_speech(seconds: float, rate: int = SR, seed: int = 0) -> np.ndarray:
    """Speech-like int16 [seconds * rate] at `rate`."""
    audio = speech(seconds, seed=seed)
    if rate != SR:
        audio = soxr.resample(audio, SR, rate)
    return np.round(audio * 32767).astype(np.int16)


def tts_frames(pcm: np.ndarray, rate: int, chunk_ms: int = 20) -> list[TTSAudioRawFrame]:
    """int16 [n] at `rate` as a TTS sends it: TTSAudioRawFrame chunks of `chunk_ms`."""
    step = rate * chunk_ms // 1000
    return [TTSAudioRawFrame(audio=pcm[i:i + step].tobytes(), sample_rate=rate, num_channels=1)
            for i in range(0, pcm.size, step)]


def images(frames) -> list[OutputImageRawFrame]:
    return [f for f in frames if isinstance(f, OutputImageRawFrame)]


def sounds(frames) -> list[SpeechOutputAudioRawFrame]:
    return [f for f in frames if isinstance(f, SpeechOutputAudioRawFrame)]


def pixels(frame: OutputImageRawFrame) -> np.ndarray:
    """An image frame's RGB pixels, uint8 [H, W, 3]."""
    width, height = frame.size
    return np.frombuffer(frame.image, np.uint8).reshape(height, width, 3)


def spoken(frames) -> np.ndarray:
    """The audio of the speaking frames sent downstream, int16 [n] 16 kHz."""
    parts = [np.frombuffer(f.audio, np.int16) for f in sounds(frames) if f.metadata["lipstream"]["speaking"]]
    return np.concatenate(parts) if parts else np.zeros(0, np.int16)
