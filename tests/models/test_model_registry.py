"""The registry: the shipped file, its validation, and name look-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomllib
from genstruct_service.errors import ModelError
from genstruct_service.model_files import registry as registry_module
from genstruct_service.model_files.registry import find_registry_file, load_registry, parse_registry

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_shipped_registry_parses_with_the_genstruct_builds_and_the_demo() -> None:
    reg = load_registry(REPO_ROOT / "models" / "registry.toml")
    for quant in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"):
        entry = reg.get(f"genstruct-7b:{quant}")
        assert entry.source == "hf"
        assert entry.quant == quant
        assert entry.file is not None and entry.file.endswith(f".{quant}.gguf")
        # no pin without a source to show for it: the Hub's sha256 is checked instead
        assert entry.sha256 is None and entry.size is None
        assert not entry.stand_in
    assert reg.default == "genstruct-7b:Q4_K_M"
    demo = reg.get("demo")
    assert reg.quickstart_fallback == "demo"
    assert demo.source == "pypi" and demo.stand_in
    assert "stand-in" in demo.label


def test_the_registry_found_by_default_is_the_checkout_s(monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_registry_file() == REPO_ROOT / "models" / "registry.toml"
    monkeypatch.setenv("GENSTRUCT_MODEL_REGISTRY", "/somewhere/else.toml")
    assert find_registry_file() == Path("/somewhere/else.toml")


def test_packaged_copy_matches_models_registry() -> None:
    """The copy a non-editable install reads must be models/registry.toml itself."""
    packaged = Path(registry_module.__file__).with_name("registry.toml")
    assert packaged.read_bytes() == (REPO_ROOT / "models" / "registry.toml").read_bytes()


def test_names_ignore_case_and_aliases_resolve() -> None:
    reg = load_registry()
    assert reg.get("GENSTRUCT-7B:q4_k_m").name == "genstruct-7b:Q4_K_M"
    assert reg.get("genstruct-7b").name == "genstruct-7b:Q4_K_M"
    assert reg.get(" demo ").name == "demo"


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ModelError) as err:
        load_registry().get("genstruct-13b")
    message = str(err.value)
    assert "unknown model name 'genstruct-13b'" in message
    for name in ("genstruct-7b:Q4_K_M", "genstruct-7b:Q8_0", "demo"):
        assert name in message


def _valid() -> dict[str, Any]:
    text = (REPO_ROOT / "models" / "registry.toml").read_text()
    return tomllib.loads(text)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["models"]["demo"].update(colour="red"), "unknown keys"),
        (lambda d: d["models"]["genstruct-7b:Q6_K"].update(sha256="ABC"), "64 lowercase hex"),
        (lambda d: d["models"]["genstruct-7b:Q6_K"].pop("repo"), "needs repo and file"),
        (lambda d: d["models"]["genstruct-7b:Q6_K"].update(file="x.bin"), ".gguf file"),
        (lambda d: d["models"]["genstruct-7b:Q6_K"].update(size=-1), "positive number"),
        (lambda d: d["models"]["genstruct-7b:Q6_K"].update(source="s3"), "source must be"),
        (lambda d: d["models"]["demo"].pop("module"), "needs package and module"),
        (lambda d: d["models"]["demo"].update(aliases=["genstruct-7b"]), "used twice"),
        (lambda d: d.update(default="genstruct-7b:Q2_K"), "not a model in the registry"),
        (lambda d: d.update(schema=2), "unsupported schema"),
    ],
)
def test_invalid_registries_are_refused_with_the_reason(mutate: Any, message: str) -> None:
    data = _valid()
    mutate(data)
    with pytest.raises(ModelError, match=message):
        parse_registry(data, path=Path("registry.toml"))


def test_broken_toml_is_a_model_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text("schema = 1\n[models.demo\n")
    with pytest.raises(ModelError, match="not valid TOML"):
        load_registry(path)
