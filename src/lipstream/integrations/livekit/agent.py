"""`AvatarSession` (provider "lipstream"): the plug-in a LiveKit agent starts to get lipstream's face,
in one of two modes.

- In-process (no `url`): the engine runs in the agent's own process. One call wires LiveKit's
  `QueueAudioOutput` (the agent's audio output, and the avatar's audio source) and `AvatarRunner` around a
  `LipstreamVideoGenerator`; the agent's own participant publishes `avatar_video` and `avatar_audio`.
- On a lipstream server (`url`, `api_key`): it mints a token for the avatar participant (kind agent,
  allowed to join the room, attribute `lk.publish_on_behalf` = the agent's identity), asks the server to
  join with it (`POST /api/livekit/sessions`), and sends the agent's speech to that participant over data
  streams (`DataStreamAudioOutput` at 16 kHz, once the avatar's video track is published).

Start it before `AgentSession.start`, and turn off `resume_false_interruption` (an avatar cannot pause
its speech; the framework says so in its log otherwise)."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from livekit import api, rtc
from livekit.agents import AgentSession, get_job_context
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice import avatar as lk_avatar

from lipstream.audio.load import SAMPLE_RATE
from lipstream.client import LipstreamClient
from lipstream.errors import LipstreamError, ServerUnreachableError, SessionNotFoundError, SettingsError
from lipstream.integrations.livekit.generator import LipstreamVideoGenerator
from lipstream.integrations.local import LocalSessions
from lipstream.integrations.source import SessionSource

log = logging.getLogger(__name__)

PROVIDER = "lipstream"
AVATAR_IDENTITY = "lipstream-avatar"
AVATAR_NAME = "lipstream"
SERVER_TIMEOUT_S = 30.0  # the server answers once its avatar has joined the room (it tries for 15 s)


def avatar_token(*, room: str, agent_identity: str, api_key: str, api_secret: str,
                 identity: str = AVATAR_IDENTITY, name: str = AVATAR_NAME, ttl: timedelta | None = None) -> str:
    """The access token (a JWT signed with the LiveKit API secret) an avatar worker joins `room` with:
    participant `identity` of kind agent, allowed to join that room (and to publish and send data),
    publishing on behalf of the agent `agent_identity` (attribute `lk.publish_on_behalf`), so that
    LiveKit's clients show its tracks as the agent's. ttl: default the LiveKit SDK's (6 hours)."""
    token = (api.AccessToken(api_key, api_secret).with_kind("agent").with_identity(identity).with_name(name)
             .with_grants(api.VideoGrants(room_join=True, room=room))
             .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity}))
    if ttl is not None:
        token = token.with_ttl(ttl)
    return token.to_jwt()


