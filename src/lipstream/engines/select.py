"""Which engine runs: asked for by name, or chosen. `auto` runs `musetalk` when its weights are
installed and `warp` (no weights, CPU) otherwise; the reason is one line for the CLI and the server."""

from __future__ import annotations

import os

import torch

from lipstream.engines import ENGINE_NAMES
from lipstream.engines.base import Engine
from lipstream.models import layout


def load_engine(name: str = "auto", models_root: str | os.PathLike | None = None,
                device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                compile_mode: str | None = None) -> tuple[Engine, str]:
    """The engine `name` ("auto", "musetalk" or "warp") and one line saying which runs and why.

    models_root: where MuseTalk's weights are (default: env LIPSTREAM_MODELS or ./models).
    device: musetalk's device (default cuda if available); warp always runs on the CPU.
    dtype: musetalk's precision (default float16 on CUDA, float32 on the CPU); warp ignores it.
    compile_mode: musetalk's `torch.compile` mode (None: eager); warp ignores it.
    Raises `MissingWeightsError` for "musetalk" without its weights, ValueError for an unknown name."""
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}: use one of {', '.join(ENGINE_NAMES)}")
    root = layout.models_root(models_root)
    if name == "warp":
        return _warp(), "engine warp: asked for (no model weights; animates the avatar's mouth on the CPU)"
    if name == "musetalk":
        engine = _musetalk(root, device, dtype, compile_mode)
        return engine, f"engine musetalk: asked for (weights under {root}, on {engine.device})"
    if layout.has_musetalk_weights(root):
        engine = _musetalk(root, device, dtype, compile_mode)
        return engine, f"engine musetalk: its weights are under {root} (on {engine.device})"
    return _warp(), (f"engine warp: no MuseTalk weights under {root}; run `lipstream models download` "
                     f"for the neural engine")


def _warp() -> Engine:
    from lipstream.engines.warp import WarpEngine

    return WarpEngine()


def _musetalk(root: os.PathLike, device: torch.device | str | None, dtype: torch.dtype | None,
              compile_mode: str | None) -> Engine:
    from lipstream.engines.musetalk import MuseTalkEngine

    return MuseTalkEngine.load(root, device, dtype, compile_mode=compile_mode)
