"""`lipstream render AVATAR AUDIO -o out.mp4|FOLDER`: a whole audio file spoken by an avatar."""

from __future__ import annotations

import argparse
import math
import sys

from lipstream.engines import ENGINE_NAMES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "render", help="render an audio file spoken by an avatar to an MP4 (H.264 + AAC) or to PNG frames + WAV")
    parser.add_argument("avatar", help="an avatar name (see `lipstream avatars`) or the path of an avatar folder")
    parser.add_argument("audio", help="speech: any audio or video file with an audio track")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="an .mp4 file, or a folder for lossless PNG frames + audio.wav")
    parser.add_argument("--fps", type=int, default=25, help="video frame rate (default 25, MuseTalk's)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="frames per engine call (default 16 on a GPU, 4 on a CPU)")
    parser.add_argument("--tenant", help="the avatar's tenant (default: the default tenant)")
    add_engine_arguments(parser)
    add_sharpen_argument(parser)
    parser.set_defaults(func=run)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--engine, --device, --avatars, --models: what a command that renders needs to find its inputs."""
    parser.add_argument("--engine", choices=ENGINE_NAMES, default="auto",
                        help="auto (default): musetalk when its weights are installed, else warp")
    parser.add_argument("--device", help="the engine's device, e.g. cuda, cuda:1, cpu (default: cuda if present)")
    parser.add_argument("--avatars", metavar="DIR", help="avatars root (default: env LIPSTREAM_AVATARS or ./results)")
    parser.add_argument("--models", metavar="DIR", help="models root (default: env LIPSTREAM_MODELS or ./models)")


def add_sharpen_argument(parser: argparse.ArgumentParser) -> None:
    """--sharpen / --no-sharpen (the setting `sharpen`)."""
    parser.add_argument("--sharpen", action=argparse.BooleanOptionalAction, default=True,
                        help="unsharp mask on the generated face, this system's addition (default on); "
                             "--no-sharpen: MuseTalk's own composition")


def run(args: argparse.Namespace) -> int:
    """Check the cheap inputs first (audio, output path, avatar), then load the engine and render."""
    from lipstream.audio.load import load_clip, rms_dbfs
    from lipstream.avatar.store import load_avatar
    from lipstream.engines.select import load_engine
    from lipstream.media.output import output_kind
    from lipstream.stream.render import check_render_audio, render

    clip = load_clip(args.audio)  # the output carries it as it is; the engine hears it at 16 kHz mono
    audio = clip.mono_16k()
    check_render_audio(audio, args.fps)
    if rms_dbfs(audio) == -math.inf:
        print(f"note: {args.audio} is digital silence; the video shows the avatar with a closed mouth",
              file=sys.stderr)
    output_kind(args.output)
    avatar = load_avatar(args.avatar, tenant=args.tenant, root=args.avatars)
    engine, reason = load_engine(args.engine, models_root=args.models, device=args.device)
    print(reason, flush=True)
    result = render(avatar, engine, audio, args.output, fps=args.fps, batch_size=args.batch_size, soundtrack=clip,
                    sharpen=args.sharpen)
    print(f"wrote {result.path}: {result.frames} frames ({result.frames / args.fps:.2f} s at {args.fps} fps) "
          f"in {result.seconds:.1f} s ({result.frames_per_second:.1f} frames/s)")
    return 0
