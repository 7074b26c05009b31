"""Where avatars live on disk: names, tenants and MuseTalk's file names.

The root is an argument, else env `LIPSTREAM_AVATARS`, else `./results`. An avatar's folder is

    <root>/v15/avatars/<name>/            the default tenant (no tenant key): MuseTalk's own
                                          `results/v15/avatars/<avatar_id>`, so each reads the other's
    <root>/<tenant>/v15/avatars/<name>/   tenant <tenant>

Names and tenant keys: surrounding whitespace and CR/LF are stripped, then 1-128 ASCII letters,
digits, '-', '_' or '.', not starting with '.' (hidden names are the temporary build folders)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from lipstream.errors import AvatarNameError, excerpt

AVATARS_ENV = "LIPSTREAM_AVATARS"
DEFAULT_ROOT = "./results"
VERSION_DIR = ("v15", "avatars")

# MuseTalk v1.5's files (spec 2.2) ...
FULL_IMGS = "full_imgs"         # %08d.png, the 2N frames of the forward+reversed cycle
MASK_DIR = "mask"               # %08d.png, 8-bit grayscale blend masks, crop-box sized
COORDS = "coords.pkl"           # [(x1, y1, x2, y2)] * 2N face boxes
MASK_COORDS = "mask_coords.pkl"  # [[x_s, y_s, x_e, y_e]] * 2N crop boxes
LATENTS = "latents.pt"          # [tensor [1, 8, 32, 32]] * (frames with a face), torch.save'd list
INFO = "avator_info.json"       # (sic) {"avatar_id", "video_path", "bbox_shift", "version"}
# ... and lipstream's, beside them.
LANDMARKS = "landmarks.npy"     # float32 [2N, 478, 2] face-mesh points of each cycle frame
MANIFEST = "lipstream.json"     # format version, fps, source, counts, sha256 of every file

_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")


def frame_file(index: int) -> str:
    """MuseTalk's image name for cycle frame `index`: 8-digit zero-padded PNG."""
    return f"{index:08d}.png"


def avatars_root(root: str | os.PathLike | None = None) -> Path:
    """The avatars root: `root`, else env LIPSTREAM_AVATARS, else ./results (not required to exist)."""
    return Path(root if root is not None else os.environ.get(AVATARS_ENV) or DEFAULT_ROOT).expanduser()


def clean_name(name: str, what: str = "avatar name") -> str:
    """`name` without surrounding whitespace/CR/LF; raises AvatarNameError unless it is a valid name."""
    cleaned = str(name).strip()
    if not _NAME.fullmatch(cleaned):
        raise AvatarNameError(
            f"{what} {excerpt(name)} is not allowed: use 1-128 ASCII letters, digits, '-', '_' or '.', "
            "not starting with '.'")
    return cleaned


def clean_tenant(tenant: str | None) -> str:
    """The tenant key ("" for the default tenant: None or blank)."""
    if tenant is None or not str(tenant).strip():
        return ""
    return clean_name(tenant, "tenant key")


def tenant_dir(tenant: str | None = None, root: str | os.PathLike | None = None) -> Path:
    """The folder holding a tenant's avatars (see the module doc)."""
    tenant = clean_tenant(tenant)
    return avatars_root(root).joinpath(*([tenant] if tenant else []), *VERSION_DIR)


def avatar_dir(name: str, tenant: str | None = None, root: str | os.PathLike | None = None) -> Path:
    """The folder of avatar `name`. Raises AvatarNameError for a bad name, or when the folder is a link
    that leads out of the tenant's folder."""
    base = tenant_dir(tenant, root)
    path = base / clean_name(name)
    if path.is_symlink() and not path.resolve().is_relative_to(base.resolve()):
        raise AvatarNameError(f"avatar {excerpt(name)} is a link out of its tenant's avatars folder; refusing to use it")
    return path
