"""MuseTalkEngine on tiny random networks loaded from the official layout: generate() and avatar latents."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from lipstream.avatar.model import Avatar
from lipstream.engines.base import Engine, concat, take
from lipstream.engines.musetalk import MuseTalkEngine
from lipstream.models.latents import crops_to_vae_input
from lipstream.models.layout import has_musetalk_weights, models_root
from musetalk_tiny import write_tiny_musetalk


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> MuseTalkEngine:
    root = tmp_path_factory.mktemp("models")
    write_tiny_musetalk(root)
    return MuseTalkEngine.load(root, device="cpu")


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 8, 32, 32, generator=g), torch.randn(2, 50, 384, generator=g)


@pytest.fixture(scope="module")
def faces(engine, batch) -> torch.Tensor:
    return engine.faces(*batch)


def test_engine_interface(engine):
    assert isinstance(engine, Engine)
    assert engine.name == "musetalk"
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32


def test_generate_returns_uint8_bgr_faces_on_the_device(faces):
    assert faces.shape == (2, 256, 256, 3)
    assert faces.dtype == torch.uint8 and faces.device.type == "cpu"
    assert faces.is_contiguous()
    assert faces.min() >= 0 and faces.max() <= 255 and faces.float().std() > 0


def test_generate_equals_the_reference_steps_in_bgr(engine, batch, faces):
    latents, audio = batch
    m = engine.models
    with torch.inference_mode():
        audio_pe = audio + m.positional_encoding.table[:, :50]  # the engine adds the PE itself
        pred = m.unet(latents, 0, encoder_hidden_states=audio_pe).sample
        image = m.vae.decode((1 / 0.18215) * pred).sample  # MuseTalk's decode_latents
    rgb = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(faces, rgb.flip(-1))  # BGR: channel 0 of the output is the decoder's blue
    assert not torch.equal(faces, rgb)


def test_vae_decodes_the_latents_times_the_reciprocal_of_the_scale_as_musetalk(engine, batch, monkeypatch):
    decoded = []
    decode = engine.models.vae.decode
    monkeypatch.setattr(engine.models.vae, "decode", lambda z, **kw: decoded.append(z) or decode(z, **kw))
    engine.faces(*batch)
    latents, audio = batch
    m = engine.models
    with torch.inference_mode():
        pred = m.unet(latents, 0, encoder_hidden_states=audio + m.positional_encoding.table[:, :50]).sample
    assert torch.equal(decoded[0], (1 / 0.18215) * pred)
    assert not torch.equal(decoded[0], pred / 0.18215)  # dividing rounds some values differently


def test_generate_is_deterministic_and_uses_the_audio(engine, batch, faces):
    latents, audio = batch
    assert torch.equal(engine.faces(latents, audio), faces)
    # a frame depends on its own conditioning only (up to the float rounding of another batch size)
    assert (engine.faces(latents[1:], audio[1:]).int() - faces[1:].int()).abs().max() <= 1
    assert not torch.equal(engine.faces(latents[:1], torch.zeros(1, 50, 384)), faces[:1])


def test_generate_rejects_wrong_shapes(engine, batch):
    latents, audio = batch
    with pytest.raises(ValueError, match="expected latents"):
        engine.faces(latents[:, :4], audio)
    with pytest.raises(ValueError, match="expected latents"):
        engine.faces(latents, audio[:1])


def test_vae_input_masks_the_lower_half_and_converts_bgr_to_rgb():
    crops = torch.zeros(1, 256, 256, 3, dtype=torch.uint8)
    crops[..., 0] = 255  # pure blue in BGR
    masked, reference = crops_to_vae_input(crops)
    assert masked.shape == reference.shape == (1, 3, 256, 256)
    assert torch.equal(reference[0, 2], torch.ones(256, 256))  # blue is RGB channel 2
    assert torch.equal(reference[0, :2], -torch.ones(2, 256, 256))
    assert torch.equal(masked[:, :, :128], reference[:, :, :128])
    assert torch.equal(masked[:, :, 128:], -torch.ones(1, 3, 128, 256))  # lower half black


def test_avatar_latents_are_masked_then_reference_and_reproducible(engine):
    crops = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    latents = engine.avatar_latents(crops, generator=torch.Generator().manual_seed(7), batch_size=2)
    assert latents.shape == (3, 8, 32, 32) and latents.dtype == torch.float32
    again = engine.avatar_latents(torch.from_numpy(crops), generator=torch.Generator().manual_seed(7), batch_size=2)
    assert torch.equal(latents, again)
    other = engine.avatar_latents(crops, generator=torch.Generator().manual_seed(8), batch_size=2)
    assert not torch.equal(latents, other)

    vae = engine.models.vae
    with torch.inference_mode():
        masked, reference = crops_to_vae_input(torch.from_numpy(crops[:2]))
        dist = vae.encode(torch.cat([masked, reference])).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(7)) * 0.18215
    assert torch.equal(latents[:2, :4], expected[:2])  # masked first
    assert torch.equal(latents[:2, 4:], expected[2:])  # then the reference
    # the generated faces take these latents as they are
    assert engine.faces(latents, torch.zeros(3, 50, 384)).shape == (3, 256, 256, 3)


def test_avatar_latents_reject_non_uint8_crops(engine):
    with pytest.raises(ValueError, match="uint8"):
        engine.avatar_latents(np.zeros((1, 256, 256, 3), dtype=np.float32))


def test_bench_engine_runs_and_writes_json(tmp_path, capsys):
    """The engine bench with --tiny (the GPU pass's dry run): every batch, then a variant at the fastest."""
    from lipstream.bench import engine as bench_engine

    parser = argparse.ArgumentParser()
    bench_engine.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--tiny", "--batches", "1", "2", "--at-best", "eager+channels_last",
                              "--reps", "1", "--warmup", "0", "--out-dir", str(tmp_path)])
    assert bench_engine.run(args) == 0
    out = capsys.readouterr().out
    assert "| fp32 | eager | 1 |" in out and "V100" in out
    doc = json.loads(next(tmp_path.glob("engine-*.json")).read_text())
    assert doc["benchmark"] == "engine" and doc["settings"]["batches"] == [1, 2] and doc["settings"]["tiny"]
    rows = doc["rows"]
    assert [(r["variant"], r["batch"]) for r in rows[:2]] == [("eager", 1), ("eager", 2)]
    best = max(rows[:2], key=lambda r: r["frames_per_s"])["batch"]
    assert (rows[2]["variant"], rows[2]["batch"]) == ("eager+channels_last", best)
    assert all(r["frames_per_s"] > 0 and r["unet_ms"] > 0 and r["vae_decode_ms"] > 0 for r in rows[:3])
    assert [r["variant"] for r in rows[3:]] == ["whisper encoder, 30 s window", "log-mel features (CPU), 30 s window"]


