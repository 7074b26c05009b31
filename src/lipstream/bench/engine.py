"""`lipstream bench engine`: the MuseTalk engine's speed (UNet step + VAE decode + uint8 BGR faces).

Full-size networks with random weights (speed does not depend on the values), so no download is
needed. For each dtype x variant x batch: median latency per batch, frames/s, peak GPU memory and,
for eager runs, the UNet and VAE-decode shares. Variants: "eager" (diffusers' SDPA attention),
"compile" (torch.compile), "cudagraphs" (torch.compile mode="reduce-overhead"), each optionally
"+channels_last". Also the whisper encoder per 30 s window and the CPU log-mel front end.
GPU times come from CUDA events. On a CPU it runs fp32, eager, batch 1, 1 warm-up + 2 reps unless
told otherwise (a full UNet forward takes ~4-6 s there and a VAE decode ~7 s)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lipstream.bench.report import device_name, format_table, median_ms, write_results

if TYPE_CHECKING:
    import torch

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # names of torch dtypes
MODES = {"eager": None, "compile": "default", "cudagraphs": "reduce-overhead"}
GPU_BATCHES = [1, 4, 8, 16, 32]
GPU_VARIANTS = ["eager", "eager+channels_last", "compile", "cudagraphs"]

BASELINES = [
    ("MuseTalk maintainers, V100, UNet+VAE (issue #6)", 1000 / 32),
    ("LiveTalking, RTX 4090", 72.0),
]
TARGET_FPS = 400.0  # at batch >= 16
TARGET_BATCH4_MS = 25.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help=f"batch sizes (default: {' '.join(map(str, GPU_BATCHES))} on CUDA, 1 on CPU)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="default: fp16 bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"MODE[+channels_last], MODE in {', '.join(MODES)} "
                             f"(default: {' '.join(GPU_VARIANTS)} on CUDA, eager on CPU)")
    parser.add_argument("--at-best", nargs="+", default=[], metavar="VARIANT",
                        help="variants to run only at the batch size where the others ran fastest (e.g. "
                             "cudagraphs, whose every batch size compiles for a minute or more)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny networks of the same architecture: a dry run of every path, figures meaningless")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 20 on CUDA, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--out-dir", default=None, help="where to write the JSON (default bench/results)")


def _random_(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Materialise a meta-device module on `device` in `dtype` with N(0, 0.02) values (fast, no init schemes)."""
    import torch

    from lipstream.models.placement import for_inference

    module = for_inference(module.to_empty(device=device), device, dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module


def random_musetalk(device: torch.device, dtype: torch.dtype, *, tiny: bool = False):
    """Full-size MuseTalk networks with random weights, as `MuseTalkModels` on device/dtype (tiny: the
    `lipstream.models.tiny` sizes, for a dry run)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    from lipstream.models import tiny as small
    from lipstream.models.load import MuseTalkModels
    from lipstream.models.placement import for_inference
    from lipstream.models.positional import PositionalEncoding
    from lipstream.models.unet import MUSETALK_UNET_CONFIG, build_unet
    from lipstream.models.vae import SD_VAE_CONFIG
    from lipstream.models.whisper import WHISPER_TINY_CONFIG

    with torch.device("meta"):
        unet = build_unet(small.TINY_UNET_CONFIG if tiny else MUSETALK_UNET_CONFIG)
        vae = AutoencoderKL(**(small.TINY_VAE_CONFIG if tiny else SD_VAE_CONFIG))
        encoder = WhisperModel(WhisperConfig(**(small.TINY_WHISPER_CONFIG if tiny else WHISPER_TINY_CONFIG))).encoder
    return MuseTalkModels(
        unet=_random_(unet, device, dtype), vae=_random_(vae, device, dtype),
        whisper_encoder=_random_(encoder, device, dtype), feature_extractor=WhisperFeatureExtractor(),
        positional_encoding=for_inference(PositionalEncoding(), device, dtype), device=device, dtype=dtype,
    )


def _parse_variant(variant: str) -> tuple[str, bool]:
    mode, *flags = variant.split("+")
    if mode not in MODES or any(f != "channels_last" for f in flags):
        raise SystemExit(f"unknown variant {variant!r}: use MODE or MODE+channels_last, MODE in {', '.join(MODES)}")
    return mode, bool(flags)


def _timed_first_call(fn, device: torch.device) -> float:
    """Seconds of the first call (compilation included), synchronised."""
    import torch

    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _measure(engine, latents: torch.Tensor, audio: torch.Tensor, compiled: bool, reps: int, warmup: int) -> dict:
    """Timings of `engine.faces(latents, audio)`; for eager engines also the UNet and VAE-decode shares."""
    import torch

    models, device = engine.models, engine.device
    row = {}
    if compiled:
        row["first_call_s"] = _timed_first_call(lambda: engine.faces(latents, audio), device)
    ms = median_ms(lambda: engine.faces(latents, audio), reps, warmup, device=device)
    row.update(ms_per_batch=ms, ms_per_frame=ms / len(latents), frames_per_s=1000 * len(latents) / ms)
    if not compiled:  # already warm: same shapes
        with torch.inference_mode():
            audio_pe = models.positional_encoding(audio)
            pred = models.unet(latents, engine.timestep, audio_pe, return_dict=False)[0]
            row["unet_ms"] = median_ms(lambda: models.unet(latents, engine.timestep, audio_pe), reps, 0, device=device)
            row["vae_decode_ms"] = median_ms(lambda: models.vae.decode(pred * (1 / models.scaling_factor)), reps, 0,
                                             device=device)
    return row


def _engine_rows(models, dtype_name: str, variant: str, batches: list[int], reps: int, warmup: int) -> list[dict]:
    import torch

    from lipstream.engines.musetalk import MuseTalkEngine

    mode, channels_last = _parse_variant(variant)
    device = models.device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    models.unet.to(memory_format=memory_format)
    models.vae.to(memory_format=memory_format)
    rows = []
    for batch in batches:
        print(f"  {dtype_name} {variant} batch {batch} ...", flush=True)
        torch.compiler.reset()  # each configuration compiles afresh (and stays under the recompile limit)
        engine = MuseTalkEngine(models, compile_mode=MODES[mode])
        latents = torch.randn(batch, 8, 32, 32, device=device, dtype=models.dtype).to(memory_format=memory_format)
        audio = torch.randn(batch, 50, 384, device=device, dtype=models.dtype)
        row = {"dtype": dtype_name, "variant": variant, "batch": batch}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            row.update(_measure(engine, latents, audio, mode != "eager", reps, warmup))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(row)
    models.unet.to(memory_format=torch.contiguous_format)
    models.vae.to(memory_format=torch.contiguous_format)
    return rows


def _whisper_rows(models, dtype_name: str, reps: int, warmup: int) -> list[dict]:
    """The encoder on one 30 s window ([1, 80, 3000] -> 5 hidden states) and the CPU log-mel front end."""
    import torch

    device = models.device
    frames = 2 * models.whisper_encoder.config.max_source_positions  # 3000 mel frames = 30 s for whisper-tiny
    mel = torch.randn(1, models.whisper_encoder.config.num_mel_bins, frames, device=device, dtype=models.dtype)

    def encode():
        with torch.inference_mode():
            models.whisper_encoder(mel, output_hidden_states=True)

    audio = np.random.default_rng(0).standard_normal(16000 * 30).astype(np.float32) * 0.1
    rows = [{"dtype": dtype_name, "variant": "whisper encoder, 30 s window", "batch": 1,
             "ms_per_batch": median_ms(encode, reps, warmup, device=device)}]
    rows.append({"dtype": "fp32", "variant": "log-mel features (CPU), 30 s window", "batch": 1,
                 "ms_per_batch": median_ms(lambda: models.feature_extractor(audio, sampling_rate=16000,
                                                                            return_tensors="np"), reps, warmup)})
    return rows


def _verdicts(rows: list[dict], cuda: bool) -> list[str]:
    timed = [r for r in rows if "frames_per_s" in r]
    lines = [f"baseline {name}: {fps:.0f} frames/s" for name, fps in BASELINES]
    if timed:
        best = max(timed, key=lambda r: r["frames_per_s"])
        lines.append(f"best: {best['frames_per_s']:.3g} frames/s ({best['dtype']} {best['variant']} batch "
                     f"{best['batch']}), {best['frames_per_s'] / BASELINES[0][1]:.3g}x the V100 baseline")
    if not cuda:
        lines.append("CPU run: the targets are for H100/H200 GPUs")
        return lines
    big = [r for r in timed if r["batch"] >= 16]
    if big:
        b = max(big, key=lambda r: r["frames_per_s"])
        lines.append(f"target >= {TARGET_FPS:.0f} frames/s at batch >= 16: {b['frames_per_s']:.0f} "
                     f"({b['dtype']} {b['variant']} batch {b['batch']}): "
                     f"{'met' if b['frames_per_s'] >= TARGET_FPS else 'MISSED'}")
    four = [r for r in timed if r["batch"] == 4]
    if four:
        b = min(four, key=lambda r: r["ms_per_batch"])
        lines.append(f"target <= {TARGET_BATCH4_MS:.0f} ms per batch of 4: {b['ms_per_batch']:.1f} ms "
                     f"({b['dtype']} {b['variant']}): {'met' if b['ms_per_batch'] <= TARGET_BATCH4_MS else 'MISSED'}")
    return lines


def run(args: argparse.Namespace) -> int:
    import torch

    from lipstream.models.placement import resolve_device
    from lipstream.stream.device import configure_backends

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batches = args.batches or (GPU_BATCHES if cuda else [1])
    dtype_names = args.dtypes or (["fp16", "bf16"] if cuda else ["fp32"])
    variants = args.variants or (GPU_VARIANTS if cuda else ["eager"])
    for v in [*variants, *args.at_best]:
        _parse_variant(v)
    reps = args.reps or (20 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    configure_backends(device)  # the server's flags

    rows: list[dict] = []
    attention = None
    for name in dtype_names:
        print(f"building full-size networks ({name}) on {device} ...", flush=True)
        models = random_musetalk(device, getattr(torch, DTYPES[name]), tiny=args.tiny)
        attention = type(next(iter(models.unet.attn_processors.values()))).__name__
        for variant in variants:
            rows += _engine_rows(models, name, variant, batches, reps, warmup)
        timed = [r for r in rows if r["dtype"] == name and "frames_per_s" in r]
        if args.at_best and timed:
            best = max(timed, key=lambda r: r["frames_per_s"])["batch"]
            for variant in args.at_best:
                rows += _engine_rows(models, name, variant, [best], reps, warmup)
        rows += _whisper_rows(models, name, reps, warmup)
        del models
        if cuda:
            torch.cuda.empty_cache()

    table = [[r["dtype"], r["variant"], r["batch"], r.get("ms_per_batch", r.get("error")), r.get("ms_per_frame"),
              r.get("frames_per_s"), r.get("unet_ms"), r.get("vae_decode_ms"), r.get("peak_memory_gib"),
              r.get("first_call_s")] for r in rows]
    print(format_table(["dtype", "variant", "batch", "ms/batch", "ms/frame", "frames/s", "UNet ms", "VAE ms",
                        "peak GiB", "first call s"], table))
    print("\n".join(_verdicts(rows, cuda)))

    settings = {"batches": batches, "dtypes": dtype_names, "variants": variants, "at_best": args.at_best,
                "tiny": args.tiny, "reps": reps, "warmup": warmup,
                "attention_processor": attention, "torch_threads": torch.get_num_threads(),
                "cudnn_benchmark": torch.backends.cudnn.benchmark, "cpu": device_name("cpu"),
                "baselines_fps": dict(BASELINES),
                "targets": {"frames_per_s_at_batch_ge_16": TARGET_FPS, "ms_per_batch_of_4": TARGET_BATCH4_MS}}
    path = write_results("engine", device, settings, rows, Path(args.out_dir) if args.out_dir else None)
    print(f"results written to {path}")
    return 0
