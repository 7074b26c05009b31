"""A voice bot whose face is lipstream: microphone -> STT -> LLM -> TTS -> lipstream -> browser, over
Pipecat's SmallWebRTC transport (the `lipstream[pipecat]` extra) and a page of its own.

    python examples/pipecat_avatar_bot.py        # then open http://localhost:7860/

With nothing configured it runs offline, as an echo bot: Pipecat's Silero VAD cuts the user's turn and
the bot answers in espeak-ng's voice with how long the user spoke. Set an OpenAI-compatible LLM (a
local Ollama or vLLM serves one) and any Pipecat STT for a real conversation. Environment:

  LIPSTREAM_BOT_AVATAR     the avatar: a name or a folder (default: the demo avatar, made from the
                           astronaut photo the first time, as `lipstream demo` makes it)
  LIPSTREAM_URL            a lipstream server to render on (default: the engine runs in this process,
  LIPSTREAM_API_KEY          chosen as `lipstream serve` chooses it); with its API key
  LLM_BASE_URL             an OpenAI-compatible endpoint, e.g. http://localhost:11434/v1 (Ollama),
  LLM_MODEL, LLM_API_KEY     http://localhost:8000/v1 (vLLM); its model and key
  STT_SERVICE, STT_ARGS    any Pipecat STT service, "module:Class", and its keyword arguments as JSON
                           (needed with an LLM), e.g. pipecat.services.deepgram.stt:DeepgramSTTService
                           and {"api_key": "..."}
  TTS_SERVICE, TTS_ARGS    any Pipecat TTS service the same way (default: espeak-ng, offline)
  BOT_GREETING             what the bot says when someone connects ("" for nothing)

The lipstream settings (LIPSTREAM_AVATARS, LIPSTREAM_ENGINE, LIPSTREAM_OUTPUT_HEIGHT, ...) apply as they
do to `lipstream serve`. The page (pipecat_avatar_bot.html) sends the microphone and shows the bot; it
uses nothing from the internet (Pipecat's prebuilt pages load Daily's scripts from it). espeak-ng is an
optional system program (GPL), run as a separate process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.responses import FileResponse
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    LLMRunFrame,
    TTSSpeakFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest, SmallWebRTCRequestHandler
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from lipstream.client import LipstreamClient
from lipstream.config import load_settings
from lipstream.demo import SAMPLE_AVATAR, sample_avatar, synthesize_speech
from lipstream.errors import LipstreamError
from lipstream.integrations.local import is_path
from lipstream.integrations.pipecat import LipstreamVideoService
from lipstream.stream.compositor import output_size
from lipstream.stream.pcm import to_pcm16

SYSTEM_PROMPT = ("You are a friendly assistant with a face, talking with someone over video. Answer in one or "
                 "two short spoken sentences, in plain words: no lists, no markdown, no emoji.")
GREETING = "Hello! Say something, and I will answer."
ECHO_TURN = VADParams(stop_secs=0.6)  # a pause this long ends the user's turn
TTS_CHUNK_S = 0.1
PAGE = Path(__file__).with_suffix(".html")


@dataclass
class BotConfig:
    """What the bot runs with; `from_env()` reads it as the module docstring says."""

    avatar: str | None = None
    url: str | None = None
    api_key: str | None = None
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key: str | None = None
    stt: tuple[str, dict] | None = None
    tts: tuple[str, dict] | None = None
    greeting: str = GREETING
    fps: int = 25

    @classmethod
    def from_env(cls, environ=os.environ) -> BotConfig:
        def service(name: str) -> tuple[str, dict] | None:
            spec = environ.get(f"{name}_SERVICE")
            return (spec, json.loads(environ.get(f"{name}_ARGS") or "{}")) if spec else None

        return cls(avatar=environ.get("LIPSTREAM_BOT_AVATAR"), url=environ.get("LIPSTREAM_URL"),
                   api_key=environ.get("LIPSTREAM_API_KEY"), llm_base_url=environ.get("LLM_BASE_URL"),
                   llm_model=environ.get("LLM_MODEL"), llm_api_key=environ.get("LLM_API_KEY"),
                   stt=service("STT"), tts=service("TTS"), greeting=environ.get("BOT_GREETING", GREETING))


class EspeakTTSService(TTSService):
    """Text to speech with espeak-ng (offline; a separate process), streamed in 100 ms frames."""

    def __init__(self, *, voice: str = "en-us", **kwargs):
        super().__init__(push_start_frame=True, push_stop_frames=True,
                         settings=TTSSettings(model=None, voice=voice, language=None), **kwargs)
        self._voice = voice

    async def run_tts(self, text: str, context_id: str):
        try:
            speech = (await asyncio.to_thread(synthesize_speech, text, self._voice)).mono_16k()
        except LipstreamError as exc:
            yield ErrorFrame(error=str(exc))
            return
        pcm = to_pcm16(speech).tobytes()
        step = 2 * round(16000 * TTS_CHUNK_S)

        async def chunks():
            for at in range(0, len(pcm), step):
                yield pcm[at:at + step]

        async for frame in self._stream_audio_frames_from_iterator(chunks(), in_sample_rate=16000,
                                                                    context_id=context_id):
            yield frame


class EchoTurns(FrameProcessor):
    """The offline bot's brain: when the VAD says the user stopped, answer with how long they spoke;
    when they start, interrupt the bot."""

    def __init__(self):
        super().__init__()
        self._started: float | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, VADUserStartedSpeakingFrame) and direction == FrameDirection.DOWNSTREAM:
            self._started = time.monotonic() - frame.start_secs
            await self.broadcast_interruption()
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and direction == FrameDirection.DOWNSTREAM \
                and self._started is not None:
            seconds = time.monotonic() - frame.stop_secs - self._started
            self._started = None
            await self.push_frame(TTSSpeakFrame(f"I heard you speak for {seconds:.1f} seconds."))


def load_service(spec: str, kwargs: dict):
    """An instance of "module:Class" with keyword arguments (any Pipecat service)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


