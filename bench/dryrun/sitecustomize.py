"""Makes this Python look like a bare GPU host for a dry run of bench/gpu_pass.sh (DRYRUN=1): the
packages such a host lacks (lipstream's server, media and landmark dependencies) are absent, as far
as imports and `importlib.util.find_spec` can tell, so that a code path of the GPU pass that would
need one fails here, not there. The host's own list is in the pass's header; the wheels the pass
carries (diffusers, pydantic) stay importable."""

import importlib.abc
import importlib.util
import sys

MISSING = {"av", "soxr", "soundfile", "fastapi", "starlette", "uvicorn", "multipart", "python_multipart",
           "aiortc", "aioice", "pylibsrtp", "websockets", "mahotas", "mediapipe", "livekit", "pipecat", "ray"}


def _missing(name: str) -> bool:
    return name.split(".")[0] in MISSING


class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _missing(name):
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU host: dry run)", name=name)


_find_spec = importlib.util.find_spec


def find_spec(name, package=None):
    return None if _missing(name) else _find_spec(name, package)


importlib.util.find_spec = find_spec
sys.meta_path.insert(0, _Missing())
