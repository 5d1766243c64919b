"""Fixtures for the model-file tests: tiny GGUF files and a fake Hugging Face Hub on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from model_files_helpers import FakeHub, cdn_handler, hub_handler, make_gguf, serve


@pytest.fixture
def tiny_gguf_bytes() -> bytes:
    return make_gguf()


@pytest.fixture
def tiny_gguf(tmp_path: Path, tiny_gguf_bytes: bytes) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf_bytes)
    return path


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running fake Hub; HF_ENDPOINT points at it; no token, online."""
    hub = FakeHub()
    hub_server, hub_thread = serve(hub_handler(hub))
    cdn_server, cdn_thread = serve(cdn_handler(hub))
    hub.endpoint = f"http://127.0.0.1:{hub_server.server_address[1]}"
    hub.cdn = f"http://127.0.0.1:{cdn_server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "")
    try:
        yield hub
    finally:
        for server, thread in ((hub_server, hub_thread), (cdn_server, cdn_thread)):
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


@pytest.fixture
def refused_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """HF_ENDPOINT at a loopback port that refuses connections (bound, never listening)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        yield endpoint
    finally:
        sock.close()


@pytest.fixture(autouse=True)
def _no_real_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never reach the real Hub from these tests, whatever a test forgets to set."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("GENSTRUCT_MODEL_REGISTRY", raising=False)
    monkeypatch.delenv("GENSTRUCT_MODELS_DIR", raising=False)
