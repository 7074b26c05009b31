"""Pipecat: `LipstreamVideoService`, lipstream as the face of a Pipecat voice agent (extra `lipstream[pipecat]`).

    pipeline = Pipeline([transport.input(), stt, user_aggregator, llm, tts,
                         LipstreamVideoService(avatar="astronaut"),      # the engine runs in this process
                         transport.output(), assistant_aggregator])
    # or LipstreamVideoService(avatar="astronaut", url="http://gpu-box:2160", api_key=key)  # a lipstream server

In: `TTSAudioRawFrame` (16-bit PCM at any rate, mono or stereo; resampled to 16 kHz mono) is the avatar's
speech; `TTSStartedFrame` / `TTSStoppedFrame` bound an utterance (and pass on). The TTS audio is consumed:
the transport plays the avatar's copy of it, in step with the mouth, so it is not heard twice.
`InterruptionFrame`: the queued speech is dropped, no more of it is heard, and the avatar is idle
within two frames.

Out: from the `StartFrame` on, one `OutputImageRawFrame` (RGB, `sync_with_audio`, so the transport shows it
when the audio before it has played) per session frame, at the session's fps, idle frames while nobody
speaks; each followed by the audio that plays with it, a 16 kHz mono `SpeechOutputAudioRawFrame`
(silence when idle: the transport tells the bot's speech by it, as for other video services). Both carry
`metadata["lipstream"] = {"index", "pts", "speaking", "events"}`. Every other frame passes on.

Transport: `video_out_enabled=True`, `video_out_is_live=False` (images come through the audio queue),
`video_out_framerate` = the session's fps, `video_out_width/height` = the avatar's frame size (else the
transport resizes every frame).

`StartFrame` opens the lipstream session (in-process: the engine `auto` chooses, the avatar by name or
folder; remote: through `lipstream.client`); `EndFrame` lets the queued speech play, then closes it;
`CancelFrame` closes it at once. Errors (unknown avatar, a server that cannot be reached or refuses, a
session the server closes, audio that is not 16-bit PCM) go upstream as `ErrorFrame`s with the reason;
without a session the TTS audio passes on unchanged, so the agent goes on speaking, without a face."""

from __future__ import annotations

import asyncio
import logging
import os

import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings
from pipecat.utils.errors import ErrorCategory

from lipstream import errors
from lipstream.client import AvatarFrame, LipstreamClient, RemoteSession
from lipstream.errors import AudioFormatError, LipstreamError
from lipstream.integrations.agent_audio import AgentSpeech
from lipstream.integrations.local import LocalSession, LocalSessions
from lipstream.integrations.source import SessionSource
from lipstream.stream.clock import SAMPLE_RATE

log = logging.getLogger(__name__)

DRAIN_MARGIN_S = 2.0  # at the EndFrame, how much longer than its queued audio the speech may take to play

# What kind of failure each error is, for Pipecat (the first matching class decides).
CATEGORIES = (
    (errors.ApiKeyError, ErrorCategory.AUTHENTICATION),
    (errors.ServerUnreachableError, ErrorCategory.CONNECTIVITY),
    (errors.SessionLimitError, ErrorCategory.RATE_LIMIT),
    (errors.QueueFullError, ErrorCategory.RATE_LIMIT),
    (errors.AudioFormatError, ErrorCategory.APPLICATION),
    (errors.AvatarError, ErrorCategory.INVALID_REQUEST),
    (errors.WeightsError, ErrorCategory.INVALID_REQUEST),
    (errors.SettingsError, ErrorCategory.INVALID_REQUEST),
    (errors.BadRequestError, ErrorCategory.INVALID_REQUEST),
    (errors.LipstreamError, ErrorCategory.SERVER),
)


