"""The MuseTalk model files, in MuseTalk's own layout under a models root.

The root is an argument, else env `LIPSTREAM_MODELS`, else `./models`. An official MuseTalk
`models/` folder works as-is:

    musetalkV15/unet.pth, musetalkV15/musetalk.json   UNet weights (plain state_dict) + constructor kwargs
    sd-vae/config.json, sd-vae/diffusion_pytorch_model.bin          AutoencoderKL (sd-vae-ft-mse)
    whisper/config.json, whisper/pytorch_model.bin, whisper/preprocessor_config.json   whisper-tiny
                                        (model.safetensors instead of pytorch_model.bin works too)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from lipstream.errors import ChecksumMismatchError, MissingWeightsError

MODELS_ENV = "LIPSTREAM_MODELS"
DEFAULT_ROOT = "./models"

UNET_DIR = "musetalkV15"
VAE_DIR = "sd-vae"
WHISPER_DIR = "whisper"


@dataclass(frozen=True)
class ModelFile:
    """One file of the layout and where it comes from.

    path: relative to the models root (POSIX separators).
    repo_id / repo_file: the Hugging Face Hub repository and the file's path in it; `path` ends with
    `repo_file`, and the part before it is the folder the repository's files go to.
    sha256: the published digest, where known (hex).
    alternatives: other names (relative to the root) the same weights may have instead: a folder with
    any one of them has the file (e.g. whisper's model.safetensors, which transformers >= 5 saves).
    `download` fetches `repo_file`."""

    path: str
    repo_id: str
    repo_file: str
    sha256: str | None = None
    alternatives: tuple[str, ...] = ()

    def found(self, root: Path) -> str | None:
        """The name under `root` this file has (`path` or an alternative, a non-empty regular file), or None."""
        for name in (self.path, *self.alternatives):
            candidate = root / name
            if candidate.is_file() and candidate.stat().st_size > 0:
                return name
        return None

    @property
    def local_dir(self) -> str:
        """The folder (relative to the root) that `repo_file` is relative to: "" or e.g. "sd-vae/"."""
        return self.path.removesuffix(self.repo_file)


MUSETALK_FILES: tuple[ModelFile, ...] = (
    ModelFile(f"{UNET_DIR}/unet.pth", "TMElyralab/MuseTalk", "musetalkV15/unet.pth",
              sha256="7ebf6c98c181e20838e4c0054e96e944ac60d5d692cc01db42839fe11b787007"),
    ModelFile(f"{UNET_DIR}/musetalk.json", "TMElyralab/MuseTalk", "musetalkV15/musetalk.json"),
    ModelFile(f"{VAE_DIR}/config.json", "stabilityai/sd-vae-ft-mse", "config.json"),
    ModelFile(f"{VAE_DIR}/diffusion_pytorch_model.bin", "stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.bin"),
    ModelFile(f"{WHISPER_DIR}/config.json", "openai/whisper-tiny", "config.json"),
    ModelFile(f"{WHISPER_DIR}/pytorch_model.bin", "openai/whisper-tiny", "pytorch_model.bin",
              alternatives=(f"{WHISPER_DIR}/model.safetensors",)),
    ModelFile(f"{WHISPER_DIR}/preprocessor_config.json", "openai/whisper-tiny", "preprocessor_config.json"),
)


def models_root(root: str | os.PathLike | None = None) -> Path:
    """The models root: `root`, else env LIPSTREAM_MODELS, else ./models (not required to exist)."""
    return Path(root if root is not None else os.environ.get(MODELS_ENV) or DEFAULT_ROOT).expanduser()


@dataclass(frozen=True)
class LayoutReport:
    """Which files of `MUSETALK_FILES` exist under `root` (a file counts when it, or one of its
    alternatives, is a non-empty regular file)."""

    root: Path
    present: tuple[ModelFile, ...]
    missing: tuple[ModelFile, ...]

    @property
    def complete(self) -> bool:
        return not self.missing


def check_models(root: str | os.PathLike | None = None) -> LayoutReport:
    """Report which MuseTalk files are present/missing under the models root. Reads no file contents."""
    root = models_root(root)
    present, missing = [], []
    for f in MUSETALK_FILES:
        (present if f.found(root) else missing).append(f)
    return LayoutReport(root, tuple(present), tuple(missing))


def has_musetalk_weights(root: str | os.PathLike | None = None) -> bool:
    """True when every MuseTalk file is present, i.e. the `musetalk` engine can be loaded."""
    return check_models(root).complete


def require_musetalk_weights(root: str | os.PathLike | None = None) -> Path:
    """Return the models root, or raise `MissingWeightsError` naming the missing files and the fix."""
    report = check_models(root)
    if not report.complete:
        names = ", ".join(f.path for f in report.missing)
        raise MissingWeightsError(
            f"MuseTalk weights missing under {report.root}: {names}; "
            f"run `lipstream models download --root {report.root}` (or set {MODELS_ENV} to a folder that has them)."
        )
    return report.root


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in chunks (constant memory, also for the 3.4 GB UNet)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(root: str | os.PathLike | None, file: ModelFile) -> None:
    """Hash `file` under the root and raise `ChecksumMismatchError` if it differs from its published
    sha256. Files without a known digest pass. Takes ~10 s for the 3.4 GB UNet."""
    if file.sha256 is None:
        return
    path = models_root(root) / file.path
    actual = sha256_file(path)
    if actual != file.sha256:
        raise ChecksumMismatchError(
            f"{path} is corrupt or incomplete (sha256 {actual}, expected {file.sha256}); "
            f"delete it and run `lipstream models download --root {models_root(root)}`."
        )
