"""Test setup: offline, no network at all, and tiny random-weight models on disk."""

from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["XMGIE_NO_PROGRESS"] = "1"
os.environ.pop("XMGIE_MODELS_DIR", None)

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_real_connect = socket.socket.connect


def _no_inet_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise RuntimeError(f"a test tried to reach the network ({address!r}); tests are offline")
    return _real_connect(self, address)


socket.socket.connect = _no_inet_connect


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A models folder for the tiny models; families are written on first use."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_models(tiny_root):
    """``tiny_models("sam")`` writes (once) and returns the tiny model path of a family."""
    from xmgie.mgie_core import tiny

    def get(family: str):
        tiny.ensure_tiny_models(tiny_root, [family])
        return tiny.tiny_path(tiny_root, family)

    return get


@pytest.fixture
def clean_paths():
    """Reset the library's model search configuration around a test."""
    from xmgie.mgie_core import paths

    paths.configure(reset=True)
    yield paths
    paths.configure(reset=True)


EXAMPLES = Path(__file__).resolve().parent.parent / "example_data"


@pytest.fixture
def example_photos():
    """The example dataset shipped in the repository (example_data/: four photos with masks,
    instructions and prompts, listed in manifest.json)."""
    assert (EXAMPLES / "manifest.json").exists(), f"the example dataset is missing: {EXAMPLES}"
    return EXAMPLES


def _load_tiny(tiny_root, tiny_models, family: str, loader_name: str, name: str):
    from xmgie.mgie_core import paths
    from xmgie.mgie_core.models import sd as sdm

    tiny_models(family)
    paths.configure(reset=True)
    paths.configure(models_dir=[tiny_root])
    try:
        return getattr(sdm, loader_name)(name)
    finally:
        paths.configure(reset=True)


@pytest.fixture(scope="module")
def image():
    """A seeded random 128 x 128 RGB image in 0..1, [1,H,W,3] (IMAGE layout): the tiny
    models' test photo (one per test module; modules may define their own)."""
    return torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def mask():
    """The edit region for ``image``: a 64 x 64 box, [1,H,W] (MASK layout)."""
    m = torch.zeros(1, 128, 128)
    m[:, 32:96, 40:104] = 1
    return m


@pytest.fixture(scope="session")
def tiny_sd(tiny_root, tiny_models):
    """The tiny SD 1.x model loaded once through the public loader (shared: tests must
    not change its weights; deep-copy it to change precision)."""
    return _load_tiny(tiny_root, tiny_models, "sd_diffusers", "load_sd_diffusers", "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_ip2p(tiny_root, tiny_models):
    return _load_tiny(tiny_root, tiny_models, "ip2p_diffusers", "load_instruct_diffusers",
                      "tiny-ip2p")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_root, tiny_models):
    """The tiny SDXL (diffusers folder) through the public loader (shared: do not change
    its weights)."""
    return _load_tiny(tiny_root, tiny_models, "sdxl", "load_sd_diffusers", "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd2(tiny_root, tiny_models):
    """The tiny SD 2.x, 768-v style (v-prediction), through the public loader."""
    return _load_tiny(tiny_root, tiny_models, "sd2", "load_sd_diffusers", "tiny-sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_ip2p(tiny_root, tiny_models):
    """The tiny SDXL InstructPix2Pix (8 input channels) through the public loader."""
    return _load_tiny(tiny_root, tiny_models, "sdxl_ip2p", "load_instruct_diffusers",
                      "tiny-sdxl-ip2p")


@pytest.fixture
def tiny_env(tiny_root, clean_paths, monkeypatch):
    """CLI runs with --tiny build and find the tiny models in the session's tiny folder."""
    from xmgie.mgie_core import tiny

    monkeypatch.setenv(tiny.ENV_TINY_DIR, str(tiny_root))
    tiny.ensure_tiny_models(tiny_root)
    return tiny_root
