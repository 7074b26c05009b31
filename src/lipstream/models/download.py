"""Download the MuseTalk model files from the Hugging Face Hub into the models root.

One `hf_hub_download` per missing file, straight into MuseTalk's layout (`layout.MUSETALK_FILES`):
huggingface_hub draws the progress bars, resumes interrupted downloads (`.incomplete` files under
`<root>/.cache/huggingface/`), checks each file's size, and honours `HF_ENDPOINT` (a mirror) and
`HF_TOKEN`. Files already present are skipped; files with a published sha256 are hashed after download.

Offline it fails within seconds with one sentence: offline mode (`HF_HUB_OFFLINE=1`) is checked
first, then the endpoint is probed with a short timeout, before huggingface_hub's own retry loop
(~25 s of back-off) can start."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from lipstream.errors import ChecksumMismatchError, DownloadError
from lipstream.models.layout import check_models, verify_checksum

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 5.0


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub URL to download from: `endpoint`, else env HF_ENDPOINT (read now, not at import), else huggingface.co."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """True when env HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for offline mode, now or when
    huggingface_hub was imported (it reads the variable once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def probe_endpoint(endpoint: str, repo_id: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise `DownloadError` unless `endpoint` answers an HTTP request within `timeout_s` (any status counts)."""
    request = urllib.request.Request(f"{endpoint}/api/models/{repo_id}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # the server answered (401/404/... are fine here: hf_hub_download reports them per file)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"Cannot reach the model hub at {endpoint} ({reason}); check the network connection, "
            f"or set HF_ENDPOINT to a reachable mirror, or copy the model files in by hand."
        ) from exc


def download_models(root: str | os.PathLike | None = None, *, endpoint: str | None = None,
                    probe_timeout_s: float = PROBE_TIMEOUT_S) -> list[Path]:
    """Download every missing MuseTalk file into `root` (default: env LIPSTREAM_MODELS or ./models).

    Returns the paths downloaded now (empty when everything was already there).
    Raises `DownloadError` (offline, unreachable endpoint, HTTP error) or `ChecksumMismatchError`
    (the corrupt file is deleted, so running again downloads it afresh)."""
    from huggingface_hub import hf_hub_download  # imported here: ~0.5 s, only needed when downloading

    report = check_models(root)
    root = report.root
    if not report.missing:
        log.info("all %d model files present under %s", len(report.present), root)
        return []
    if hub_offline():
        raise DownloadError(
            f"Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1), so the {len(report.missing)} missing "
            f"model files under {root} cannot be downloaded; unset HF_HUB_OFFLINE or copy the files in by hand."
        )
    endpoint = hub_endpoint(endpoint)
    probe_endpoint(endpoint, report.missing[0].repo_id, probe_timeout_s)

    downloaded = []
    for f in report.missing:
        log.info("downloading %s/%s -> %s", f.repo_id, f.repo_file, root / f.path)
        try:
            hf_hub_download(f.repo_id, f.repo_file, local_dir=root / f.local_dir, endpoint=endpoint)
        # Whatever hf_hub_download raises (OSError subclasses, its HTTP client's errors, which differ
        # between huggingface_hub versions, ValueError) means the same thing here: no file.
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise DownloadError(
                f"Downloading {f.repo_file} from {f.repo_id} at {endpoint} failed ({reason}); "
                f"run `lipstream models download` again to resume."
            ) from exc
        if f.sha256 is not None:
            log.info("verifying the sha256 of %s", f.path)
            try:
                verify_checksum(root, f)
            except ChecksumMismatchError as exc:
                (root / f.path).unlink()
                raise ChecksumMismatchError(
                    f"{root / f.path} from {f.repo_id} at {endpoint} did not match its published sha256 and "
                    f"was deleted; run `lipstream models download` again."
                ) from exc
        downloaded.append(root / f.path)
    log.info("downloaded %d files into %s", len(downloaded), root)
    return downloaded
