"""Model files, download, loading (tiny random networks in the official layout) and the full UNet's shape."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import WhisperConfig, WhisperModel

from lipstream import cli
from lipstream.errors import (
    ChecksumMismatchError,
    DownloadError,
    IncompatibleWeightsError,
    MissingWeightsError,
)
from lipstream.models.download import download_models
from lipstream.models.layout import (
    MUSETALK_FILES,
    check_models,
    has_musetalk_weights,
    models_root,
    require_musetalk_weights,
)
from lipstream.models.load import load_musetalk
from lipstream.models.positional import PositionalEncoding
from lipstream.models.unet import MUSETALK_UNET_CONFIG, MUSETALK_UNET_PARAMETERS, build_unet, load_unet
from lipstream.models.vae import SD_VAE_CONFIG, SD_VAE_PARAMETERS
from lipstream.models.whisper import WHISPER_TINY_CONFIG, WHISPER_TINY_ENCODER_PARAMETERS
from musetalk_tiny import TEST_WHISPER_CONFIG, write_tiny_musetalk


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("models")
    return root, write_tiny_musetalk(root)


def run_cli(argv: list[str]) -> int:
    return cli.main(argv)


# --- the full-size UNet an official musetalkV15/unet.pth must fit -------------------------------------

# Key -> shape of the official checkpoint (diffusers module names; spec §1.2), checked on the meta device.
OFFICIAL_UNET_SHAPES = {
    "conv_in.weight": (320, 8, 3, 3),
    "conv_out.weight": (4, 320, 3, 3),
    "time_embedding.linear_1.weight": (1280, 320),
    "time_embedding.linear_2.weight": (1280, 1280),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 384),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight": (320, 384),
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight": (640, 384),
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_out.0.weight": (1280, 1280),
    "down_blocks.3.resnets.1.conv2.weight": (1280, 1280, 3, 3),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight": (1280, 384),
    "mid_block.resnets.1.time_emb_proj.weight": (1280, 1280),
    "up_blocks.0.resnets.2.conv1.weight": (1280, 2560, 3, 3),
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.weight": (320, 384),
    "up_blocks.3.attentions.2.proj_out.weight": (320, 320, 1, 1),  # SD-1.x: 1x1 conv projections
    "conv_norm_out.weight": (320,),
}


def test_full_unet_from_spec_config_has_the_official_shapes():
    with torch.device("meta"):
        unet = build_unet(MUSETALK_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == MUSETALK_UNET_PARAMETERS == 849_947_844
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert len(shapes) == 686
    for key, shape in OFFICIAL_UNET_SHAPES.items():
        assert shapes[key] == shape, key
    assert not [k for k in shapes if k.startswith("add_embedding") or "class_embedding" in k]
    # the SD-1.x structure: cross-attention in down 0-2, mid, up 1-3; none in down 3 / up 0
    assert not [k for k in shapes if k.startswith(("down_blocks.3.attentions", "up_blocks.0.attentions"))]


def test_full_vae_and_whisper_encoder_sizes():
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE_CONFIG)
        encoder = WhisperModel(WhisperConfig(**WHISPER_TINY_CONFIG)).encoder
    assert sum(p.numel() for p in vae.parameters()) == SD_VAE_PARAMETERS == 83_653_863
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert sum(p.numel() for p in encoder.parameters()) == WHISPER_TINY_ENCODER_PARAMETERS == 8_208_384


# --- layout, check, download --------------------------------------------------------------------------

def test_layout_lists_the_official_files():
    assert [f.path for f in MUSETALK_FILES] == [
        "musetalkV15/unet.pth", "musetalkV15/musetalk.json", "sd-vae/config.json",
        "sd-vae/diffusion_pytorch_model.bin", "whisper/config.json", "whisper/pytorch_model.bin",
        "whisper/preprocessor_config.json",
    ]
    assert {f.local_dir for f in MUSETALK_FILES} == {"", "sd-vae/", "whisper/"}


def test_models_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LIPSTREAM_MODELS", str(tmp_path))
    assert models_root() == tmp_path
    monkeypatch.delenv("LIPSTREAM_MODELS")
    assert models_root() == Path("models")


def test_empty_root_reports_every_file_missing(tmp_path, capsys):
    report = check_models(tmp_path)
    assert report.missing == MUSETALK_FILES and not report.present and not report.complete
    assert not has_musetalk_weights(tmp_path)
    with pytest.raises(MissingWeightsError, match="lipstream models download"):
        require_musetalk_weights(tmp_path)
    with pytest.raises(MissingWeightsError):
        load_musetalk(tmp_path, "cpu")

    assert run_cli(["models", "check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("MISSING") == len(MUSETALK_FILES)
    assert all(f.path in out for f in MUSETALK_FILES)


def test_check_complete_root(tiny_root, capsys):
    root, _ = tiny_root
    assert has_musetalk_weights(root)
    assert run_cli(["models", "check", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "MISSING" not in out and out.count("present") == len(MUSETALK_FILES)
    # --verify hashes unet.pth: the tiny one is not the published file
    assert run_cli(["models", "check", "--root", str(root), "--verify"]) == 1
    assert "CORRUPT  musetalkV15/unet.pth" in capsys.readouterr().out


def test_whisper_weights_in_safetensors_are_found_and_load(tmp_path, capsys):
    originals = write_tiny_musetalk(tmp_path, whisper_file="model.safetensors")
    assert not (tmp_path / "whisper" / "pytorch_model.bin").exists() and has_musetalk_weights(tmp_path)
    assert run_cli(["models", "check", "--root", str(tmp_path)]) == 0
    assert "present  whisper/model.safetensors" in capsys.readouterr().out
    encoder = load_musetalk(tmp_path, "cpu").whisper_encoder
    mel = torch.randn(1, 80, 2 * TEST_WHISPER_CONFIG["max_source_positions"], generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(encoder(mel).last_hidden_state, originals["whisper_encoder"](mel).last_hidden_state)


def test_download_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE") as info:
        download_models(tmp_path)
    assert time.monotonic() - start < 10
    assert "\n" not in str(info.value)
    assert run_cli(["models", "download", "--root", str(tmp_path)]) == 1


@pytest.fixture
def online(monkeypatch):
    """Offline mode off, in the environment and in huggingface_hub (which read it at import)."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_download_unreachable_endpoint_fails_fast(tmp_path, online, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"Cannot reach the model hub at http://127\.0\.0\.1:9") as info:
        download_models(tmp_path)
    assert time.monotonic() - start < 10
    assert "\n" not in str(info.value)
    assert not (tmp_path / "musetalkV15").exists()


