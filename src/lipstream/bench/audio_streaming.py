"""`lipstream bench audio-streaming`: how far streaming audio features are from offline ones.

On speech (a file, or `synthetic.speech`), compare `StreamingFeatures` with
`audio_features` (offline, MuseTalk's exact path). The first `--lead-seconds` are pushed in one
chunk (so that every context length has audio to see); the next `--seconds` are pushed in 20 ms
chunks and measured: relative L2 ||s - o|| / ||o|| over their frames and the worst frame, by context
length and look-ahead, the delay from a frame's end to its emission (audio time, without compute),
and the encoder pass time. Two placements of the context in the 30 s encoder input are measured:
- `segment` (what StreamingFeatures does): audio keeps its offline position in its 30 s segment;
- `start`: the context moved to the start of the input (a plain sliding window); this shifts
  Whisper's absolute positional embedding under every step.

Without `--whisper-dir` the encoder is a random-init whisper-tiny (same shapes, no weights), so
the distances are only indicative; real-weight figures have to be measured with the weights.
`--faces N` (needs the MuseTalk weights under `--models`, whose whisper is then used) also generates
the first N measured frames from streamed and from offline features with the same avatar latents
(random crops) and reports the faces' relative L2 and mean absolute difference (0..255)."""

from __future__ import annotations

import argparse
import statistics
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

CHUNK_MS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio", help="speech file to use (default: a synthetic speech-like signal)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of live audio measured")
    parser.add_argument("--lead-seconds", type=float, default=9.0,
                        help="seconds of audio pushed at once before the measured part")
    parser.add_argument("--whisper-dir",
                        help="local Hugging Face whisper-tiny folder (default: random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--contexts", default="1,2,4,8,full", help="context seconds; 'full' = whole segment")
    parser.add_argument("--lookaheads", default="0,40,80,160", help="look-ahead milliseconds")
    parser.add_argument("--placements", default="segment,start")
    parser.add_argument("--step-ms", type=float, default=120.0,
                        help="pass grid for the context/look-ahead table")
    parser.add_argument("--step-sweep", default="40,80,120,200",
                        help="pass grids to time at the default context and look-ahead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faces", type=int, default=0,
                        help="also compare N generated faces at the defaults (needs the MuseTalk weights)")
    parser.add_argument("--models", default=None, help="MuseTalk models root for --faces (default LIPSTREAM_MODELS)")


def _start_placement_class():
    """StreamingFeatures with the context moved to the start of the 30 s input (the alternative)."""

    from lipstream.audio.features import STEP_SAMPLES, num_whisper_steps, segment_mels
    from lipstream.audio.streaming import FeaturePass, StreamingFeatures

    class StartPlacement(StreamingFeatures):
        def _context_start(self, first_frame: int, end: int) -> int:
            start = super()._context_start(first_frame, end)
            return start - start % STEP_SAMPLES  # whole steps, so encoder steps map to offline steps

        def _plan_encoder(self, feature_pass: FeaturePass) -> None:
            start = self._context_start(feature_pass.first, feature_pass.end)
            feature_pass.offset = start // STEP_SAMPLES
            feature_pass.mels = segment_mels(self._audio.read(start, feature_pass.end), self.feature_extractor)
            feature_pass.keep = num_whisper_steps(feature_pass.end) - feature_pass.offset

    return StartPlacement


def _stream(streamer, audio: np.ndarray, lead: int,
            fps: int) -> tuple[torch.Tensor, int, list[float], list[float]]:
    """Push audio[:lead] at once, the rest in 20 ms chunks, then flush. Returns (features of the
    frames emitted after the lead-in [F, 50, D], the first of those frames, their delay ms from the
    frame's end to the audio position at which they came out, encoder pass seconds)."""
    import torch

    chunk = 16000 * CHUNK_MS // 1000
    if lead:
        streamer.push(audio[:lead])
    first_measured = streamer.frames_emitted
    pieces, delays, pass_seconds = [], [], []
    for begin in range(lead, audio.shape[0], chunk):
        passes = streamer.passes
        out = streamer.push(audio[begin:begin + chunk])
        first = streamer.frames_emitted - out.shape[0]
        pass_end = streamer.first_pass_samples if first == 0 and out.shape[0] else \
            streamer.samples_received - streamer.samples_received % streamer.step_samples
        delays += [(pass_end - (f + 1) * 16000 / fps) / 16 for f in range(first, streamer.frames_emitted)]
        if streamer.passes > passes:
            pass_seconds.append(streamer.last_pass_seconds)
        pieces.append(out)
    pieces.append(streamer.flush())
    return torch.cat(pieces), first_measured, delays, pass_seconds


