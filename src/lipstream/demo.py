"""`lipstream demo`: the whole product in one command, offline, with nothing to download.

1. a sample avatar from scikit-image's astronaut photo (Eileen Collins, NASA; public domain),
   prepared once and kept under the avatars root as `demo-astronaut`;
2. speech: `--audio FILE`, or `--text` spoken by espeak-ng (an optional system program, GPL-licensed,
   run as a separate process; nothing of it is linked or bundled);
3. the video, rendered with the engine `auto` picks (musetalk with its weights, else warp), to an MP4;
4. with `--serve`, the server with that avatar among its avatars."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lipstream.errors import TextToSpeechError
from lipstream.stream.render_cli import add_engine_arguments, add_sharpen_argument

if TYPE_CHECKING:
    from lipstream.audio.load import AudioClip
    from lipstream.avatar.model import Avatar

SAMPLE_AVATAR = "demo-astronaut"
PHOTO_CREDIT = "scikit-image's astronaut photo (Eileen Collins, NASA; public domain)"
DEFAULT_TEXT = ("Hello! I am the lipstream demo. This video was made on your own computer, "
                "from a single photo and a line of text, without downloading anything.")
ESPEAK = "espeak-ng"
ESPEAK_VOICE = "en-us"
ESPEAK_TIMEOUT_S = 60


def synthesize_speech(text: str, voice: str = ESPEAK_VOICE) -> AudioClip:
    """`text` spoken by espeak-ng: its WAV (22.05 kHz mono) decoded by `load_clip`.

    Raises TextToSpeechError when espeak-ng is not installed (saying how to install it, or to give
    an audio file instead), when it fails, or when the text is empty."""
    from lipstream.audio.load import load_clip

    if not text.strip():
        raise TextToSpeechError("the text to speak is empty; give some words with --text, or an audio file")
    program = shutil.which(ESPEAK)
    if program is None:
        raise TextToSpeechError(
            f"{ESPEAK} is not installed, so the demo cannot speak text: install it (Debian/Ubuntu: "
            f"`sudo apt-get install {ESPEAK}`, Fedora: `sudo dnf install {ESPEAK}`, macOS: `brew install "
            f"{ESPEAK}`) or give your own speech with --audio FILE")
    try:
        done = subprocess.run([program, "--stdout", "-v", voice, "--stdin"], input=text.encode(),
                              capture_output=True, timeout=ESPEAK_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise TextToSpeechError(f"{ESPEAK} took longer than {ESPEAK_TIMEOUT_S} s; give a shorter text") from exc
    if done.returncode != 0 or not done.stdout:
        message = done.stderr.decode(errors="replace").strip() or f"exit code {done.returncode}"
        raise TextToSpeechError(f"{ESPEAK} failed ({message}); check the voice {voice!r} "
                                "or give your own speech with --audio FILE")
    return load_clip(done.stdout, name=f"{ESPEAK}'s speech")


def sample_avatar(root: str | Path | None = None, models_root: str | Path | None = None,
                  device: str | None = None, progress: bool = True) -> tuple[Avatar, bool]:
    """The demo avatar `demo-astronaut` from the avatars root, prepared from the astronaut photo the
    first time (with MuseTalk latents when its weights are under `models_root`).
    Returns (Avatar, True when it was prepared now)."""
    import cv2

    from lipstream.avatar.prepare import prepare_avatar
    from lipstream.avatar.store import load_avatar
    from lipstream.errors import AvatarCorruptError, AvatarNotFoundError
    from lipstream.synthetic import astronaut_bgr

    try:
        return load_avatar(SAMPLE_AVATAR, root=root), False
    except AvatarNotFoundError:
        overwrite = False
    except AvatarCorruptError:  # e.g. interrupted by hand while files were removed: make it again
        overwrite = True
    with tempfile.TemporaryDirectory(prefix="lipstream-demo-") as folder:
        photo = Path(folder) / "astronaut.png"
        cv2.imwrite(str(photo), astronaut_bgr())
        avatar = prepare_avatar(SAMPLE_AVATAR, image=photo, root=root, overwrite=overwrite,
                                models_root=models_root, device=device, progress=progress)
    return avatar, True


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    what = "make a demo video offline: a sample avatar speaking text (espeak-ng) or an audio file"
    parser = subparsers.add_parser("demo", help=what, description=what)
    parser.add_argument("-o", "--output", default="demo.mp4", metavar="OUT",
                        help="the video to write (default demo.mp4); a folder gives PNG frames + audio.wav")
    speech = parser.add_mutually_exclusive_group()
    speech.add_argument("--audio", metavar="FILE", help="speech to use instead of synthesized text")
    speech.add_argument("--text", default=DEFAULT_TEXT, help="what the avatar says (spoken by espeak-ng)")
    parser.add_argument("--serve", action="store_true",
                        help="then run the server with the sample avatar and print its URL")
    parser.add_argument("--port", type=int, help="the server's port with --serve (default 2160)")
    add_engine_arguments(parser)
    add_sharpen_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lipstream.audio.load import load_clip
    from lipstream.engines.select import load_engine
    from lipstream.media.output import output_kind
    from lipstream.stream.render import check_render_audio, render

    if args.audio:
        clip = load_clip(args.audio)
    else:
        print(f"speech: {ESPEAK} ({ESPEAK_VOICE}) says {args.text!r}", flush=True)
        clip = synthesize_speech(args.text)
    audio = clip.mono_16k()
    check_render_audio(audio, 25)
    output_kind(args.output)
    avatar, prepared = sample_avatar(args.avatars, args.models, args.device)
    print(f"avatar: {SAMPLE_AVATAR} ({'prepared now' if prepared else 'prepared before'}, {avatar.path}) "
          f"from {PHOTO_CREDIT}", flush=True)
    engine, reason = load_engine(args.engine, models_root=args.models, device=args.device)
    print(reason, flush=True)
    result = render(avatar, engine, audio, args.output, fps=25, soundtrack=clip, sharpen=args.sharpen)
    print(f"wrote {result.path}: {result.frames} frames ({result.frames / 25:.2f} s) in {result.seconds:.1f} s",
          flush=True)
    if args.serve:
        return serve(args)
    return 0


def serve(args: argparse.Namespace) -> int:
    """Run the server over the avatars root that holds the sample avatar (it prints the page's URL)."""
    from lipstream.config import load_settings
    from lipstream.server.serve import run_server

    settings = load_settings(flags={"port": args.port, "engine": args.engine, "device": args.device,
                                    "avatars_root": args.avatars, "models_root": args.models,
                                    "sharpen": args.sharpen})
    print(f"serving: pick the avatar {SAMPLE_AVATAR!r} on the page below", flush=True)
    return run_server(settings)
