"""LipstreamVideoGenerator against LiveKit's VideoGenerator contract, with the real livekit objects
(offline: AudioFrame, VideoFrame, QueueAudioOutput, AVSynchronizer) and an in-process warp session: 25
images per second of audio, the audio out equal to the audio in, AudioSegmentEnd after each segment's
last frame, interruption, a full session queue, bad frames."""

from __future__ import annotations

import asyncio
import itertools
import logging

import numpy as np
import pytest
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, QueueAudioOutput

from lipstream.audio.load import PcmStream, resampler_delay
from lipstream.integrations.livekit import LipstreamVideoGenerator
from lipstream.integrations.local import LocalSessions
from lipstream.stream.pcm import to_pcm16
from pipecat_helpers import tts_speech
from server_helpers import server_settings, store_avatar

pytestmark = pytest.mark.anyio
FPS = 25
TIMEOUT_S = 30  # no test may hang


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("avatars")
    store_avatar(root)
    return server_settings(root, engine="warp", output_height=128)


@pytest.fixture
async def generator(settings):
    host = LocalSessions(settings)
    generator = LipstreamVideoGenerator(await host.open("astronaut"))
    yield generator
    await host.aclose()


def audio_frames(pcm: np.ndarray, rate: int, chunk_ms: int = 100) -> list[rtc.AudioFrame]:
    """int16 [n] at `rate` as a DataStreamAudioReceiver hands it on: AudioFrames of `chunk_ms`."""
    step = rate * chunk_ms // 1000
    return [rtc.AudioFrame(pcm[i:i + step].tobytes(), rate, 1, pcm[i:i + step].size) for i in range(0, pcm.size, step)]


async def push_segment(generator: LipstreamVideoGenerator, pcm: np.ndarray, rate: int = 16000) -> None:
    for frame in audio_frames(pcm, rate):
        await generator.push_audio(frame)
    await generator.push_audio(AudioSegmentEnd())


async def take(frames, until, limit: int = 400) -> list:
    """Items of the generator's iterator `frames` up to the first for which until(items) holds."""
    items = []
    async with asyncio.timeout(TIMEOUT_S):
        while len(items) < limit:
            items.append(await anext(frames))
            if until(items):
                return items
    raise AssertionError(f"not there after {limit} items")


def ends(items) -> int:
    return sum(isinstance(i, AudioSegmentEnd) for i in items)


def heard(items) -> np.ndarray:
    """The audio yielded, int16 [n] 16 kHz."""
    parts = [np.frombuffer(bytes(i.data), np.int16) for i in items if isinstance(i, rtc.AudioFrame)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int16)


def pixels(frame: rtc.VideoFrame) -> np.ndarray:
    return np.frombuffer(bytes(frame.data), np.uint8).reshape(frame.height, frame.width, 3)


def resampled(pcm: np.ndarray, rate: int) -> np.ndarray:
    """What the session is given for int16 `pcm` at `rate`: the same resampler over the whole segment."""
    stream = PcmStream(rate, lead_in=True)
    return to_pcm16(np.concatenate([stream.push(pcm.tobytes()), stream.flush()]))


@pytest.mark.parametrize("rate", [16000, 24000])
async def test_25_images_a_second_and_the_audio_out_is_the_audio_in_then_the_segment_end(generator, rate):
    pcm = tts_speech(1.2, rate)
    frames = aiter(generator)
    await push_segment(generator, pcm, rate)  # all at once, as a data stream brings it
    items = await take(frames, lambda items: ends(items) == 1)
    items += await take(frames, lambda more: len(more) == 3)
    videos = [i for i in items if isinstance(i, rtc.VideoFrame)]
    assert all((v.width, v.height, v.type) == (128, 128, rtc.VideoBufferType.RGB24) for v in videos)
    audios = [i for i in items if isinstance(i, rtc.AudioFrame)]
    assert all((a.sample_rate, a.num_channels) == (16000, 1) for a in audios)
    assert all(isinstance(before, rtc.VideoFrame) for before, item in itertools.pairwise(items)
               if isinstance(item, rtc.AudioFrame)), "each audio frame follows its image"
    assert abs(len(audios) - 1.2 * FPS) <= 1, "25 images a second of speech carry it"
    expected = resampled(pcm, rate)
    assert expected.size == round(pcm.size * 16000 / rate) + resampler_delay(rate)
    assert np.array_equal(heard(items), expected), "the audio yielded is the audio pushed, and only that"
    end = next(k for k, item in enumerate(items) if isinstance(item, AudioSegmentEnd))
    assert items[end - 1] is audios[-1], "the segment's end comes right after its last frame"
    assert not [i for i in items[end:] if isinstance(i, rtc.AudioFrame)]
    talking = [v for v, a in itertools.pairwise(items) if isinstance(a, rtc.AudioFrame)]
    idle = pixels(items[end + 1]).astype(int)
    assert max(int(np.abs(pixels(v).astype(int) - idle).max()) for v in talking) > 60, "the mouth moves"


async def test_segments_pushed_back_to_back_end_one_after_the_other(generator):
    first, second = tts_speech(0.6, seed=1), tts_speech(0.8, seed=2)
    frames = aiter(generator)
    await push_segment(generator, first)
    await push_segment(generator, second)
    items = await take(frames, lambda items: ends(items) == 2)
    cut = next(k for k, item in enumerate(items) if isinstance(item, AudioSegmentEnd))
    assert np.array_equal(heard(items[:cut]), first) and np.array_equal(heard(items[cut:]), second)


