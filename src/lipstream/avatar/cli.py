"""`lipstream avatars prepare|list|show|delete|import`: make and manage avatars.

User errors print one line `error: ...` on stderr and exit with status 1."""

from __future__ import annotations

import argparse
import sys
import time

from lipstream.avatar import DEFAULT_MAX_SECONDS
from lipstream.avatar.layout import AVATARS_ENV


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    avatars = subparsers.add_parser("avatars", help="prepare, list, show, delete or import avatars")
    sub = avatars.add_subparsers(dest="avatars_command", required=True)

    def common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--tenant", help="tenant key (default: the default tenant, MuseTalk's own layout)")
        parser.add_argument("--root", help=f"avatars root (default: env {AVATARS_ENV} or ./results)")
        return parser

    prepare = common(sub.add_parser("prepare", help="prepare an avatar from a short face video or a photo"))
    prepare.add_argument("name", help="avatar name: letters, digits, '-', '_', '.'")
    source = prepare.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="a video of the face (a few seconds of idle motion)")
    source.add_argument("--image", help="a photo of the face")
    prepare.add_argument("--fps", type=float, default=25.0, help="rate the avatar's frames play at (default 25)")
    prepare.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                         help=f"refuse longer videos (default {DEFAULT_MAX_SECONDS:g})")
    prepare.add_argument("--force", action="store_true", help="replace an existing avatar of that name")
    prepare.add_argument("--no-latents", action="store_true",
                         help="skip the MuseTalk latents even when the weights are installed")
    prepare.add_argument("--models", help="MuseTalk models root for the latents (default: env LIPSTREAM_MODELS "
                                          "or ./models)")
    prepare.add_argument("--device", help="device for the latents (default: cuda if available)")
    prepare.set_defaults(func=run_prepare)

    listing = common(sub.add_parser("list", help="list the avatars of a tenant"))
    listing.set_defaults(func=run_list)

    show = common(sub.add_parser("show", help="show one avatar and load it (memory cost)"))
    show.add_argument("name")
    show.add_argument("--verify", action="store_true", help="check every file against the manifest's sha256")
    show.set_defaults(func=run_show)

    delete = common(sub.add_parser("delete", help="delete an avatar"))
    delete.add_argument("name")
    delete.set_defaults(func=run_delete)

    imp = common(sub.add_parser("import", help="import a MuseTalk avatar folder (results/v15/avatars/<id>)"))
    imp.add_argument("dir", help="the MuseTalk avatar folder")
    imp.add_argument("--name", help="avatar name (default: the folder's name)")
    imp.add_argument("--fps", type=float, default=25.0, help="rate the avatar's frames play at (default 25)")
    imp.add_argument("--force", action="store_true", help="replace an existing avatar of that name")
    imp.add_argument("--no-landmarks", action="store_true", help="do not find face landmarks (the warp engine "
                                                                 "needs them)")
    imp.set_defaults(func=run_import)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def run_prepare(args: argparse.Namespace) -> int:
    from lipstream.avatar.prepare import prepare_avatar

    t0 = time.perf_counter()
    avatar = prepare_avatar(args.name, video=args.video, image=args.image, tenant=args.tenant, root=args.root,
                            fps=args.fps, max_seconds=args.max_seconds, overwrite=args.force,
                            latents=False if args.no_latents else None, models_root=args.models,
                            device=args.device)
    h, w = avatar.frame_size
    faceless = len(avatar.meta["faceless_frames"]) // 2
    print(f"prepared avatar {avatar.name!r}: {len(avatar) // 2} frames ({len(avatar)} in the cycle), {w}x{h}, "
          f"{faceless} without a face, latents {'yes' if avatar.latents is not None else 'no'}, "
          f"in {time.perf_counter() - t0:.1f} s -> {avatar.path}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from lipstream.avatar.store import list_avatars

    avatars = list_avatars(args.tenant, args.root)
    for a in avatars:
        size = f"{a.frame_size[1]}x{a.frame_size[0]}" if a.frame_size else "?"
        print(f"{a.name}\t{a.cycle_frames} frames\t{size}\tlatents {'yes' if a.latents else 'no'}\t{a.source}")
    if not avatars:
        print("no avatars", file=sys.stderr)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from lipstream.avatar.layout import avatar_dir
    from lipstream.avatar.store import load_avatar, summarize

    folder = avatar_dir(args.name, args.tenant, args.root)
    avatar = load_avatar(args.name, tenant=args.tenant, root=args.root, verify=args.verify)
    s = summarize(folder, avatar.name, avatar.tenant)
    h, w = avatar.frame_size
    print(f"name:        {s.name}\ntenant:      {s.tenant or '(default)'}\npath:        {s.path}")
    print(f"frames:      {len(avatar)} in the cycle, {w}x{h}, {avatar.fps:g} fps")
    print(f"faceless:    {len(avatar.meta.get('faceless_frames', []))} cycle frames use a neighbour's box")
    print(f"latents:     {'yes' if avatar.latents is not None else 'no'}; "
          f"landmarks: {'yes' if avatar.landmarks is not None else 'no'}")
    print(f"source:      {s.source}\ncreated:     {s.created or '?'}\non disk:     {_mb(s.disk_bytes)}")
    print(f"in memory:   {_mb(avatar.nbytes)} ({_mb(avatar.nbytes / len(avatar))} per cycle frame)")
    if args.verify:
        print("checksums:   ok")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from lipstream.avatar.store import delete_avatar

    print(f"deleted {delete_avatar(args.name, tenant=args.tenant, root=args.root)}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from lipstream.avatar.store import import_avatar

    avatar = import_avatar(args.dir, args.name, tenant=args.tenant, root=args.root, fps=args.fps,
                           overwrite=args.force, landmarks=not args.no_landmarks)
    print(f"imported {args.dir} as avatar {avatar.name!r}: {len(avatar)} cycle frames, "
          f"{len(avatar.meta.get('faceless_frames', []))} with a placeholder box replaced, "
          f"latents {'yes' if avatar.latents is not None else 'no'} -> {avatar.path}")
    return 0
