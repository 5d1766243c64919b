"""Download a model file from the Hugging Face Hub: resumable, checked by sha256 before use.

The metadata request is huggingface_hub's own (`get_hf_file_metadata`: HEAD on
`{endpoint}/{repo}/resolve/{revision}/{file}`, the same redirect policy, HF_TOKEN, offline mode
and error classes as `hf_hub_download`). The transfer is ours, through huggingface_hub's HTTP
session, because `hf_hub_download` (2.x) deletes its partial file when a transfer fails, so an
interrupted 4 GB download would start again from zero, and it moves the file into place before
we could check it. Here the partial file is kept under `<models_dir>/.cache/downloads/`, the next
attempt resumes it with a Range request, and the file reaches its final name only once its
sha256 and its GGUF header have been checked.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import httpx2
from filelock import FileLock
from huggingface_hub import (
    HfFileMetadata,
    constants,
    get_hf_file_metadata,
    get_session,
    get_token,
    hf_hub_url,
    hf_raise_for_status,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from genstruct_service.errors import ModelError
from genstruct_service.model_files import integrity
from genstruct_service.model_files.gguf import read_gguf

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
# Free space kept beyond the file itself, so a download never fills the disk to the last byte.
DISK_MARGIN = 64 * 1024 * 1024
# How much of a partial file is downloaded again and compared before resuming it: a file cut
# by a power loss can end in blocks that were allocated but never written.
TAIL_CHECK = 4 * 1024 * 1024


@dataclass(frozen=True)
class DownloadResult:
    """A downloaded and verified file."""

    path: Path
    sha256: str
    size: int
    commit: str | None


def is_offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    """HF_ENDPOINT, read now, else huggingface_hub's default."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def free_bytes(folder: Path) -> int:
    """Free space on the disk holding `folder` (the nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(Path.cwd()).free


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def partial_path(dest: Path, etag: str) -> Path:
    """Where the partial download of `dest` (a given remote version of it) is kept."""
    return dest.parent / integrity.CACHE_DIR / "downloads" / f"{dest.name}.{etag[:16]}.part"


def check_disk_space(folder: Path, needed: int, *, what: str) -> None:
    """ModelError if `needed` bytes (plus a margin) do not fit on the disk holding `folder`."""
    free = free_bytes(folder)
    if free < needed + DISK_MARGIN:
        raise ModelError(
            f"not enough free disk space to download {what}: it needs {_gb(needed)} and "
            f"{folder} has {_gb(free)} free. Free some space, or point GENSTRUCT_MODELS_DIR "
            "at a bigger disk."
        )


def download_file(
    repo: str,
    filename: str,
    dest: Path,
    *,
    revision: str = "main",
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    token: str | bool | None = None,
    max_attempts: int = 5,
    retry_wait: float = 1.0,
    progress: bool = True,
    tail_check: int = TAIL_CHECK,
) -> DownloadResult:
    """Download `repo`/`filename` to `dest`, verified; resume any earlier partial download.

    The sha256 checked is `expected_sha256` (the registry's) if given, else the one the Hub
    reports for the file (its LFS ETag). A resumed partial file has its last `tail_check`
    bytes downloaded again and compared first. `token` defaults to huggingface_hub's (HF_TOKEN, or
    the saved login). Raises ModelError saying what went wrong and what to do.
    """
    what = f"{repo}/{filename}"
    fix_offline = (
        f"Download it on a machine with access to the Hub (`genstruct-server models download` or "
        f"`hf download {repo} {filename}`) and copy it to {dest}"
    )
    if is_offline():
        raise ModelError(
            f"cannot download {what}: offline mode is on (HF_HUB_OFFLINE=1) and {dest} is not "
            f"there. {fix_offline}, or unset HF_HUB_OFFLINE."
        )
    if expected_size is not None:
        # Fail fast on the registry's size, before any request; checked again below with the
        # Hub's exact size and whatever a previous attempt already downloaded.
        have = 0
        if expected_sha256:
            known_part = partial_path(dest, expected_sha256)
            have = known_part.stat().st_size if known_part.exists() else 0
        check_disk_space(dest.parent, max(expected_size - have, 0), what=what)
    endpoint = hub_endpoint()
    url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)

    def head() -> HfFileMetadata:
        return _head(url, token=token, endpoint=endpoint, what=what, revision=revision,
                     fix_offline=fix_offline)  # fmt: skip

    meta = head()
    etag = meta.etag or ""
    hub_sha256 = etag if _SHA256.fullmatch(etag) else None
    if expected_sha256 and hub_sha256 and hub_sha256 != expected_sha256:
        raise ModelError(
            f"the Hub's {what} (revision {revision}) has sha256 {hub_sha256}, but the registry "
            f"expects {expected_sha256}: the file was replaced upstream. Pin the registry "
            "entry to the old revision, or update its sha256 after checking the new file."
        )
    want_sha256 = expected_sha256 or hub_sha256
    want_sha1 = etag if want_sha256 is None and _SHA1.fullmatch(etag) else None
    if want_sha256 is None and want_sha1 is None:
        raise ModelError(
            f"cannot verify {what}: the registry has no sha256 for it and the Hub reported no "
            f"checksum (ETag {etag!r}). Is HF_ENDPOINT ({endpoint}) a Hugging Face Hub?"
        )
    size = meta.size or expected_size
    part = partial_path(dest, want_sha256 or etag)
    part.parent.mkdir(parents=True, exist_ok=True)
    # Two processes appending to one partial file would corrupt it: one downloads, the other
    # waits for it and then finds the file in place.
    with FileLock(part.with_name(part.name + ".lock")):
        done = dest.is_file() and integrity.recorded_sha256(dest, dest.parent) == want_sha256
        if want_sha256 is not None and done:
            logger.info("%s was downloaded meanwhile by another process", what)
            return DownloadResult(dest, want_sha256, dest.stat().st_size, meta.commit_hash)
        have = part.stat().st_size if part.exists() else 0
        if size is not None:
            check_disk_space(dest.parent, max(size - have, 0), what=what)
        return _fetch_and_install(
            meta,
            head,
            url,
            part,
            dest,
            size=size,
            token=token,
            want_sha256=want_sha256,
            want_sha1=want_sha1,
            what=what,
            max_attempts=max_attempts,
            retry_wait=retry_wait,
            progress=progress,
            tail_check=tail_check,
        )


def hub_sha256(repo: str, filename: str, *, revision: str = "main") -> str:
    """The sha256 the Hub reports for `repo`/`filename` at `revision` (its LFS ETag)."""
    what = f"{repo}/{filename}"
    endpoint = hub_endpoint()
    url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
    meta = _head(url, token=None, endpoint=endpoint, what=what, revision=revision,
                 fix_offline=f"copy a verified {filename} here")  # fmt: skip
    etag = meta.etag or ""
    if not _SHA256.fullmatch(etag):
        raise ModelError(
            f"the Hub reports no sha256 for {what} (ETag {etag!r}): it is not an LFS file."
        )
    return etag


def _fetch_and_install(
    meta: HfFileMetadata,
    head: Callable[[], HfFileMetadata],
    url: str,
    part: Path,
    dest: Path,
    *,
    size: int | None,
    token: str | bool | None,
    want_sha256: str | None,
    want_sha1: str | None,
    what: str,
    max_attempts: int,
    retry_wait: float,
    progress: bool,
    tail_check: int,
) -> DownloadResult:
    """Transfer into `part`, verify it, and only then move it to `dest`."""

    def locate(fresh: bool) -> tuple[str, dict[str, str]]:
        """The URL to GET and its headers; `fresh` asks the Hub again (signed URLs expire)."""
        location = head().location if fresh else meta.location
        # The Hub redirects LFS files to a CDN; the token must not leave the Hub's own hosts.
        headers = {"Accept-Encoding": "identity"}
        secret = _token(token)
        if secret and _origin(location) == _origin(url):
            headers["Authorization"] = f"Bearer {secret}"
        return location, headers

    _transfer(
        locate,
        part,
        size=size,
        what=what,
        max_attempts=max_attempts,
        retry_wait=retry_wait,
        progress=progress,
        tail_check=tail_check,
    )

    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink(missing_ok=True)
        raise ModelError(
            f"download of {what} ended at {got} bytes, expected {size}; the partial file was "
            "deleted. Run the download again."
        )
    logger.info("verifying %s", what)
    if want_sha256 is not None:
        actual = integrity.sha256_file(part)
        ok = actual == want_sha256
        expected, kind = want_sha256, "sha256"
    else:
        actual = integrity.git_blob_sha1(part)
        ok = actual == want_sha1
        expected, kind = str(want_sha1), "git sha1"
    if not ok:
        part.unlink(missing_ok=True)
        raise ModelError(
            f"checksum mismatch for {what}: {kind} of the downloaded file is {actual}, expected "
            f"{expected}. The corrupt download was deleted and nothing was installed at {dest}. "
            "Run the download again; if it keeps failing, the file on the Hub differs from the "
            "registry's."
        )
    if dest.suffix == ".gguf":
        try:
            read_gguf(part)
        except ModelError:
            part.unlink(missing_ok=True)
            raise
    # on the disk before the rename, and the rename before the mark that trusts the file
    integrity.fsync_file(part)
    os.replace(part, dest)
    integrity.fsync_dir(dest.parent)
    sha256 = want_sha256 if want_sha256 is not None else integrity.sha256_file(dest)
    integrity.record_verified(dest, sha256, dest.parent)
    logger.info("downloaded %s to %s (%s, sha256 %s)", what, dest, _gb(got), sha256)
    return DownloadResult(path=dest, sha256=sha256, size=got, commit=meta.commit_hash)


def _token(token: str | bool | None) -> str | None:
    """The token to send: the one given, else HF_TOKEN or the saved login (as huggingface_hub)."""
    if isinstance(token, str):
        return token
    if token is False or (token is None and constants.HF_HUB_DISABLE_IMPLICIT_TOKEN):
        return None
    return get_token()


def _head(
    url: str,
    *,
    token: str | bool | None,
    endpoint: str,
    what: str,
    revision: str,
    fix_offline: str,
) -> HfFileMetadata:
    """HEAD the file on the Hub; translate every failure into a ModelError that says what to do."""
    try:
        return get_hf_file_metadata(url, token=token, endpoint=endpoint)
    except OfflineModeIsEnabled as exc:
        raise ModelError(f"cannot download {what}: offline mode is on. {fix_offline}.") from exc
    except GatedRepoError as exc:
        raise ModelError(
            f"{repo_of(what)} is a gated repository: accept its terms on the Hub page, then set "
            "HF_TOKEN to a token of that account (or run `hf auth login`)."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelError(
            f"repository {repo_of(what)} not found on {endpoint} "
            f"(HTTP {exc.response.status_code}): check the name; if it is private or gated, "
            "set HF_TOKEN to a token that can read it."
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelError(
            f"revision {revision!r} of {repo_of(what)} not found on {endpoint} (HTTP 404)."
        ) from exc
    except RemoteEntryNotFoundError as exc:
        raise ModelError(
            f"{what} not found on {endpoint} (HTTP 404) at revision {revision!r}: check the "
            "file name (the repository's file list is on its Hub page)."
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code
        if status in (401, 403):
            hint = "set HF_TOKEN to a token that can read this repository"
        else:
            hint = "the Hub may be down; try again later"
        raise ModelError(f"cannot download {what}: HTTP {status} from {endpoint}; {hint}.") from exc
    except (httpx2.TransportError, OSError) as exc:
        raise ModelError(
            f"cannot reach the Hugging Face Hub at {endpoint} to download {what} ({exc}). "
            f"Check the network or proxy, or {fix_offline[0].lower()}{fix_offline[1:]}."
        ) from exc


def repo_of(what: str) -> str:
    return "/".join(what.split("/")[:2])


# Statuses a signed CDN URL answers once it has expired: ask the Hub for a new one.
_EXPIRED_LINK = frozenset({401, 403, 410})


def _transfer(
    locate: Callable[[bool], tuple[str, dict[str, str]]],
    part: Path,
    *,
    size: int | None,
    what: str,
    max_attempts: int,
    retry_wait: float,
    progress: bool,
    tail_check: int,
) -> None:
    """GET the file into `part`, resuming from its current length, for at most `max_attempts`
    tries; `locate(fresh)` gives the URL (fresh: asked of the Hub again) and its headers."""
    have = part.stat().st_size if part.exists() else 0
    last_error: Exception | None = None
    fresh = False
    bar_options = {"unit": "B", "unit_scale": True, "unit_divisor": 1024}
    # tqdm ships no type hints.
    with hf_tqdm(  # type: ignore[no-untyped-call]
        total=size, initial=have, desc=Path(what).name, disable=not progress, **bar_options
    ) as bar:
        for attempt in range(1, max_attempts + 1):
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have >= size:
                if have > size:  # not ours to extend: start over
                    part.unlink()
                    bar.reset(total=size)
                    continue
                return
            location, headers = locate(fresh)
            fresh = False
            try:
                start = max(have - tail_check, 0)
                _get_once(location, part, start=start, have=have, headers=headers, bar=bar,
                          what=what, size=size)  # fmt: skip
                if size is None or part.stat().st_size >= size:
                    return
                last_error = None
            except httpx2.TransportError as exc:
                last_error = exc
            except HfHubHTTPError as exc:
                status = exc.response.status_code
                if status == 416:  # our partial file doesn't fit: restart
                    part.unlink(missing_ok=True)
                    bar.reset(total=size)
                    last_error = exc
                elif status in _EXPIRED_LINK and attempt < max_attempts:
                    logger.info("the download link of %s was refused (HTTP %d); asking the Hub "
                                "for a new one", what, status)  # fmt: skip
                    fresh, last_error = True, exc
                    continue
                else:
                    kept = part.stat().st_size if part.exists() else 0
                    raise ModelError(
                        f"download of {what} failed: HTTP {status}, even with a new download "
                        f"link from the Hub. {kept} bytes are kept in {part}; run the same "
                        "command again to resume where it stopped."
                    ) from exc
            logger.warning(
                "download of %s interrupted at %s of %s bytes (attempt %d of %d): %s",
                what,
                part.stat().st_size if part.exists() else 0,
                size,
                attempt,
                max_attempts,
                last_error or "connection closed early",
            )
            if attempt < max_attempts and retry_wait > 0:
                time.sleep(min(retry_wait * attempt, 30.0))
    have = part.stat().st_size if part.exists() else 0
    raise ModelError(
        f"download of {what} was interrupted {max_attempts} times ({have} of {size} bytes "
        f"kept in {part}); run the same command again to resume where it stopped"
        + (f" (last error: {last_error})" if last_error else "")
        + "."
    )


def _get_once(
    url: str, part: Path, *, start: int, have: int, headers: dict[str, str], bar: hf_tqdm,
    what: str, size: int | None,
) -> None:  # fmt: skip
    """One GET into `part` of the bytes from `start`. A resume starts before the `have` bytes
    kept and compares the overlap with the file's tail; from the first byte that differs, the
    file is rewritten with what arrives."""
    if have:
        headers = {**headers, "Range": f"bytes={start}-"}
        logger.info("resuming %s at %s of %s (checking the %s bytes before)", what, have, size,
                    have - start)  # fmt: skip
    with get_session().stream(
        "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
    ) as response:
        hf_raise_for_status(response)
        if have and response.status_code != 206:
            # The server ignored the Range header: rewrite the file from the start.
            logger.info("server ignored the Range request; restarting the download")
            start = have = 0
            bar.reset(total=bar.total)
        elif have:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {start}-"):
                raise httpx2.RemoteProtocolError(
                    f"unexpected Content-Range {content_range!r} for a resume at byte {start}"
                )
        with part.open("r+b" if have else "wb") as fh:
            fh.seek(start)
            writer = _TailChecked(fh, start, have, what=what, size=size, bar=bar)
            for chunk in response.iter_bytes():
                writer.write(chunk)


class _TailChecked:
    """Writes a download into its partial file at `start`, first comparing what arrives with
    the bytes the file already has up to `have`; at the first difference the file is cut
    there and the rest is written over it."""

    def __init__(
        self, fh: BinaryIO, start: int, have: int, *, what: str, size: int | None, bar: hf_tqdm
    ) -> None:
        self._fh, self._pos, self._have = fh, start, have
        self._what, self._size, self._bar = what, size, bar

    def write(self, chunk: bytes) -> None:
        if self._pos < self._have:
            ours = self._fh.read(min(len(chunk), self._have - self._pos))
            same = _common_prefix(ours, chunk)
            self._pos += same
            chunk = chunk[same:]
            if not chunk:
                return
            if self._pos < self._have:
                logger.warning(
                    "the partial download of %s differs from the Hub's file at byte %d of the "
                    "%d kept (an unfinished write?); downloading again from there",
                    self._what, self._pos, self._have,
                )  # fmt: skip
                self._bar.update(self._pos - self._have)
                self._have = self._pos
            self._fh.seek(self._pos)
            self._fh.truncate()
        try:
            self._fh.write(chunk)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full(self._what, self._pos, self._size, self._fh.name) from exc
            raise
        self._pos += len(chunk)
        self._bar.update(len(chunk))


def _common_prefix(a: bytes, b: bytes) -> int:
    """How many leading bytes `a` and `b` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low


def _disk_full(what: str, written: int, size: int | None, part: object) -> ModelError:
    folder = Path(str(part)).parent
    free = free_bytes(folder)
    need = f"; {_gb(size - written)} more are needed" if size is not None else ""
    return ModelError(
        f"the disk filled up while downloading {what}: {_gb(written)} of "
        f"{_gb(size) if size is not None else '?'} are in {part}{need} and {folder} has "
        f"{_gb(free)} free. Free that much space (or point GENSTRUCT_MODELS_DIR at a bigger "
        "disk) and run the same command again: it resumes where it stopped."
    )
