"""LiveKit Agents: lipstream as the face of a LiveKit agent (extra `lipstream[livekit]`).

    avatar = AvatarSession(avatar="astronaut")                       # the engine runs in the agent's process
    # or AvatarSession(avatar="astronaut", url="http://gpu-box:2160", api_key=key)   # on a lipstream server
    await avatar.start(session, room=ctx.room)                       # before session.start(...)

- `LipstreamVideoGenerator` (generator.py): a lipstream session as LiveKit's `VideoGenerator`.
- `RoomAvatar` (room.py): a session as the avatar participant of a room (what a lipstream server runs
  for `POST /api/livekit/sessions`).
- `AvatarSession`, `avatar_token` (agent.py): the agent's side, in-process or on a server.

The protocol (LiveKit's): the agent's speech as 16-bit PCM byte streams on topic `lk.audio_stream`, one
stream a segment; RPCs `lk.clear_buffer` (agent -> avatar), `lk.playback_started` and
`lk.playback_finished` {"playback_position": seconds heard, "interrupted"} (avatar -> agent); the avatar
publishes `avatar_video` (camera) and `avatar_audio` (microphone)."""

from lipstream.integrations.livekit.agent import AvatarSession, avatar_token
from lipstream.integrations.livekit.generator import LipstreamVideoGenerator
from lipstream.integrations.livekit.room import RoomAvatar

__all__ = ["AvatarSession", "LipstreamVideoGenerator", "RoomAvatar", "avatar_token"]