class LipstreamVideoService(AIService):
    """The avatar of a Pipecat pipeline: after the TTS, before `transport.output()`.

    avatar: an avatar name (in-process: under the avatars root; remote: one of the key's avatars) or,
    in-process, an avatar folder. url / api_key: a lipstream server (remote mode); without `url` the
    session runs in this process. fps: the session's frame rate (default: the setting). output_height:
    frames scaled to this height (default: the setting; 0: the avatar's own size). host: in-process,
    a `LocalSessions` to share between services (one engine scheduler for all their sessions) or to
    set the settings with; default: one of its own, with the settings `lipstream serve` would read."""

    def __init__(self, *, avatar: str | os.PathLike, url: str | None = None, api_key: str | None = None,
                 fps: int | None = None, output_height: int | None = None, host: LocalSessions | None = None,
                 **kwargs):
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        self._source = SessionSource(avatar, url, api_key, fps, output_height, host)
        self._client: LipstreamClient | None = None
        self._session: LocalSession | RemoteSession | None = None
        self._player: asyncio.Task | None = None
        self._speech = AgentSpeech("a TTSAudioRawFrame")  # the utterance's audio -> 16 kHz mono
        self._utterance_open = False
        self._pushed = 0  # 16 kHz samples of speech given to the session since the last interruption
        self._played = 0  # ... and heard since then (speaking frames' audio)
        self._speaking = False  # the last frame out was speaking
        self._muted = False  # interrupted: frames are silent until the session's "interrupted" frame
        self._frame_out = asyncio.Event()

    @property
    def session(self) -> LocalSession | RemoteSession | None:
        """The open lipstream session (None before the StartFrame, after the end, or after it failed)."""
        return self._session

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self, frame: StartFrame):
        await super().start(frame)
        try:
            self._session = await self._open()
        except Exception as exc:  # noqa: BLE001 - whatever stops the session, the pipeline goes on and hears why
            await self._close()
            source = self._source
            where = f"the lipstream server at {source.url}" if source.url else "lipstream in this process"
            await self.push_error(f"{where} could not open a session of avatar {str(source.avatar)!r}: {exc}",
                                  exception=exc, force_treat_as_permanent=True)

    async def stop(self, frame: EndFrame):
        await super().stop(frame)
        await self._finish_speaking()
        await self._close()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._close()

    async def cleanup(self):
        await super().cleanup()
        await self._close()

    async def _open(self) -> LocalSession | RemoteSession:
        source = self._source
        if source.url is None:
            return await source.open_local()
        self._client = LipstreamClient(source.url, source.api_key)
        return await self._client.open_session(str(source.avatar), fps=source.fps, output_height=source.output_height)

    async def _close(self) -> None:
        """Stop the frames and close the session (idempotent)."""
        player, self._player = self._player, None
        if player is not None and player is not asyncio.current_task():
            await self.cancel_task(player)
        session, self._session = self._session, None
        if session is not None:
            try:
                await session.aclose()
            except LipstreamError as exc:
                log.warning("closing lipstream session %s: %s", session.id, exc)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        await self._source.aclose()

    # ---- frames in -------------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, InterruptionFrame):
            self._muted = True  # before anything awaits: no frame of the interrupted speech goes out after this
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            if self._session is not None:
                self._player = self.create_task(self._play(self._session), f"{self}::frames")
        elif isinstance(frame, InterruptionFrame):
            await self._interrupt()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSAudioRawFrame) and self._session is not None:
            await self._speak(frame)
        elif isinstance(frame, (TTSStartedFrame, TTSStoppedFrame)):
            await self._end_utterance()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    def _classify_error(self, exception: Exception) -> ErrorCategory | None:
        return next((category for cls, category in CATEGORIES if isinstance(exception, cls)), None)

    async def _speak(self, frame: TTSAudioRawFrame) -> None:
        try:
            pcm = self._to_16k(frame)
        except AudioFormatError as exc:
            await self.push_error(f"lipstream: {exc}", exception=exc)
            return
        await self._push(pcm)
        self._utterance_open = True

    def _to_16k(self, frame: TTSAudioRawFrame) -> np.ndarray:
        """The frame's audio as float32 [n] mono 16 kHz (through the utterance's `AgentSpeech`)."""
        return self._speech.push(frame.audio, frame.sample_rate, frame.num_channels)

    async def _push(self, pcm: np.ndarray) -> None:
        if self._session is None or not pcm.size:
            return
        try:
            await self._session.push_audio(pcm)
        except errors.QueueFullError as exc:
            await self.push_error(f"lipstream: {exc}", exception=exc)
        except LipstreamError as exc:
            await self._lost(exc)
        else:
            self._pushed += pcm.size

    async def _end_utterance(self) -> None:
        """The current utterance (if any) is complete: the resampler's tail, then the end."""
        await self._push(self._speech.flush())
        if self._utterance_open and self._session is not None:
            self._utterance_open = False
            try:
                await self._session.end_speech()
            except LipstreamError as exc:
                await self._lost(exc)

    async def _interrupt(self) -> None:
        self._speech.reset()
        self._utterance_open = False
        self._pushed = self._played = 0
        if self._session is not None:
            try:
                await self._session.interrupt()
            except LipstreamError as exc:
                await self._lost(exc)

    async def _finish_speaking(self) -> None:
        """Let the speech given so far play (at most its length + DRAIN_MARGIN_S)."""
        await self._end_utterance()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0, self._pushed - self._played) / SAMPLE_RATE + DRAIN_MARGIN_S
        while self._player is not None and (self._played < self._pushed or self._speaking):
            self._frame_out.clear()
            try:
                await asyncio.wait_for(self._frame_out.wait(), deadline - loop.time())
            except TimeoutError:
                log.warning("lipstream: the speech did not finish playing by the end of the pipeline")
                return

    async def _lost(self, exc: LipstreamError) -> None:
        """The session ended under us: say so once, close what is left, and let the audio pass on."""
        if self._session is None:
            return
        session_id = self._session.id
        await self._close()
        await self.push_error(f"lipstream: session {session_id} ended ({exc}); the agent goes on speaking "
                              "without a face", exception=exc, force_treat_as_permanent=True)

    # ---- frames out ------------------------------------------------------------------------------

    async def _play(self, session: LocalSession | RemoteSession) -> None:
        try:
            async for frame in session.frames():
                await self._emit(frame)
        except LipstreamError as exc:
            await self._lost(exc)

    async def _emit(self, frame: AvatarFrame) -> None:
        """One session frame out: its image, then the audio that plays with it."""
        for error in frame.errors:
            await self.push_error(f"lipstream: {error}", exception=error)
        if "interrupted" in frame.events:
            self._muted = False
        meta = {"index": frame.index, "pts": frame.pts, "speaking": frame.speaking and not self._muted,
                "events": frame.events}
        height, width = frame.image.shape[:2]
        image = OutputImageRawFrame(image=frame.image.tobytes(), size=(width, height), format="RGB")
        image.sync_with_audio = True
        image.metadata["lipstream"] = meta
        await self.push_frame(image)
        speaking = frame.speaking and not self._muted  # again: an interruption may have come meanwhile
        audio = frame.audio if speaking else np.zeros_like(frame.audio)
        sound = SpeechOutputAudioRawFrame(audio=audio.tobytes(), sample_rate=SAMPLE_RATE, num_channels=1)
        sound.metadata["lipstream"] = {**meta, "speaking": speaking}
        await self.push_frame(sound)
        self._played += audio.size if speaking else 0
        self._speaking = speaking
        self._frame_out.set()
