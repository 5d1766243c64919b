"""`genstruct-server models list|download|verify`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from genstruct_service.model_files.cli import main
from model_files_helpers import FakeHub, make_gguf

REPO = "TestOrg/Genstruct-7B-GGUF"
FILE = "Genstruct-7B.Q4_K_M.gguf"


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, bytes]:
    content = make_gguf(n_floats=8 * 1024)
    registry = tmp_path / "registry.toml"
    registry.write_text(
        f"""schema = 1
default = "genstruct-7b:Q4_K_M"
quickstart_fallback = "genstruct-7b:Q4_K_M"

[models."genstruct-7b:Q4_K_M"]
source = "hf"
repo = "{REPO}"
file = "{FILE}"
quant = "Q4_K_M"
size = {len(content)}
sha256 = "{hashlib.sha256(content).hexdigest()}"
"""
    )
    models = tmp_path / "models"
    models.mkdir()
    return registry, models, content


def _run(registry: Path, models: Path, *args: str) -> int:
    return main(["--registry", str(registry), "--models-dir", str(models), *args])


def test_list_download_verify(
    fake_hub: FakeHub, setup: tuple[Path, Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    registry, models, content = setup
    fake_hub.add(REPO, FILE, content)

    assert _run(registry, models, "list") == 0
    out = capsys.readouterr().out
    assert "genstruct-7b:Q4_K_M (default)" in out and "missing" in out

    assert _run(registry, models, "download", "genstruct-7b:Q4_K_M", "--no-progress") == 0
    assert (models / FILE).read_bytes() == content
    capsys.readouterr()

    assert _run(registry, models, "list") == 0
    assert "verified" in capsys.readouterr().out

    assert _run(registry, models, "verify", "genstruct-7b:Q4_K_M") == 0
    assert "ok: GGUF v3" in capsys.readouterr().out


def test_verify_refuses_a_text_file(
    setup: tuple[Path, Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry, models, _ = setup
    fake = tmp_path / "renamed.gguf"
    fake.write_text("just text\n")
    assert _run(registry, models, "verify", str(fake)) == 1
    assert "not a GGUF model file" in capsys.readouterr().err


def test_list_verify_flags_a_corrupt_file(
    setup: tuple[Path, Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    registry, models, content = setup
    (models / FILE).write_bytes(content[:-1] + b"\x01")
    assert _run(registry, models, "list") == 0
    assert "present, not verified" in capsys.readouterr().out
    assert _run(registry, models, "list", "--verify") == 1
    assert "CORRUPT" in capsys.readouterr().out


def test_download_failure_exits_1_with_the_reason(
    refused_endpoint: str, setup: tuple[Path, Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    registry, models, _ = setup
    assert _run(registry, models, "download", "genstruct-7b:Q4_K_M", "--no-progress") == 1
    assert "cannot reach the Hugging Face Hub" in capsys.readouterr().err