def _rel_l2(streamed: torch.Tensor, offline: torch.Tensor) -> tuple[float, float]:
    streamed, offline = streamed.float(), offline.float()
    diff = streamed - offline
    total = float(diff.norm() / offline.norm())
    worst = float((diff.flatten(1).norm(dim=1) / offline.flatten(1).norm(dim=1).clamp_min(1e-12)).max())
    return total, worst


def _face_difference(engine, streamed: torch.Tensor, offline: torch.Tensor, seed: int) -> dict:
    """Faces from streamed vs offline features [N, 50, 384] with the same latents (random crops)."""
    import torch

    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, (streamed.shape[0], 256, 256, 3), dtype=np.uint8)
    latents = engine.avatar_latents(crops, generator=torch.Generator(engine.device).manual_seed(seed))
    a, b = engine.faces(latents, streamed).float(), engine.faces(latents, offline).float()
    return {"faces": streamed.shape[0], "face_rel_l2": float((a - b).norm() / b.norm()),
            "face_mean_abs_diff": float((a - b).abs().mean())}


def _load_models(args: argparse.Namespace):
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from lipstream.models.placement import for_inference
    from lipstream.models.whisper import WHISPER_TINY_CONFIG, load_feature_extractor, load_whisper_encoder

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.faces:
        from lipstream.engines.musetalk import MuseTalkEngine
        from lipstream.models.layout import models_root

        engine = MuseTalkEngine.load(args.models, device=device, dtype=dtype)
        m = engine.models
        return m.whisper_encoder, m.feature_extractor, f"MuseTalk weights from {models_root(args.models)}", engine
    if args.whisper_dir:
        encoder = load_whisper_encoder(args.whisper_dir, device, dtype)
        return encoder, load_feature_extractor(args.whisper_dir), f"whisper weights from {args.whisper_dir}", None
    torch.manual_seed(args.seed)
    encoder = for_inference(WhisperEncoder(WhisperConfig(**WHISPER_TINY_CONFIG)), device, dtype)
    return (encoder, WhisperFeatureExtractor(), "RANDOM whisper-tiny-shaped encoder (no weights): indicative only",
            None)


def run(args: argparse.Namespace) -> int:
    measure(args)
    return 0


