"""StreamingFeatures: MuseTalk audio features from live chunks, against the offline path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from audio_helpers import tiny_whisper
from lipstream.audio import StreamingFeatures, audio_features
from lipstream.synthetic import speech as speech_like

# Measured with this tiny random encoder on speech_like audio (2 s, 20 ms chunks): relative L2
# over all frames 5.0e-4 at 0 ms look-ahead, 0.8-1.1e-4 at 40-80 ms; worst frame 1.4e-3.
# Random weights only: real whisper-tiny figures are for the bench to measure.
REL_L2_TOLERANCE = 2e-3
WORST_FRAME_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def whisper():
    return tiny_whisper()


@pytest.fixture(scope="module")
def speech():
    return speech_like(1.37, seed=1)


def stream(streamer: StreamingFeatures, audio: np.ndarray, chunk: int) -> torch.Tensor:
    pieces = [streamer.push(audio[i:i + chunk]) for i in range(0, audio.shape[0], chunk)]
    return torch.cat([*pieces, streamer.flush()])


def rel_l2(streamed: torch.Tensor, offline: torch.Tensor) -> tuple[float, float]:
    diff = streamed - offline
    worst = diff.flatten(1).norm(dim=1) / offline.flatten(1).norm(dim=1)
    return float(diff.norm() / offline.norm()), float(worst.max())


@pytest.mark.parametrize("fps", [25, 30])
def test_flush_of_whole_clip_equals_offline(whisper, speech, fps):
    """A whole clip at once: frame 0 comes from the first pass (the audio that made it ready, no more),
    every other frame from the flush, exactly as offline."""
    encoder, extractor = whisper
    streamer = StreamingFeatures(encoder, extractor, fps=fps, step_ms=10_000)
    first = streamer.push(speech)
    head = speech[:streamer.first_pass_samples]
    assert first.shape == (1, 50, 32) and torch.equal(first, audio_features(head, encoder, extractor, fps=fps)[:1])
    assert torch.equal(streamer.flush(), audio_features(speech, encoder, extractor, fps=fps)[1:])


@pytest.mark.parametrize(("fps", "lookahead_ms", "ready_at"), [(25, 40, 2560), (25, 0, 1920), (30, 80, 3200)])
def test_the_first_pass_runs_as_soon_as_frame_0_is_ready(whisper, speech, fps, lookahead_ms, ready_at):
    """Frame 0 needs its window (steps up to 6 at 25 fps: 120 ms) and the look-ahead; the first pass
    runs at the chunk that brings that audio, not at the next point of the grid."""
    encoder, extractor = whisper
    streamer = StreamingFeatures(encoder, extractor, fps=fps, lookahead_ms=lookahead_ms, step_ms=120)
    assert streamer.first_pass_samples == ready_at
    cut = (ready_at - 1) // 160 * 160  # 10 ms chunks up to just before it
    out = [streamer.push(speech[i:i + 160]) for i in range(0, cut, 160)]
    assert streamer.passes == 0 and all(o.shape[0] == 0 for o in out)
    first = streamer.push(speech[cut:cut + 160])
    assert streamer.passes == 1 and first.shape[0] == 1
    assert torch.equal(first, audio_features(speech[:ready_at], encoder, extractor, fps=fps)[:1])


@pytest.mark.parametrize(("fps", "context_s", "lookahead_ms"), [(25, None, 80), (30, None, 0), (25, 0.5, 40)])
def test_streaming_is_close_to_offline(whisper, speech, fps, context_s, lookahead_ms):
    encoder, extractor = whisper
    offline = audio_features(speech, encoder, extractor, fps=fps)
    streamer = StreamingFeatures(encoder, extractor, fps=fps, context_s=context_s, lookahead_ms=lookahead_ms,
                                 step_ms=400)
    streamed = stream(streamer, speech, 1600)
    assert streamed.shape == offline.shape == (math.floor(speech.shape[0] / 16000 * fps), 50, 32)
    assert streamer.frames_emitted == offline.shape[0]
    total, worst = rel_l2(streamed, offline)
    assert total < REL_L2_TOLERANCE and worst < WORST_FRAME_TOLERANCE


@pytest.mark.parametrize(("fps", "lookahead_ms"), [(25, 0), (25, 50), (30, 20)])
def test_frames_come_out_as_soon_as_the_lookahead_allows(whisper, fps, lookahead_ms):
    encoder, extractor = whisper
    audio = speech_like(0.4, seed=2)
    streamer = StreamingFeatures(encoder, extractor, fps=fps, lookahead_ms=lookahead_ms, step_ms=20)
    mult, pad = 50 / fps, math.ceil(50 / fps)
    for end in range(320, audio.shape[0] + 1, 320):
        out = streamer.push(audio[end - 320:end])
        # frame f exists (f < floor(N/16000*fps)) and its window [floor(f*mult)-2*pad, +10) lies in
        # the whisper steps kept for the audio minus the look-ahead: floor((N-look)/16000*50)
        kept = math.floor((end - lookahead_ms * 16) / 16000 * 50)
        frames = range(math.floor(end / 16000 * fps))
        ready = [f for f in frames if math.floor(f * mult) - 2 * pad + 10 <= kept]
        assert streamer.frames_emitted == len(ready), f"after {end} samples"
        assert out.shape[1:] == (50, 32)
    assert streamer.flush().shape[0] == math.floor(audio.shape[0] / 16000 * fps) - len(ready)


def test_outputs_do_not_depend_on_chunk_size(whisper, speech):
    encoder, extractor = whisper
    results = []
    for chunk_ms in (20, 60, 160):  # no chunk spans two pass points (frame 0 ready at 160 ms, then every 300 ms)
        streamer = StreamingFeatures(encoder, extractor, lookahead_ms=40, step_ms=300)
        results.append(stream(streamer, speech, chunk_ms * 16))
        assert streamer.passes == 6  # frame 0 ready (160 ms) + 4 grid points + flush
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_stream_across_a_30s_segment_boundary(whisper):
    encoder, extractor = whisper
    audio = np.tile(speech_like(1.0, seed=3), 31)[:30_800 * 16]
    offline = audio_features(audio, encoder, extractor)
    streamer = StreamingFeatures(encoder, extractor, lookahead_ms=40, step_ms=200)
    pieces = [streamer.push(audio[:29_600 * 16])]
    pieces += [streamer.push(audio[i:i + 1600]) for i in range(29_600 * 16, audio.shape[0], 1600)]
    streamed = torch.cat([*pieces, streamer.flush()])
    assert streamed.shape == offline.shape == (770, 50, 32)
    total, worst = rel_l2(streamed, offline)
    assert total < REL_L2_TOLERANCE and worst < WORST_FRAME_TOLERANCE


def test_pcm16_input_reset_and_flush_rules(whisper, speech):
    encoder, extractor = whisper
    pcm = (speech * 32767).astype(np.int16)
    streamer = StreamingFeatures(encoder, extractor, step_ms=10_000)
    streamer.push(pcm)
    from_int16 = streamer.flush()
    with pytest.raises(RuntimeError):
        streamer.push(pcm[:320])
    streamer.reset()
    assert streamer.frames_emitted == 0 and streamer.samples_received == 0
    streamer.push(pcm.astype(np.float32) / 32768)
    assert torch.equal(streamer.flush(), from_int16)
    assert streamer.last_pass_seconds is not None and streamer.passes == 2  # frame 0's pass, the flush


def test_invalid_settings(whisper):
    encoder, extractor = whisper
    for bad in ({"context_s": 0}, {"lookahead_ms": -1}, {"step_ms": 0}, {"fps": 25.0}):
        with pytest.raises(ValueError):
            StreamingFeatures(encoder, extractor, **bad)
    with pytest.raises(ValueError):
        StreamingFeatures(encoder, extractor).push(np.zeros((2, 320), np.float32))


def test_bench_compares_generated_faces_with_musetalk_weights(tmp_path, monkeypatch, capsys):
    """`bench audio-streaming --faces N` runs MuseTalk on streamed vs offline features (tiny weights here)."""
    import argparse

    from lipstream.bench import audio_streaming
    from musetalk_tiny import write_tiny_musetalk

    write_tiny_musetalk(tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    audio_streaming.add_arguments(parser)
    args = parser.parse_args(["--faces", "2", "--models", str(tmp_path / "models"), "--seconds", "0.6",
                              "--lead-seconds", "0.4", "--contexts", "full", "--lookaheads", "40",
                              "--placements", "segment", "--step-sweep", "200"])
    rows = audio_streaming.measure(args)
    default = next(r for r in rows if "face_rel_l2" in r)
    assert default["faces"] == 2 and default["face_rel_l2"] >= 0 and default["face_mean_abs_diff"] >= 0
    assert "faces at the defaults" in capsys.readouterr().out


def test_a_pass_keeps_the_finished_log_mel_blocks_and_gets_the_same_input(whisper, speech):
    """Each pass computes only the log-mel blocks its new audio reaches; its input is still exactly the
    spectrogram of all the audio so far (what offline computes for that audio)."""
    from lipstream.audio.features import encode_mels, segment_mels

    encoder, extractor = whisper
    streamer = StreamingFeatures(encoder, extractor, step_ms=120)
    checked = 0
    for start in range(0, speech.shape[0], 320):
        feature_pass = streamer.prepare(speech[start:start + 320])
        if feature_pass.mels is not None:
            assert torch.equal(feature_pass.mels, segment_mels(speech[:feature_pass.end], extractor))
            checked += 1
        streamer.finish(feature_pass, None if feature_pass.mels is None else encode_mels(feature_pass.mels, encoder))
    assert checked >= 8


def test_the_start_lead_covers_the_grid_after_an_early_first_pass(whisper):
    """Frame 0 comes out at 160 ms of audio; frames 1-3 only at the 240 and 360 ms grid points. With the
    audio arriving in real time, an utterance started as soon as frame 0 is out would show frame 3 (due
    120 ms after frame 0) 80 ms before its features exist: the stream asks for that lead, and for
    none once the audio in is ahead of the grid (a TTS sending faster than real time)."""
    encoder, extractor = whisper
    streamer = StreamingFeatures(encoder, extractor, lookahead_ms=40, step_ms=120)
    assert streamer.start_lead_s(2560) == pytest.approx(0.080)
    assert streamer.start_lead_s(3840) == 0.0 and streamer.start_lead_s(16000) == 0.0
    step_per_frame = StreamingFeatures(encoder, extractor, lookahead_ms=40, step_ms=40)
    assert step_per_frame.start_lead_s(2560) == 0.0