@dataclass(frozen=True)
class Face:
    """The avatar the bot shows, and its streamed frames' size (`output_height`: the lipstream setting)."""

    avatar: str
    width: int
    height: int
    output_height: int


async def find_face(config: BotConfig) -> Face:
    """The avatar to show (preparing the demo avatar the first time) and the size of its frames."""
    settings = load_settings()
    if config.url:
        async with LipstreamClient(config.url, config.api_key) as client:
            avatars = {a["name"]: a for a in await client.avatars()}
        name = config.avatar or SAMPLE_AVATAR
        if name not in avatars:
            raise LipstreamError(f"the server at {config.url} has no avatar {name!r}; it has "
                                 f"{', '.join(avatars) or 'none'} (set LIPSTREAM_BOT_AVATAR)")
        frame_size = avatars[name]["height"], avatars[name]["width"]
    else:
        from lipstream.avatar.store import load_avatar

        if config.avatar:
            name = config.avatar
            avatar = await asyncio.to_thread(load_avatar, name, root=None if is_path(name) else settings.avatars_root)
        else:
            name = SAMPLE_AVATAR
            avatar, _ = await asyncio.to_thread(sample_avatar, settings.avatars_root, settings.models_root,
                                                progress=False)
        frame_size = avatar.frame_size
    height, width = output_size(frame_size, settings.output_height)
    return Face(name, width, height, settings.output_height)


async def run_bot(connection: SmallWebRTCConnection, config: BotConfig, face: Face) -> None:
    """One conversation over `connection`, until the browser leaves."""
    transport = SmallWebRTCTransport(webrtc_connection=connection, params=TransportParams(
        audio_in_enabled=True, audio_out_enabled=True, video_out_enabled=True, video_out_is_live=False,
        video_out_width=face.width, video_out_height=face.height, video_out_framerate=config.fps))
    lipstream = LipstreamVideoService(avatar=face.avatar, url=config.url, api_key=config.api_key, fps=config.fps,
                                      output_height=face.output_height)
    tts = load_service(*config.tts) if config.tts else EspeakTTSService()
    if config.llm_base_url:
        from pipecat.services.openai.llm import OpenAILLMService

        llm = OpenAILLMService(base_url=config.llm_base_url, api_key=config.llm_api_key or "none",
                               settings=OpenAILLMService.Settings(model=config.llm_model or "llama3.2"))
        context = LLMContext([{"role": "system", "content": SYSTEM_PROMPT}])
        turns = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(
            vad_analyzer=SileroVADAnalyzer()))
        processors = [transport.input(), load_service(*config.stt), turns.user(), llm, tts, lipstream,
                      transport.output(), turns.assistant()]
    else:
        processors = [transport.input(), VADProcessor(vad_analyzer=SileroVADAnalyzer(params=ECHO_TURN)),
                      EchoTurns(), tts, lipstream, transport.output()]
    worker = PipelineWorker(Pipeline(processors), params=PipelineParams(audio_out_sample_rate=24000))

    @transport.event_handler("on_client_connected")
    async def greet(_transport, _client):
        if config.greeting:
            await worker.queue_frames([TTSSpeakFrame(config.greeting)])
        elif config.llm_base_url:
            await worker.queue_frames([LLMRunFrame()])

    @transport.event_handler("on_client_disconnected")
    async def leave(_transport, _client):
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def create_app(config: BotConfig, face: Face) -> FastAPI:
    """The bot's web server: the page (GET /) and its WebRTC offers (POST /api/offer): a bot per offer."""
    handler = SmallWebRTCRequestHandler()
    bots: set[asyncio.Task] = set()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await handler.close()
        for task in list(bots):
            task.cancel()
        await asyncio.gather(*bots, return_exceptions=True)

    app = FastAPI(lifespan=lifespan)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE)

    @app.post("/api/offer")
    async def offer(request: SmallWebRTCRequest) -> dict:
        async def start(connection: SmallWebRTCConnection) -> None:
            task = asyncio.create_task(run_bot(connection, config, face))
            bots.add(task)
            task.add_done_callback(finished)

        return await handler.handle_web_request(request, start)

    def finished(task: asyncio.Task) -> None:
        bots.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error("the bot failed")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="A voice bot whose face is lipstream (see the module's docstring).")
    parser.add_argument("--host", default="localhost", help="address to listen on (default localhost: browsers "
                                                            "open the microphone only there or over HTTPS)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    config = BotConfig.from_env()
    if config.llm_base_url and config.stt is None:
        raise SystemExit("with an LLM (LLM_BASE_URL) the bot needs speech to text: set STT_SERVICE (and "
                         "STT_ARGS) to a Pipecat STT service")
    face = asyncio.run(find_face(config))
    mode = f"LLM at {config.llm_base_url}" if config.llm_base_url else "offline echo bot"
    print(f"avatar {face.avatar} ({face.width}x{face.height}), {mode}: open http://{args.host}:{args.port}/",
          flush=True)
    uvicorn.run(create_app(config, face), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
