"""A LiveKit voice agent whose face is lipstream (the `lipstream[livekit]` extra).

    python examples/livekit_avatar_agent.py dev                        # a worker: LiveKit sends it each new room
    python examples/livekit_avatar_agent.py connect --room my-room     # straight into one room

The LiveKit server: LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET (`livekit-server --dev` listens on
ws://localhost:7880 with the key `devkey` and the secret `secret`). Open the room in any LiveKit client
(e.g. the Agents Playground, or `lk room join`) to see and hear the agent.

With nothing else configured it runs offline: it greets whoever is in the room in espeak-ng's voice and
the avatar says it. For a conversation, give it LiveKit Agents plugins, each as "module:Class" and its
keyword arguments as JSON:

  STT_SERVICE, STT_ARGS    e.g. livekit.plugins.deepgram:STT and {"model": "nova-3"}
  LLM_SERVICE, LLM_ARGS    e.g. livekit.plugins.openai:LLM and {"model": "gpt-4o-mini"} (an LLM needs an STT)
  TTS_SERVICE, TTS_ARGS    e.g. livekit.plugins.cartesia:TTS and {} (default: espeak-ng, offline)
  AGENT_GREETING           what the agent says first ("" for nothing)

lipstream:

  LIPSTREAM_URL            a lipstream server to render on, e.g. http://gpu-box:2160: it joins the room as
  LIPSTREAM_API_KEY          the avatar participant (default: the engine runs in this process, chosen as
                             `lipstream serve` chooses it, and the agent's own participant shows the face)
  LIPSTREAM_AGENT_AVATAR   the avatar: in this process a name or a folder (default: the demo avatar, made
                           from the astronaut photo the first time); on a server one of its key's avatars
  LIPSTREAM_LIVEKIT_URL    the LiveKit server's URL as the lipstream server reaches it (default LIVEKIT_URL)

The lipstream settings (LIPSTREAM_AVATARS, LIPSTREAM_ENGINE, LIPSTREAM_OUTPUT_HEIGHT, ...) apply as they
do to `lipstream serve`. An agent with an avatar must not resume its speech after a false interruption
(the avatar cannot pause it): this one turns `resume_false_interruption` off."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from livekit import rtc
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, cli

from lipstream.config import load_settings
from lipstream.demo import SAMPLE_AVATAR, sample_avatar, synthesize_speech
from lipstream.errors import LipstreamError
from lipstream.integrations.livekit import AvatarSession
from lipstream.integrations.local import LocalSessions, shared_engine
from lipstream.stream.pcm import to_pcm16

log = logging.getLogger("lipstream-agent")

INSTRUCTIONS = ("You are a friendly assistant with a face, talking with someone over video. Answer in one or "
                "two short spoken sentences, in plain words: no lists, no markdown, no emoji.")
GREETING = "Hello! I am an agent with a lipstream face."
CHUNK_S = 0.1


@dataclass
class AgentConfig:
    """What the agent runs with; `from_env()` reads it as the module docstring says."""

    avatar: str
    url: str | None
    api_key: str | None
    livekit_url: str | None
    stt: tuple[str, dict] | None
    llm: tuple[str, dict] | None
    tts: tuple[str, dict] | None
    greeting: str

    @classmethod
    def from_env(cls, environ=os.environ) -> AgentConfig:
        def plugin(name: str) -> tuple[str, dict] | None:
            spec = environ.get(f"{name}_SERVICE")
            return (spec, json.loads(environ.get(f"{name}_ARGS") or "{}")) if spec else None

        return cls(avatar=environ.get("LIPSTREAM_AGENT_AVATAR") or SAMPLE_AVATAR, url=environ.get("LIPSTREAM_URL"),
                   api_key=environ.get("LIPSTREAM_API_KEY"), livekit_url=environ.get("LIPSTREAM_LIVEKIT_URL"),
                   stt=plugin("STT"), llm=plugin("LLM"), tts=plugin("TTS"),
                   greeting=environ.get("AGENT_GREETING", GREETING))


def load_plugin(spec: str, kwargs: dict):
    """An instance of "module:Class" with keyword arguments (any LiveKit Agents plugin)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


async def espeak_frames(text: str) -> AsyncIterator[rtc.AudioFrame]:
    """`text` in espeak-ng's voice, as 16 kHz AudioFrames of 100 ms. TextToSpeechError (at once, not
    when the frames are read) when espeak-ng is missing or fails."""
    pcm = to_pcm16((await asyncio.to_thread(synthesize_speech, text)).mono_16k())
    step = round(16000 * CHUNK_S)

    async def frames() -> AsyncIterator[rtc.AudioFrame]:
        for at in range(0, pcm.size, step):
            chunk = pcm[at:at + step]
            yield rtc.AudioFrame(chunk.tobytes(), 16000, 1, chunk.size)

    return frames()


def prewarm(proc: JobProcess) -> None:
    """Each job process loads the engine once, before its room comes (in-process mode only)."""
    if not AgentConfig.from_env().url:
        host = LocalSessions()
        shared_engine(host.settings)
        proc.userdata["lipstream"] = host


server = AgentServer(setup_fnc=prewarm, initialize_process_timeout=120)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    config = AgentConfig.from_env()
    await ctx.connect()
    plugins = {name: load_plugin(*spec) for name, spec in (("stt", config.stt), ("llm", config.llm),
                                                           ("tts", config.tts)) if spec}
    session = AgentSession(**plugins, turn_handling={"interruption": {"resume_false_interruption": False}})
    avatar = AvatarSession(avatar=config.avatar, url=config.url, api_key=config.api_key,
                           host=None if config.url else ctx.proc.userdata.get("lipstream"))
    await avatar.start(session, room=ctx.room, livekit_url=config.livekit_url)  # before the session starts
    await session.start(agent=Agent(instructions=INSTRUCTIONS), room=ctx.room)
    if config.greeting and config.tts:
        session.say(config.greeting)
    elif config.greeting:
        try:
            session.say(config.greeting, audio=await espeak_frames(config.greeting))
        except LipstreamError as exc:
            log.error("the greeting cannot be spoken: %s", exc)


def main() -> None:
    config = AgentConfig.from_env()
    if config.llm and not config.stt:
        raise SystemExit("with an LLM (LLM_SERVICE) the agent needs speech to text: set STT_SERVICE (and STT_ARGS)")
    running = len(sys.argv) > 1 and sys.argv[1] in ("dev", "start", "connect", "console")
    if running and not config.url and config.avatar == SAMPLE_AVATAR:  # made once here, not in each job
        settings = load_settings()
        sample_avatar(settings.avatars_root, settings.models_root, progress=False)
    cli.run_app(server)


if __name__ == "__main__":
    main()