class AvatarSession(lk_avatar.AvatarSession):
    """lipstream as the face of a LiveKit agent (see the module doc).

    avatar: an avatar name (in-process: under the avatars root, or an avatar folder; on a server: one of
    its API key's avatars). url / api_key: a lipstream server (its address as seen from the agent, e.g.
    "http://gpu-box:2160"); without `url` the session runs in this process. fps: the session's frame
    rate (default the setting); output_height: frames scaled to this height (default the setting; 0: the
    avatar's size). host: in-process, a `LocalSessions` to share between avatars or to set the settings
    with (default: one of its own, with the settings `lipstream serve` would read). avatar_identity /
    avatar_name: the avatar participant's, on a server."""

    def __init__(self, *, avatar: str | os.PathLike, url: str | None = None, api_key: str | None = None,
                 fps: int | None = None, output_height: int | None = None, host: LocalSessions | None = None,
                 avatar_identity: str = AVATAR_IDENTITY, avatar_name: str = AVATAR_NAME):
        super().__init__()
        self._source = SessionSource(avatar, url, api_key, fps, output_height, host)
        self._identity = avatar_identity
        self._name = avatar_name
        self._local_room: rtc.Room | None = None  # in-process: the agent's room, whose participant publishes
        self._runner: lk_avatar.AvatarRunner | None = None
        self._generator: LipstreamVideoGenerator | None = None
        self._client: LipstreamClient | None = None
        self._session_id: str | None = None

    @property
    def avatar_identity(self) -> str:
        """The participant that publishes the avatar: the agent's own in-process, else the avatar's."""
        if self._local_room is not None:
            return self._local_room.local_participant.identity
        return self._identity

    @property
    def provider(self) -> str:
        return PROVIDER

    @property
    def session_id(self) -> str | None:
        """The lipstream session (in-process, or on the server) once started."""
        return self._session_id

    async def start(self, agent_session: AgentSession, room: rtc.Room, *, livekit_url: str | None = None,
                    livekit_api_key: str | None = None, livekit_api_secret: str | None = None) -> None:
        """Give `agent_session` (not started yet) this face in `room` (connected). On a server: the
        LiveKit server's URL as the lipstream server reaches it, API key and secret (default the
        LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET environment variables; they sign the avatar's
        token). Raises what opening the session raises (AvatarNotFoundError, LiveKitJoinError, ...)."""
        if self._source.url is None:
            await self._start_in_process(agent_session, room)
            return
        await self._start_on_server(agent_session, room, livekit_url, livekit_api_key, livekit_api_secret)
        await super().start(agent_session, room)

    async def _start_in_process(self, agent_session: AgentSession, room: rtc.Room) -> None:
        self._local_room = room
        try:
            session = await self._source.open_local()
            self._session_id = session.id
            self._generator = LipstreamVideoGenerator(session)
            audio = lk_avatar.QueueAudioOutput(sample_rate=SAMPLE_RATE, wait_playback_start=True)
            runner = lk_avatar.AvatarRunner(room, audio_recv=audio, video_gen=self._generator,
                                            options=self._generator.options)
            await runner.start()
            self._runner = runner
        except BaseException:
            await self.aclose()
            raise
        agent_session.output.replace_audio_tail(audio)
        job = get_job_context(required=False)
        if job is not None:
            job.add_shutdown_callback(self.aclose)

    async def _start_on_server(self, agent_session: AgentSession, room: rtc.Room, livekit_url: str | None,
                               api_key: str | None, api_secret: str | None) -> None:
        livekit_url = livekit_url or os.environ.get("LIVEKIT_URL")
        api_key = api_key or os.environ.get("LIVEKIT_API_KEY")
        api_secret = api_secret or os.environ.get("LIVEKIT_API_SECRET")
        missing = [name for name, value in (("LIVEKIT_URL", livekit_url), ("LIVEKIT_API_KEY", api_key),
                                            ("LIVEKIT_API_SECRET", api_secret)) if not value]
        if missing:
            raise SettingsError(f"the lipstream avatar needs the LiveKit server's URL, API key and secret to let "
                                f"the lipstream server join the room; set {', '.join(missing)} (or pass "
                                "livekit_url, livekit_api_key, livekit_api_secret to start())")
        job = get_job_context(required=False)
        agent = job.local_participant_identity if job is not None else room.local_participant.identity
        token = avatar_token(room=room.name, agent_identity=agent, api_key=api_key, api_secret=api_secret,
                             identity=self._identity, name=self._name)
        source = self._source
        self._client = LipstreamClient(source.url, source.api_key, timeout_s=SERVER_TIMEOUT_S)
        try:
            info = await self._client.create_livekit_session(str(source.avatar), livekit_url, token, fps=source.fps,
                                                             output_height=source.output_height)
        except BaseException:
            await self._client.aclose()
            self._client = None
            raise
        self._session_id = info["id"]
        log.info("lipstream session %s joins room %s as %s", self._session_id, room.name, self._identity)
        agent_session.output.replace_audio_tail(lk_avatar.DataStreamAudioOutput(
            room, destination_identity=self._identity, sample_rate=SAMPLE_RATE,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO, wait_playback_start=True))

    async def aclose(self) -> None:
        """Stop the avatar (idempotent): in-process, the runner and the session; on a server, the session
        there (the avatar leaves the room) and the avatar participant."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.aclose()
        generator, self._generator = self._generator, None
        if generator is not None:
            await generator.aclose()
        await self._source.aclose()
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close_livekit_session(self._session_id)
            except (SessionNotFoundError, ServerUnreachableError):
                pass  # it left already, or the server is gone
            except LipstreamError as exc:
                log.warning("closing lipstream session %s: %s", self._session_id, exc)
            finally:
                await client.aclose()
            await super().aclose()
