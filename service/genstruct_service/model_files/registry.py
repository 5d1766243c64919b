"""The model registry (models/registry.toml): known GGUF builds, parsed and looked up by name."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from genstruct_service.errors import ModelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

REGISTRY_ENV = "GENSTRUCT_MODEL_REGISTRY"
MODELS_DIR_ENV = "GENSTRUCT_MODELS_DIR"
REGISTRY_FILE = "registry.toml"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
Source = Literal["hf", "pypi"]


@dataclass(frozen=True)
class ModelEntry:
    """One known model build: where it comes from and what it must hash to."""

    name: str
    source: Source
    quant: str
    size: int | None = None
    sha256: str | None = None
    repo: str | None = None
    file: str | None = None
    revision: str = "main"
    package: str | None = None
    module: str | None = None
    display_name: str = ""
    stand_in: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The name the server reports as model_name."""
        return self.display_name or self.name

    @property
    def origin(self) -> str:
        """Where the file comes from, for people: `hf://owner/repo/file` or `pypi:package`."""
        if self.source == "hf":
            return f"hf://{self.repo}/{self.file}"
        return f"pypi:{self.package}"

    def local_path(self, models_dir: Path) -> Path | None:
        """Where a Hub build lives once downloaded; None for packaged models."""
        if self.source != "hf" or self.file is None:
            return None
        return models_dir / Path(self.file).name


@dataclass(frozen=True)
class Registry:
    """All known builds, the default one, and the quickstart's fallback."""

    entries: Mapping[str, ModelEntry]
    default: str
    quickstart_fallback: str
    path: Path | None = None
    _index: Mapping[str, str] = field(default_factory=dict, repr=False)

    def names(self) -> list[str]:
        return list(self.entries)

    def find(self, name: str) -> ModelEntry | None:
        """The entry called `name` (or one of its aliases), ignoring case; None if unknown."""
        key = self._index.get(name.strip().lower())
        return self.entries[key] if key is not None else None

    def get(self, name: str) -> ModelEntry:
        """The entry called `name`; ModelError listing the known names if there is none."""
        entry = self.find(name)
        if entry is None:
            raise ModelError(
                f"unknown model name {name!r}. Known names: {', '.join(self.names())}. "
                "Or pass a path to a .gguf file, or hf://OWNER/REPO/FILE.gguf."
            )
        return entry


def default_models_dir() -> Path:
    """The download folder: $GENSTRUCT_MODELS_DIR, else ./models."""
    return Path(os.environ.get(MODELS_DIR_ENV) or "models")


def _checkout_registry() -> Path:
    # service/genstruct_service/model_files/registry.py -> the repository root's models/
    return Path(__file__).resolve().parents[3] / "models" / REGISTRY_FILE


def find_registry_file() -> Path:
    """Locate registry.toml: $GENSTRUCT_MODEL_REGISTRY, the checkout's, else the package's copy."""
    explicit = os.environ.get(REGISTRY_ENV)
    if explicit:
        return Path(explicit)
    checkout = _checkout_registry()
    if checkout.is_file():
        return checkout
    # A non-editable install carries models/registry.toml inside the package (see pyproject).
    packaged = resources.files("genstruct_service.model_files").joinpath(REGISTRY_FILE)
    if packaged.is_file():
        return Path(str(packaged))
    raise ModelError(
        f"model registry not found (looked at {checkout} and inside the installed package). "
        f"Set {REGISTRY_ENV} to the path of a registry.toml."
    )


def load_registry(path: Path | None = None) -> Registry:
    """Parse registry.toml (by default the one find_registry_file() locates)."""
    path = Path(path) if path is not None else find_registry_file()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"cannot read the model registry {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"the model registry {path} is not valid TOML: {exc}") from exc
    return parse_registry(data, path=path)


def parse_registry(data: Mapping[str, Any], *, path: Path | None = None) -> Registry:
    """Build a Registry from parsed TOML, checking every field; ModelError says what is wrong."""
    where = str(path) if path is not None else "the model registry"
    if data.get("schema") != 1:
        raise ModelError(f"{where}: unsupported schema {data.get('schema')!r} (expected 1)")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ModelError(f"{where}: no [models.NAME] tables")
    entries: dict[str, ModelEntry] = {}
    index: dict[str, str] = {}
    for name, table in models.items():
        entry = _parse_entry(name, table, where)
        entries[name] = entry
        for alias in (name, *entry.aliases):
            key = alias.lower()
            if key in index:
                raise ModelError(f"{where}: the name {alias!r} is used twice")
            index[key] = name
    default = data.get("default")
    fallback = data.get("quickstart_fallback")
    for key, value in (("default", default), ("quickstart_fallback", fallback)):
        if not isinstance(value, str) or value.lower() not in index:
            raise ModelError(f"{where}: {key} = {value!r} is not a model in the registry")
    assert isinstance(default, str) and isinstance(fallback, str)
    return Registry(
        entries=entries,
        default=index[default.lower()],
        quickstart_fallback=index[fallback.lower()],
        path=path,
        _index=index,
    )


_ALLOWED = {
    "source", "quant", "size", "sha256", "repo", "file", "revision", "package", "module",
    "display_name", "stand_in", "aliases",
}  # fmt: skip


def _parse_entry(name: str, table: object, where: str) -> ModelEntry:
    def bad(message: str) -> ModelError:
        return ModelError(f"{where}: [models.{name!r}] {message}")

    if not isinstance(table, dict):
        raise bad("is not a table")
    unknown = set(table) - _ALLOWED
    if unknown:
        raise bad(f"has unknown keys {sorted(unknown)}")

    def text(key: str, *, required: bool = False) -> str | None:
        value = table.get(key)
        if value is None:
            if required:
                raise bad(f"needs {key}")
            return None
        if not isinstance(value, str) or not value.strip():
            raise bad(f"{key} must be a non-empty string")
        return value

    source_text = text("source", required=True)
    if source_text not in ("hf", "pypi"):
        raise bad(f"source must be 'hf' or 'pypi', not {source_text!r}")
    source: Source = "hf" if source_text == "hf" else "pypi"
    quant = text("quant", required=True)
    assert quant is not None
    size = table.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise bad("size must be a positive number of bytes")
    sha256 = text("sha256")
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        raise bad("sha256 must be 64 lowercase hex digits")
    repo, file, package, module = text("repo"), text("file"), text("package"), text("module")
    if source == "hf":
        if repo is None or file is None:
            raise bad("source = 'hf' needs repo and file")
        if not _REPO.fullmatch(repo):
            raise bad(f"repo must look like OWNER/NAME, not {repo!r}")
        if not file.endswith(".gguf"):
            raise bad(f"file must be a .gguf file, not {file!r}")
    elif package is None or module is None:
        raise bad("source = 'pypi' needs package and module")
    stand_in = table.get("stand_in", False)
    if not isinstance(stand_in, bool):
        raise bad("stand_in must be true or false")
    aliases = table.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise bad("aliases must be a list of names")
    return ModelEntry(
        name=name,
        source=source,
        quant=quant,
        size=size,
        sha256=sha256,
        repo=repo,
        file=file,
        revision=text("revision") or "main",
        package=package,
        module=module,
        display_name=text("display_name") or "",
        stand_in=stand_in,
        aliases=tuple(aliases),
    )