@pytest.mark.weights
def test_real_weights_generate_a_face():
    if not has_musetalk_weights():
        pytest.skip(f"MuseTalk weights not under {models_root()} (run `lipstream models download`)")
    engine = MuseTalkEngine.load()
    crops = np.full((1, 256, 256, 3), 128, dtype=np.uint8)
    latents = engine.avatar_latents(crops, generator=torch.Generator().manual_seed(0))
    faces = engine.faces(latents, torch.zeros(1, 50, 384))
    assert faces.shape == (1, 256, 256, 3) and faces.dtype == torch.uint8 and faces.device == engine.device
    # a grey crop reconstructs as roughly grey in its upper (unmasked) half
    assert abs(faces[0, :100].float().mean().item() - 128) < 40


@pytest.mark.gpu
def test_cuda_fp16_engine_matches_fp32_cpu(tmp_path, batch, faces):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    write_tiny_musetalk(tmp_path)
    gpu = MuseTalkEngine.load(tmp_path, device="cuda")
    assert gpu.dtype == torch.float16
    out = gpu.faces(*batch)
    assert out.device.type == "cuda" and out.dtype == torch.uint8 and out.shape == faces.shape
    assert (out.cpu().int() - faces.int()).abs().float().mean() < 2


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_graphs_engine_matches_eager(tmp_path, batch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    write_tiny_musetalk(tmp_path)
    eager = MuseTalkEngine.load(tmp_path, device="cuda")
    graphs = MuseTalkEngine(eager.models, compile_mode="reduce-overhead")
    expected = eager.faces(*batch)
    first = [graphs.faces(*batch) for _ in range(3)]  # compile, record, replay
    assert all((f.int() - expected.int()).abs().max() <= 1 for f in first)


def test_engine_interface_matches_faces(engine):
    """generate(take(material, idx), features) is faces(latents[idx], audio windows)."""
    rng = np.random.default_rng(0)
    n = 3
    crops = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
    avatar = Avatar("a", "", None, frames=np.zeros((n, 300, 300, 3), np.uint8),
                    face_boxes=np.tile(np.int32([50, 50, 250, 250]), (n, 1)),
                    crop_boxes=np.tile(np.int32([0, 0, 300, 300]), (n, 1)),
                    masks=[np.zeros((300, 300), np.uint8)] * n, crops=crops)
    material = engine.material(avatar)
    assert material["latents"].shape[0] == n
    audio = rng.standard_normal(16000).astype(np.float32) * 0.1
    cond = engine.features(audio, fps=25)
    assert cond.shape[0] == 25
    idx = [2, 0]
    batch = concat([take(material, idx[:1]), take(material, idx[1:])])
    faces = engine.generate(batch, cond[:2])
    assert torch.equal(faces, engine.faces(material["latents"][idx], cond[:2]))
    stream = engine.feature_stream(fps=25)
    assert stream.fps == 25


def test_batches_pad_up_to_buckets_and_warmup_runs_each_bucket(engine, batch):
    """A compiled engine sees only bucket sizes: a batch is padded (repeating its last frame) and cut back.
    Warm-up runs each bucket; an eager engine on the CPU runs one batch (on CUDA: every size, for cuDNN)."""
    bucketed = MuseTalkEngine(engine.models, batch_buckets=[4, 8])
    latents, audio = batch  # 2 frames -> run at 4
    faces = bucketed.faces(latents, audio)
    assert faces.shape == (2, 256, 256, 3) and faces.is_contiguous()
    assert (faces.int() - engine.faces(latents, audio).int()).abs().max() <= 1
    seen = []
    run = bucketed._faces
    bucketed._faces = lambda lat, aud: seen.append(lat.shape[0]) or run(lat, aud)
    bucketed.warmup(6)
    assert seen == [4, 8]
    assert bucketed._bucket(9) == 9, "past the last bucket a batch runs at its own size"
    eager = MuseTalkEngine(engine.models)
    eager._faces = lambda lat, aud: seen.append(lat.shape[0]) or run(lat, aud)
    eager.warmup(16)
    assert eager.batch_buckets is None and seen == [4, 8, 1]


def test_material_of_a_mirrored_cycle_encodes_its_first_half_only(engine):
    rng = np.random.default_rng(5)
    crops = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    frames = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    order = [0, 1, 1, 0]
    avatar = Avatar("m", "", None, frames=frames[order], face_boxes=np.tile(np.int32([8, 8, 56, 56]), (4, 1)),
                    crop_boxes=np.tile(np.int32([0, 0, 64, 64]), (4, 1)), masks=[np.zeros((64, 64), np.uint8)] * 4,
                    crops=crops[order])
    latents = engine.material(avatar)["latents"]
    assert latents.shape == (4, 8, 32, 32)
    assert torch.equal(latents[0], latents[3]) and torch.equal(latents[1], latents[2])
    first_half = engine.avatar_latents(crops, generator=torch.Generator().manual_seed(0))
    assert torch.equal(latents[:2], first_half)


def test_feature_passes_of_many_streams_share_one_encoder_call(engine):
    """The device worker's feature passes: the streams' passes run as one encoder call over all their
    segments, each stream getting what its own pass gives; one stream's failure is not the others'."""
    speeches = [np.random.default_rng(seed).standard_normal(8000).astype(np.float32) * 0.1 for seed in range(3)]
    batched = [engine.feature_stream() for _ in speeches]
    alone = [engine.feature_stream() for _ in speeches]
    calls = []
    hook = engine.models.whisper_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        for start in range(0, 8000, 1600):  # 100 ms chunks
            results = engine.feature_passes([(s, audio[start:start + 1600]) for s, audio in zip(batched, speeches)])
            expected = [s.push(audio[start:start + 1600]) for s, audio in zip(alone, speeches)]
            for got, want in zip(results, expected):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # each batched pass is one call over the three streams' segments, as many as the lone streams' calls
        assert calls.count(3) >= 3 and calls.count(1) == 3 * calls.count(3) and len(calls) == 4 * calls.count(3)
        batched[0].flush()  # done: its next push fails, and only its own result is the error
        results = engine.feature_passes([(batched[0], speeches[0][:320]), (batched[1], None)])
        assert isinstance(results[0], RuntimeError) and isinstance(results[1], torch.Tensor)
    finally:
        hook.remove()
