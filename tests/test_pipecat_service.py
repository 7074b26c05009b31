"""LipstreamVideoService in Pipecat pipelines (pipecat.tests.utils.run_test), in-process with the warp
engine: images at 25 per second of TTS audio, the avatar's audio equal to the TTS audio, interruption,
the end of the pipeline, and bad input as ErrorFrames."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import soxr
from pipecat.frames.frames import InterruptionFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
from pipecat.tests.utils import SleepFrame

from lipstream.audio.load import PcmStream, resampler_delay
from lipstream.integrations.local import LocalSessions
from lipstream.integrations.pipecat import LipstreamVideoService
from lipstream.stream.pcm import to_pcm16
from pipecat_helpers import TIMEOUT_S, errors, images, pixels, run, sounds, spoken, tts_frames, tts_speech
from server_helpers import server_settings, store_avatar

pytestmark = pytest.mark.anyio
FPS = 25
SCHEDULER_THREADS = ("lipstream-engine", "lipstream-features", "lipstream-compose")


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("avatars")
    store_avatar(root)
    return server_settings(root, engine="warp", output_height=128)


def scheduler_threads() -> list[str]:
    """Threads of running schedulers (the image pool of lipstream.imgproc is the process's, for good)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(SCHEDULER_THREADS)]


@pytest.mark.parametrize("rate", [16000, 24000])
async def test_25_images_a_second_of_speech_and_the_audio_out_is_the_audio_in(settings, rate):
    pcm = tts_speech(1.2, rate)
    host = LocalSessions(settings)
    service = LipstreamVideoService(avatar="astronaut", host=host)
    down, up = await run(service, [TTSStartedFrame(), *tts_frames(pcm, rate), TTSStoppedFrame()])
    assert errors(up) == []
    assert not [f for f in down if isinstance(f, TTSAudioRawFrame)], "the TTS audio is consumed"
    assert [type(f) for f in down if isinstance(f, TTSStartedFrame | TTSStoppedFrame)] == [TTSStartedFrame,
                                                                                        TTSStoppedFrame]
    pictures, audio = images(down), sounds(down)
    assert len(pictures) == len(audio) and len(pictures) >= 30
    assert all(p.sync_with_audio and p.format == "RGB" and p.size == (128, 128) for p in pictures)
    indices = [p.metadata["lipstream"]["index"] for p in pictures]
    assert indices == list(range(indices[0], indices[0] + len(indices))), "a frame every 40 ms, none missing"
    talking = [p for p in pictures if p.metadata["lipstream"]["speaking"]]
    assert abs(len(talking) - 1.2 * FPS) <= 1
    assert all(a.sample_rate == 16000 and a.num_channels == 1 for a in audio)
    heard = spoken(down)
    whole = PcmStream(rate, lead_in=True)  # the same resampler over the whole answer at once
    expected = to_pcm16(np.concatenate([whole.push(pcm.tobytes()), whole.flush()]))
    n, lead = expected.size, resampler_delay(rate)  # the resampler's delay is silence first
    assert n == round(pcm.size * 16000 / rate) + lead and heard.size >= n and not heard[n:].any()
    assert np.abs(heard[:n].astype(int) - expected).max() <= 1 and not heard[:lead].any()
    if rate != 16000:  # and another resampler agrees, below the band edge where their filters differ
        reference = soxr.resample(pcm.astype(np.float32), rate, 16000)
        in_band = np.fft.rfftfreq(reference.size, 1 / 16000) < 7000
        error = np.fft.rfft(heard[lead:n] - reference)[in_band]
        assert np.linalg.norm(error) < 0.01 * np.linalg.norm(np.fft.rfft(reference)[in_band])
    idle = pixels(pictures[0]).astype(int)
    assert max(int(np.abs(pixels(p).astype(int) - idle).max()) for p in talking) > 60, "the mouth moves"
    assert host._scheduler is None and not host._open


async def test_an_interruption_drops_the_queued_speech_and_none_of_it_is_heard(settings):
    pcm = tts_speech(3.0)
    service = LipstreamVideoService(avatar="astronaut", host=LocalSessions(settings))
    down, up = await run(service, [TTSStartedFrame(), *tts_frames(pcm, 16000), TTSStoppedFrame(), SleepFrame(1.0),
                                   InterruptionFrame(), SleepFrame(0.4)])
    assert errors(up) == []
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    before, after = down[:cut], down[cut + 1:]
    heard = spoken(before)
    assert 0.2 * 16000 < heard.size < 1.5 * 16000, "it spoke until the interruption"
    assert np.array_equal(heard, pcm[:heard.size])
    assert len(images(after)) >= 8 and not any(np.frombuffer(a.audio, np.int16).any() for a in sounds(after)), \
        "none of the rest is heard"
    assert not any(p.metadata["lipstream"]["speaking"] for p in images(after))
    idle = pixels(images(before)[0])
    assert all(np.array_equal(pixels(p), idle) for p in images(after)[2:]), "idle from the third image on"


async def test_the_end_frame_lets_the_speech_play_and_nothing_is_left_running(settings):
    host = LocalSessions(settings)
    service = LipstreamVideoService(avatar="astronaut", host=host)
    pcm = tts_speech(1.0)
    down, _ = await run(service, [TTSStartedFrame(), *tts_frames(pcm, 16000)])  # no TTSStoppedFrame: the end ends it
    assert np.array_equal(spoken(down)[:pcm.size], pcm), "all of it played before the end"
    assert service.session is None and host._scheduler is None
    async with asyncio.timeout(5):
        while scheduler_threads():
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("bad, reason", [
    (TTSAudioRawFrame(audio=b"\x01" * 1001, sample_rate=16000, num_channels=1), "not 16-bit PCM"),
    (TTSAudioRawFrame(audio=b"\x01" * 640, sample_rate=0, num_channels=1), "sample rate is 0 Hz"),
])
async def test_audio_that_is_not_16_bit_pcm_is_an_error_frame_and_the_rest_plays(settings, bad, reason):
    pcm = tts_speech(0.4)
    service = LipstreamVideoService(avatar="astronaut", host=LocalSessions(settings))
    down, up = await run(service, [TTSStartedFrame(), bad, *tts_frames(pcm, 16000), TTSStoppedFrame()])
    [error] = errors(up)
    assert reason in error
    assert np.array_equal(spoken(down)[:pcm.size], pcm)


async def test_an_unknown_avatar_is_an_error_frame_and_the_voice_goes_on_without_a_face(settings):
    service = LipstreamVideoService(avatar="nobody", host=LocalSessions(settings))
    speech = tts_frames(tts_speech(0.2), 16000)
    down, up = await run(service, [TTSStartedFrame(), *speech, TTSStoppedFrame()])
    [error] = errors(up)
    assert "'nobody'" in error and "no avatar" in error and not service.is_usable
    assert not images(down) and [f for f in down if isinstance(f, TTSAudioRawFrame)] == speech


async def test_a_cancel_frame_closes_the_session_at_once(settings):
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.workers.runner import WorkerRunner

    host = LocalSessions(settings)
    service = LipstreamVideoService(avatar="astronaut", host=host)
    worker = PipelineWorker(Pipeline([service]), cancel_on_idle_timeout=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    async with asyncio.timeout(TIMEOUT_S):
        while service.session is None:
            await asyncio.sleep(0.02)
        await worker.queue_frames([TTSStartedFrame(), *tts_frames(tts_speech(5.0), 16000)])
        while not service.session.session.speaking:
            await asyncio.sleep(0.02)
        began = asyncio.get_running_loop().time()
        await worker.cancel()
        await running
        assert asyncio.get_running_loop().time() - began < 2, "it did not wait for the 5 s of speech"
        assert service.session is None and host._scheduler is None and not host._open
        while scheduler_threads():
            await asyncio.sleep(0.05)
