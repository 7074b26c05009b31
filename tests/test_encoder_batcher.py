"""EncoderBatcher: concurrent live feature passes share one encoder call, with the same results."""

from __future__ import annotations

import threading

import pytest
import torch

from audio_helpers import tiny_whisper
from lipstream.audio import StreamingFeatures
from lipstream.audio.encoder_batcher import EncoderBatcher
from lipstream.audio.features import encode_mels, segment_mels
from lipstream.synthetic import speech


@pytest.fixture(scope="module")
def whisper():
    return tiny_whisper()


def test_concurrent_passes_share_calls_and_keep_their_own_results(whisper):
    encoder, extractor = whisper
    mels = [segment_mels(speech(seconds, seed=i), extractor) for i, seconds in enumerate([1, 2, 31, 3])]
    expected = [encode_mels(m, encoder) for m in mels]  # the third one is two 30 s segments
    batcher = EncoderBatcher(encoder, wait_ms=500)
    start = threading.Barrier(len(mels))
    results: list[torch.Tensor | None] = [None] * len(mels)

    def caller(i: int) -> None:
        start.wait()
        results[i] = batcher.encode(mels[i])

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(mels))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert batcher.calls < len(mels), "concurrent passes were merged"
    for got, want in zip(results, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_batch_too_big_is_split_and_a_failure_reaches_its_caller(whisper):
    encoder, extractor = whisper
    batcher = EncoderBatcher(encoder, max_segments=1, wait_ms=0)
    mels = segment_mels(speech(1.0), extractor)
    torch.testing.assert_close(batcher.encode(mels), encode_mels(mels, encoder))
    with pytest.raises(ValueError):
        batcher.encode(torch.zeros(1, 80, 10))  # not a 30 s window
    torch.testing.assert_close(batcher.encode(mels), encode_mels(mels, encoder))  # and it works afterwards


def test_streaming_through_the_batcher_equals_direct_passes(whisper):
    encoder, extractor = whisper
    audio = speech(1.5, seed=3)
    outputs = []
    for encode in (None, EncoderBatcher(encoder, wait_ms=0).encode):
        stream = StreamingFeatures(encoder, extractor, encode=encode)
        chunks = [stream.push(audio[i:i + 640]) for i in range(0, audio.shape[0], 640)]
        outputs.append(torch.cat([*chunks, stream.flush()]))
    assert outputs[0].shape[0] == 37
    torch.testing.assert_close(outputs[1], outputs[0])


def test_bad_settings_are_refused(whisper):
    with pytest.raises(ValueError):
        EncoderBatcher(whisper[0], max_segments=0)
    with pytest.raises(ValueError):
        EncoderBatcher(whisper[0], wait_ms=-1)
