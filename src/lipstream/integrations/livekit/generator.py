"""`LipstreamVideoGenerator`: a lipstream session as a LiveKit Agents `VideoGenerator`, the part of an
avatar that an `AvatarRunner` drives (it takes the agent's audio from an `AudioReceiver` and publishes
what the generator yields through an `rtc.AVSynchronizer`).

    generator = LipstreamVideoGenerator(await LocalSessions().open("astronaut"))
    runner = AvatarRunner(room, audio_recv=receiver, video_gen=generator, options=generator.options)"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator

from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarOptions, VideoGenerator

from lipstream.audio.load import SAMPLE_RATE
from lipstream.errors import AudioFormatError, LipstreamError, QueueFullError
from lipstream.integrations.agent_audio import AgentSpeech
from lipstream.integrations.local import LocalSession

log = logging.getLogger(__name__)

QUEUE_WAIT_MARGIN_S = 2.0  # audio waiting for room in a full session queue gives up this long after it must fit


class LipstreamVideoGenerator(VideoGenerator):
    """The avatar's frames for an `AvatarRunner`, made by `session`, a lipstream session of this process
    (`LocalSessions.open`, or a server's own). `aclose()` closes the session.

    In: `push_audio(rtc.AudioFrame)`: 16-bit PCM at 8..192 kHz, any channel count, resampled to 16 kHz
    mono and spoken; `push_audio(AudioSegmentEnd())` ends the segment. A segment is an utterance of the
    session. A frame that is not usable is logged and dropped. Audio that comes faster than it plays
    waits for room in the session's queue (`max_queued_audio_s`) rather than being dropped.
    `clear_buffer()`: the queued speech is dropped and no more of it is yielded; the session's next
    frame is idle (the avatar stops within two frames).

    Out (async iteration, in real time at the session's fps, from the first `__aiter__` on): per session
    frame one `rtc.VideoFrame` (RGB24, `session.width` x `session.height`), then, while the avatar speaks,
    one `rtc.AudioFrame` (int16 mono 16 kHz) with the speech that plays with that image: the audio pushed,
    sample for sample after resampling, and nothing else (idle frames have no audio frame: the runner's
    audio source plays silence by itself). So the runner's playback position, the seconds of audio
    yielded in a segment, is what was heard. `AudioSegmentEnd` follows the last frame of each segment."""

    def __init__(self, session: LocalSession):
        self.session = session
        self._speech = AgentSpeech("an AudioFrame")
        self._segments: deque[int] = deque()  # samples given to the session, a segment each, not all yielded yet
        self._open = False  # the last of _segments still takes audio
        self._yielded = 0  # samples of the first of _segments yielded
        self._muted = False  # cleared: no speech is yielded until the session's "interrupted" frame
        self._clears = 0  # clear_buffer() calls: audio waiting for room since before one is dropped

    @property
    def options(self) -> AvatarOptions:
        """What an AvatarRunner publishes for these frames: their size and rate, 16 kHz mono audio."""
        return AvatarOptions(video_width=self.session.width, video_height=self.session.height,
                             video_fps=self.session.fps, audio_sample_rate=SAMPLE_RATE, audio_channels=1)

    # ---- in --------------------------------------------------------------------------------------

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            await self._end_segment()
            return
        if not isinstance(frame, rtc.AudioFrame):
            raise TypeError(f"push_audio takes an rtc.AudioFrame or an AudioSegmentEnd, not {type(frame).__name__}")
        try:
            pcm = self._speech.push(bytes(frame.data), frame.sample_rate, frame.num_channels)
        except AudioFormatError as exc:
            log.error("lipstream session %s: %s; the frame was dropped", self.session.id, exc)
            return
        if not self._open:
            self._segments.append(0)
            self._open = True
        await self._give(pcm)

    async def _end_segment(self) -> None:
        """The open segment's resampler tail, then the end of its utterance. An end with no audio since
        the last end or clear_buffer() ends nothing (a receiver ends the segment it was clearing too)."""
        if not self._open:
            return
        await self._give(self._speech.flush())
        self._open = False
        try:
            await self.session.end_speech()
        except LipstreamError as exc:
            log.error("lipstream session %s: %s", self.session.id, exc)

    async def _give(self, pcm) -> None:
        """Speech for the open segment (float32 [n] 16 kHz); waits while the session's queue is full."""
        if not pcm.size:
            return
        clears = self._clears
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.session.session.max_queue_s + QUEUE_WAIT_MARGIN_S
        while True:
            try:
                await self.session.push_audio(pcm)
            except QueueFullError as exc:
                if loop.time() > deadline:
                    log.error("lipstream session %s: %s; %d samples were dropped", self.session.id, exc, pcm.size)
                    return
                await asyncio.sleep(1 / self.session.fps)
                if clears != self._clears:
                    return  # cleared meanwhile: this audio belongs to the speech dropped
                continue
            except LipstreamError as exc:  # closed, or not audio it takes
                log.error("lipstream session %s: %s; the audio was dropped", self.session.id, exc)
                return
            if clears == self._clears:
                self._segments[-1] += pcm.size
            return

    async def clear_buffer(self) -> None:
        """Interrupt: the queued speech is dropped, and no more of it is yielded (from now on)."""
        self._clears += 1
        self._muted = True
        self._speech.reset()
        self._segments.clear()
        self._open = False
        self._yielded = 0
        try:
            await self.session.interrupt()
        except LipstreamError as exc:
            log.error("lipstream session %s: %s", self.session.id, exc)

    # ---- out -------------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        async for frame in self.session.frames("rgb"):
            if "interrupted" in frame.events:
                self._muted = False
            height, width = frame.image.shape[:2]
            yield rtc.VideoFrame(width, height, rtc.VideoBufferType.RGB24, frame.image.tobytes())
            speech = 0 if self._muted else frame.speech_samples  # after the yield: a clear may have come
            if speech:
                if self._segments:
                    self._yielded += speech
                yield rtc.AudioFrame(frame.audio[:speech].tobytes(), SAMPLE_RATE, 1, speech)
            while self._segments and (len(self._segments) > 1 or not self._open) \
                    and self._yielded >= self._segments[0]:
                self._yielded -= self._segments.popleft()
                yield AudioSegmentEnd()

    async def aclose(self) -> None:
        """Close the session (the iteration ends)."""
        await self.session.aclose()
