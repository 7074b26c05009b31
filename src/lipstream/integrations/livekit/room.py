"""`RoomAvatar`: a lipstream session as the avatar participant of a LiveKit room, the worker side of
LiveKit's avatar protocol (what `POST /api/livekit/sessions` runs for each room).

    avatar = await RoomAvatar.join(session, "wss://my-project.livekit.cloud", token)

It joins with the token an agent minted for it, takes the agent's speech from the data streams the
agent's `DataStreamAudioOutput` sends (topic `lk.audio_stream`), answers `lk.clear_buffer`, calls
`lk.playback_started` / `lk.playback_finished` on the agent, and publishes the tracks `avatar_video` and
`avatar_audio` (through an `AVSynchronizer`, once someone subscribes): LiveKit's `DataStreamAudioReceiver`
and `AvatarRunner` around a `LipstreamVideoGenerator`. It leaves, and closes the session, when the agent
leaves, when the room closes or removes it, or on `aclose()`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from livekit import rtc
from livekit.agents import utils
from livekit.agents.voice.avatar import AvatarRunner, DataStreamAudioReceiver

from lipstream.errors import LiveKitJoinError, excerpt
from lipstream.integrations.livekit.generator import LipstreamVideoGenerator
from lipstream.integrations.local import LocalSession

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 15.0  # joining, all of the SDK's attempts together
CONNECT_ATTEMPT_S = 3.0  # one attempt of the SDK to reach the LiveKit server
AGENT_WAIT_S = 30.0  # the agent must be in the room this long after the avatar joined
RPC_CLEAR_BUFFER = "lk.clear_buffer"


class RoomAudioReceiver(DataStreamAudioReceiver):
    """LiveKit's `DataStreamAudioReceiver`, with its `lk.clear_buffer` handler registered on its own room
    only. The framework's keeps the handlers of all receivers in one table for the whole process, keyed
    by the agent's identity: in a server that joins many rooms it would keep every closed room alive and
    send a clear to the wrong room when two rooms' agents share an identity. (The handler it registers
    checks the caller's identity itself.)"""

    @classmethod
    def _register_clear_buffer_rpc(cls, room: rtc.Room, *, caller_identity: str,
                                   handler: Callable[[rtc.RpcInvocationData], str]) -> None:
        room.local_participant.register_rpc_method(RPC_CLEAR_BUFFER, handler)


class RoomAvatar:
    """`session` in a LiveKit room as the avatar of its agent (see the module doc). Made by `join`.

    agent_identity: the agent's participant identity (the token's `lk.publish_on_behalf` attribute);
    None: the first agent participant of the room. room: the `rtc.Room`. left_because: why it left
    (None while it is in the room)."""

    def __init__(self, session: LocalSession, agent_identity: str | None = None):
        self.session = session
        self.agent_identity = agent_identity
        self.room = rtc.Room()
        self.left_because: str | None = None
        self._leave = asyncio.Event()
        self._runner: AvatarRunner | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    @classmethod
    async def join(cls, session: LocalSession, url: str, token: str, *, agent_identity: str | None = None,
                   timeout_s: float = JOIN_TIMEOUT_S) -> RoomAvatar:
        """Join the room of `token` at `url` (ws[s]:// or http[s]://) and start being its avatar.
        LiveKitJoinError when the room cannot be joined within `timeout_s` (nothing listening at the
        URL, a token the server refuses, ...); the session stays open then (the caller's to close)."""
        avatar = cls(session, agent_identity)
        options = rtc.RoomOptions(auto_subscribe=False, connect_timeout=min(CONNECT_ATTEMPT_S, timeout_s))
        try:
            await asyncio.wait_for(avatar.room.connect(url, token, options), timeout_s)
        except (rtc.ConnectError, TimeoutError) as exc:
            await avatar.room.disconnect()
            why = f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
            raise LiveKitJoinError(f"lipstream could not join the LiveKit room at {excerpt(url, 100)}: {why}; check "
                                   "that a LiveKit server listens there (reachable from the lipstream server) "
                                   "and that the token is one of its own") from exc
        except BaseException:
            await avatar.room.disconnect()
            raise
        log.info("session %s joined LiveKit room %s as %s", session.id, avatar.room.name,
                 avatar.room.local_participant.identity)
        avatar.room.on("disconnected", avatar._on_disconnected)
        avatar.room.on("participant_disconnected", avatar._on_participant_left)
        avatar._task = asyncio.create_task(avatar._run(), name=f"lipstream-livekit-{session.id}")
        return avatar

    async def _run(self) -> None:
        """Wait for the agent, run the avatar until something makes it leave, then close."""
        try:
            await self._start()
        except Exception as exc:  # whatever stops it, the session must not stay behind
            log.exception("session %s: the LiveKit avatar failed to start", self.session.id)
            self._left(f"it failed to start ({type(exc).__name__}: {exc})")
        await self._leave.wait()
        await self.aclose()

    async def _start(self) -> None:
        kind = None if self.agent_identity else rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        try:
            agent = await asyncio.wait_for(utils.wait_for_participant(self.room, identity=self.agent_identity,
                                                                      kind=kind), AGENT_WAIT_S)
        except TimeoutError:
            who = f"agent {self.agent_identity!r}" if self.agent_identity else "agent"
            self._left(f"no {who} was in the room within {AGENT_WAIT_S:g} s")
            return
        self.agent_identity = agent.identity
        if agent.identity not in self.room.remote_participants:  # it left before it was known as the agent
            self._left(f"the agent {agent.identity} left")
            return
        generator = LipstreamVideoGenerator(self.session)
        runner = AvatarRunner(self.room, audio_recv=RoomAudioReceiver(self.room, sender_identity=agent.identity),
                              video_gen=generator, options=generator.options)
        await runner.start()
        self._runner = runner

    def _on_disconnected(self, reason: rtc.DisconnectReason.ValueType) -> None:
        self._left(f"the room disconnected it ({rtc.DisconnectReason.Name(reason)})")

    def _on_participant_left(self, participant: rtc.RemoteParticipant) -> None:
        if participant.identity == self.agent_identity:
            self._left(f"the agent {participant.identity} left")

    def _left(self, because: str) -> None:
        if self.left_because is None:
            self.left_because = because
            log.info("session %s leaves LiveKit room %s: %s", self.session.id, self.room.name, because)
        self._leave.set()

    async def aclose(self) -> None:
        """Leave the room and close the session (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._left("it was closed")
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._runner is not None:
            await self._runner.aclose()
        await self.room.disconnect()
        await self.session.aclose()