@pytest.fixture
def stub_hub(online, monkeypatch):
    """A local HTTP server answering like the Hub's /resolve/ URLs (the body of a file is its URL path),
    set as HF_ENDPOINT; yields the list of request paths it served."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self._answer()

        def do_GET(self):
            body = self._answer()
            if body:
                self.wfile.write(body)

        def _answer(self) -> bytes | None:
            requests.append(f"{self.command} {self.path}")
            if "/resolve/main/" not in self.path:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            body = self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", f'"{hashlib.sha1(body).hexdigest()}"')
            self.send_header("X-Repo-Commit", "0" * 40)
            self.end_headers()
            return body

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}/")
    yield requests
    server.shutdown()
    thread.join()


def test_download_fills_the_layout_skips_present_files_and_checks_sha256(tmp_path, stub_hub, monkeypatch):
    (tmp_path / "sd-vae").mkdir()
    (tmp_path / "sd-vae" / "config.json").write_text("{}")

    # the stub's unet.pth is not the published file: deleted, and a clear error
    with pytest.raises(ChecksumMismatchError, match="sha256") as info:
        download_models(tmp_path)
    assert "lipstream models download" in str(info.value)
    assert not (tmp_path / "musetalkV15" / "unet.pth").exists()
    assert "GET /TMElyralab/MuseTalk/resolve/main/musetalkV15/unet.pth" in stub_hub

    without_digests = tuple(dataclasses.replace(f, sha256=None) for f in MUSETALK_FILES)
    monkeypatch.setattr("lipstream.models.layout.MUSETALK_FILES", without_digests)
    stub_hub.clear()
    downloaded = download_models(tmp_path)
    assert len(downloaded) == len(MUSETALK_FILES) - 1 and check_models(tmp_path).complete
    assert not [r for r in stub_hub if "sd-vae-ft-mse/resolve/main/config.json" in r]  # present: skipped
    assert (tmp_path / "sd-vae" / "config.json").read_text() == "{}"
    assert (tmp_path / "whisper" / "pytorch_model.bin").read_bytes() == b"/openai/whisper-tiny/resolve/main/pytorch_model.bin"
    assert (tmp_path / "musetalkV15" / "unet.pth").read_bytes() == b"/TMElyralab/MuseTalk/resolve/main/musetalkV15/unet.pth"
    assert download_models(tmp_path) == []


# --- loading ------------------------------------------------------------------------------------------

def test_round_trip_through_the_official_layout(tiny_root):
    root, originals = tiny_root
    models = load_musetalk(root, "cpu")
    assert models.device == torch.device("cpu") and models.dtype == torch.float32
    assert models.scaling_factor == pytest.approx(0.18215)
    for net in (models.unet, models.vae, models.whisper_encoder, models.positional_encoding):
        assert not net.training
        assert not any(p.requires_grad for p in net.parameters())

    g = torch.Generator().manual_seed(1)
    sample, audio = torch.randn(1, 8, 32, 32, generator=g), torch.randn(1, 50, 384, generator=g)
    t = torch.zeros((), dtype=torch.long)
    with torch.inference_mode():
        assert torch.equal(models.unet(sample, t, audio).sample, originals["unet"](sample, t, audio).sample)
        z = torch.randn(1, 4, 32, 32, generator=g)
        decoded = models.vae.decode(z).sample
        assert decoded.shape == (1, 3, 256, 256)
        assert torch.equal(decoded, originals["vae"].decode(z).sample)
        mel = torch.randn(1, 80, 2 * TEST_WHISPER_CONFIG["max_source_positions"], generator=g)
        ours = models.whisper_encoder(mel, output_hidden_states=True).hidden_states
        theirs = originals["whisper_encoder"](mel, output_hidden_states=True).hidden_states
        assert len(ours) == TEST_WHISPER_CONFIG["encoder_layers"] + 1
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    fe = models.feature_extractor
    assert (fe.feature_size, fe.sampling_rate, fe.hop_length, fe.n_samples) == (80, 16000, 160, 480000)


def test_models_are_loaded_once_per_root_device_dtype(tiny_root):
    root, _ = tiny_root
    first = load_musetalk(root, "cpu")
    assert load_musetalk(str(root), torch.device("cpu"), torch.float32) is first
    half = load_musetalk(root, "cpu", torch.bfloat16)
    assert half is not first and half.unet.dtype == half.vae.dtype == torch.bfloat16
    assert half.whisper_encoder.dtype == half.positional_encoding.table.dtype == torch.bfloat16


def test_strict_loading_rejects_renamed_and_resized_tensors(tiny_root, tmp_path):
    root, _ = tiny_root
    config = root / "musetalkV15" / "musetalk.json"
    state = torch.load(root / "musetalkV15" / "unet.pth", weights_only=True)

    renamed = dict(state)
    renamed["conv_in.weights"] = renamed.pop("conv_in.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(IncompatibleWeightsError, match=r"1 missing tensors \(e\.g\. conv_in\.weight\)") as info:
        load_unet(config, tmp_path / "renamed.pth", torch.device("cpu"), torch.float32)
    assert "1 unexpected tensors (e.g. conv_in.weights)" in str(info.value)
    assert "lipstream models download" in str(info.value)

    resized = dict(state)
    resized["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    torch.save(resized, tmp_path / "resized.pth")
    with pytest.raises(IncompatibleWeightsError, match=r"conv_out\.weight \(4, 32, 1, 1\) != \(4, 32, 3, 3\)"):
        load_unet(config, tmp_path / "resized.pth", torch.device("cpu"), torch.float32)


def test_positional_encoding_is_the_transformer_sinusoid():
    pe = PositionalEncoding()
    x = torch.randn(3, 50, 384)
    table = pe(torch.zeros(1, 50, 384))[0]
    assert table.shape == (50, 384)
    assert torch.equal(pe(x), x + table)  # added to every item of the batch
    pos, i = 7, 5  # dims 2i (sin) and 2i+1 (cos)
    angle = pos / 10000 ** (2 * i / 384)
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert torch.equal(table[0, 0::2], torch.zeros(192)) and torch.equal(table[0, 1::2], torch.ones(192))
    half = pe.to(torch.float16)(x.half())
    assert half.dtype == torch.float16 and half.shape == x.shape


# --- real weights / GPU -------------------------------------------------------------------------------

@pytest.mark.weights
def test_real_weights_load():
    if not has_musetalk_weights():
        pytest.skip(f"MuseTalk weights not under {models_root()} (run `lipstream models download`)")
    models = load_musetalk(device="cpu")
    assert sum(p.numel() for p in models.unet.parameters()) == MUSETALK_UNET_PARAMETERS
    assert models.scaling_factor == pytest.approx(0.18215)
    assert models.whisper_encoder.config.d_model == 384


@pytest.mark.gpu
def test_tiny_models_load_on_cuda_in_fp16(tiny_root):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    models = load_musetalk(tiny_root[0], "cuda")
    assert models.dtype == torch.float16 and models.device.type == "cuda"
    assert next(models.unet.parameters()).is_cuda and next(models.vae.parameters()).dtype == torch.float16
