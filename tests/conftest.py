"""Shared test fixtures."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lipstream import synthetic

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test reaches a model hub; tests that exercise downloads point HF_ENDPOINT at a local server."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Test-sized tensors run fastest on one thread; on a busy 2-core machine more threads spin (15x slower).
    Benchmarks, not tests, measure multi-threaded speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def astronaut_bgr() -> np.ndarray:
    """scikit-image's astronaut photo (NASA, public domain), uint8 [512,512,3] BGR."""
    return synthetic.astronaut_bgr()


@pytest.fixture(scope="session")
def make_scene(astronaut_bgr):
    """make_scene(frame_hw, face_box, seed) -> lipstream.synthetic.Scene, built from the astronaut photo."""

    def build(frame_hw=(720, 1280), face_box=(500, 150, 760, 470), seed=0) -> synthetic.Scene:
        return synthetic.make_scene(frame_hw, face_box, seed, photo=astronaut_bgr)

    return build


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder of avatars holding the astronaut ("astronaut"), for a module's servers."""
    from server_helpers import store_avatar  # the server's stack: not on a bare GPU host (bench/gpu_pass.sh)

    root = tmp_path_factory.mktemp("avatars")
    store_avatar(root)
    return root