async def test_clear_buffer_stops_the_speech_at_once_and_the_next_segment_plays_whole(generator):
    pcm, answer = tts_speech(3.0, seed=3), tts_speech(1.0, seed=4)
    frames = aiter(generator)
    await push_segment(generator, pcm[:8000])
    for frame in audio_frames(pcm[8000:], 16000):  # the rest of the segment, not ended yet
        await generator.push_audio(frame)
    before = await take(frames, lambda items: heard(items).size >= 12000)  # in the middle of the second
    await generator.clear_buffer()  # as the runner does on the receiver's "clear_buffer"
    await generator.push_audio(AudioSegmentEnd())  # the receiver ends the segment it was clearing
    after = await take(frames, lambda more: len(more) == 10)
    spoken = heard(before)
    assert np.array_equal(spoken, pcm[:spoken.size]), "what was heard is the speech, up to the clear"
    assert not [i for i in after if isinstance(i, rtc.AudioFrame)], "nothing of it is heard after the clear"
    assert ends(before) == 1 and ends(after) == 0, "only the first segment, which had played, ended"
    assert 12000 <= spoken.size < 12000 + 640
    idle = pixels(next(i for i in before if isinstance(i, rtc.VideoFrame))).astype(int)
    images = [pixels(i).astype(int) for i in after if isinstance(i, rtc.VideoFrame)]
    assert all(np.array_equal(image, idle) for image in images[2:]), "idle from the third image on"
    await push_segment(generator, answer)
    again = await take(frames, lambda more: ends(more) == 1)
    assert np.array_equal(heard(again), answer), "the next segment plays whole, and ends"


async def test_a_full_session_queue_holds_the_audio_back_and_none_is_lost(settings):
    host = LocalSessions(settings.model_copy(update={"max_queued_audio_s": 1.0}))
    try:
        generator = LipstreamVideoGenerator(await host.open("astronaut"))
        pcm = tts_speech(2.5, seed=5)
        frames = aiter(generator)
        pushing = asyncio.create_task(push_segment(generator, pcm))  # 2.5 s into a queue of 1 s: it waits
        items = await take(frames, lambda items: ends(items) == 1)
        assert pushing.done() and np.array_equal(heard(items), pcm)
    finally:
        await host.aclose()


async def test_frames_that_are_not_usable_are_dropped_with_a_clear_log_and_the_rest_plays(generator, caplog):
    pcm = tts_speech(0.4, seed=6)
    frames = aiter(generator)
    with caplog.at_level(logging.ERROR, logger="lipstream"):
        await generator.push_audio(rtc.AudioFrame(pcm[:1600].tobytes(), 4000, 1, 1600))
        await push_segment(generator, pcm)
    assert "sample rate is 4000 Hz" in caplog.text and "dropped" in caplog.text
    items = await take(frames, lambda items: ends(items) == 1)
    assert np.array_equal(heard(items), pcm)
    with pytest.raises(TypeError, match="rtc.AudioFrame or an AudioSegmentEnd"):
        await generator.push_audio(pcm)


async def test_through_a_queue_audio_output_and_a_real_av_synchronizer(generator):
    """The in-process chain, as AvatarRunner runs it: the agent's QueueAudioOutput -> push_audio; the
    generator's frames -> an AVSynchronizer's audio and video sources; the playback position (the
    audio pushed to the synchronizer) back to the agent's output when the segment ends."""
    pcm = tts_speech(1.0, rate=24000, seed=7)
    output = QueueAudioOutput(sample_rate=24000, wait_playback_start=True)
    audio_source = rtc.AudioSource(16000, 1, queue_size_ms=100)
    video_source = rtc.VideoSource(generator.session.width, generator.session.height)
    av_sync = rtc.AVSynchronizer(audio_source=audio_source, video_source=video_source, video_fps=FPS,
                                 video_queue_size_ms=100)
    pushed = {"video": 0, "audio": 0.0}

    async def read_audio():
        async for frame in output:
            await generator.push_audio(frame)

    async def forward():
        async for item in generator:
            if isinstance(item, AudioSegmentEnd):
                output.notify_playback_finished(pushed["audio"], interrupted=False)
                return
            if isinstance(item, rtc.AudioFrame) and pushed["audio"] == 0:
                output.notify_playback_started()
            await av_sync.push(item)
            if isinstance(item, rtc.VideoFrame):
                pushed["video"] += 1
            else:
                pushed["audio"] += item.duration

    tasks = [asyncio.create_task(read_audio()), asyncio.create_task(forward())]
    try:
        async with asyncio.timeout(TIMEOUT_S):
            for frame in audio_frames(pcm, 24000, chunk_ms=20):  # the agent's TTS, 20 ms at a time
                await output.capture_frame(frame)
            output.flush()
            finished = await output.wait_for_playout()
            await av_sync.wait_for_playout()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await av_sync.aclose()
        await audio_source.aclose()
        await video_source.aclose()
    expected = resampled(pcm, 24000).size / 16000
    assert not finished.interrupted and finished.playback_position == pytest.approx(expected, abs=1 / 16000)
    assert pushed["video"] >= FPS, "the images went to the video source, at least as many as speech lasts"