def measure(args: argparse.Namespace) -> list[dict]:
    """Every configuration's row (also printed as a table and written as JSON)."""
    from lipstream.audio import StreamingFeatures, audio_features, load_audio
    from lipstream.audio.streaming import DEFAULT_CONTEXT_S, DEFAULT_LOOKAHEAD_MS, DEFAULT_STEP_MS
    from lipstream.bench.report import format_table, write_results
    from lipstream.synthetic import speech

    encoder, extractor, weights, engine = _load_models(args)
    total_samples = int((args.lead_seconds + args.seconds) * 16000)
    if args.audio:
        audio = load_audio(args.audio)[:total_samples]
        source = args.audio
    else:
        audio = speech(total_samples / 16000, args.seed)
        source = "synthetic speech-like signal"
    lead = min(int(args.lead_seconds * 16000), audio.shape[0])
    offline = audio_features(audio, encoder, extractor, fps=args.fps)
    print(f"{weights}; audio: {source}, {lead / 16000:.2f} s lead-in + {(audio.shape[0] - lead) / 16000:.2f} s "
          f"measured in {CHUNK_MS} ms chunks; {offline.shape[0]} frames at {args.fps} fps")
    classes = {"segment": StreamingFeatures, "start": _start_placement_class()}
    contexts = [None if c == "full" else float(c) for c in args.contexts.split(",")]

    def measure(placement: str, context: float | None, lookahead: float, step: float) -> dict:
        streamer = classes[placement](encoder, extractor, fps=args.fps, context_s=context,
                                      lookahead_ms=lookahead, step_ms=step)
        streamed, first, delays, pass_seconds = _stream(streamer, audio, lead, args.fps)
        total, worst = _rel_l2(streamed, offline[first:])
        faces = {}
        if engine is not None and (placement, context, lookahead, step) == (
                "segment", DEFAULT_CONTEXT_S, DEFAULT_LOOKAHEAD_MS, DEFAULT_STEP_MS):
            n = min(args.faces, streamed.shape[0])
            faces = _face_difference(engine, streamed[:n], offline[first:first + n], args.seed)
            print(f"  faces at the defaults: rel L2 {faces['face_rel_l2']:.2e}, "
                  f"mean |diff| {faces['face_mean_abs_diff']:.2f} / 255 over {n} frames", flush=True)
        pass_ms = 1e3 * statistics.median(pass_seconds) if pass_seconds else None
        return {"placement": placement, "context_s": context, "lookahead_ms": lookahead, "step_ms": step,
                "rel_l2": total, "worst_frame_rel_l2": worst, "passes": streamer.passes,
                "mean_delay_ms": statistics.mean(delays) if delays else None,
                "max_delay_ms": max(delays) if delays else None, "pass_ms": pass_ms,
                "pass_per_step": pass_ms / step if pass_ms else None, **faces}

    rows = []
    for placement in args.placements.split(","):
        for context in contexts:
            if placement == "start" and context is None:
                continue  # identical to `segment` with the whole segment as context
            for lookahead in (float(x) for x in args.lookaheads.split(",")):
                rows.append(measure(placement, context, lookahead, args.step_ms))
                print(_row_text(rows[-1]), flush=True)
    for step in (float(x) for x in args.step_sweep.split(",")):
        rows.append(measure("segment", DEFAULT_CONTEXT_S, DEFAULT_LOOKAHEAD_MS, step))
        print(_row_text(rows[-1]), flush=True)

    headers = ["placement", "context s", "look-ahead ms", "step ms", "rel L2", "worst frame", "passes",
               "delay mean ms", "delay max ms", "pass ms", "pass/step"]
    keys = ["placement", "context_s", "lookahead_ms", "step_ms", "rel_l2", "worst_frame_rel_l2", "passes",
            "mean_delay_ms", "max_delay_ms", "pass_ms", "pass_per_step"]
    table = [[_cell(k, r[k]) for k in keys] for r in rows]
    print(format_table(headers, table))
    print("delay: audio time from a frame's end to the grid point that emitted it (add the pass time for "
          "wall latency); pass/step > 1 means one stream cannot keep up on this device.")
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings.update(weights=weights, audio_source=source, chunk_ms=CHUNK_MS)
    print(f"results: {write_results('audio-streaming', args.device, settings, rows)}")
    return rows


def _cell(key: str, value: object) -> object:
    if key == "context_s" and value is None:
        return "full"
    if key in ("rel_l2", "worst_frame_rel_l2"):
        return f"{value:.2e}"
    return value


def _row_text(row: dict) -> str:
    context = "full" if row["context_s"] is None else f"{row['context_s']:g}s"
    pass_ms = f"{row['pass_ms']:.0f}" if row["pass_ms"] is not None else "-"
    return (f"  {row['placement']:>7} ctx {context:>4} look {row['lookahead_ms']:>4.0f} ms step "
            f"{row['step_ms']:>4.0f} ms: rel L2 {row['rel_l2']:.2e} "
            f"(worst frame {row['worst_frame_rel_l2']:.2e}), {row['passes']} passes, pass {pass_ms} ms")
