"""Checksums of model files, and a record of files already verified so a restart needn't re-hash."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from genstruct_service.errors import ModelError

logger = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024
CACHE_DIR = ".cache"
TAIL_BYTES = 1024 * 1024  # hashed on every load: a file zeroed by a power loss keeps its stamp


def fsync_file(path: Path) -> None:
    """Flush a file's bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk, where the system allows."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows opens no folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder
    finally:
        os.close(fd)


def tail_sha256(path: Path) -> str:
    """The sha256 of a file's last TAIL_BYTES: cheap enough to check at every load."""
    with Path(path).open("rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - TAIL_BYTES))
        return hashlib.sha256(fh.read()).hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file: the Hub's ETag for files not stored in LFS."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(b"blob %d\0" % Path(path).stat().st_size)
    with Path(path).open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _marker(path: Path, models_dir: Path) -> Path:
    # Keyed by the absolute path, so files outside models_dir (a packaged model) work too.
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    return models_dir / CACHE_DIR / "verified" / f"{path.name}.{key}.json"


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def recorded_sha256(path: Path, models_dir: Path) -> str | None:
    """The sha256 recorded when `path` was last verified, if the file has not changed since:
    the same size, mtime and inode, and the same last bytes (a file that lost its data in a
    power loss, zeros where the bytes were, keeps the first three)."""
    marker = _marker(path, models_dir)
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        if (
            record.get("stamp") == _stamp(path)
            and isinstance(record.get("sha256"), str)
            and record.get("tail_sha256") == tail_sha256(path)
        ):
            return str(record["sha256"])
    except (OSError, ValueError):
        pass
    return None


def record_verified(path: Path, sha256: str, models_dir: Path) -> None:
    """Remember that `path` hashed to `sha256` (best effort: a read-only folder just re-hashes)."""
    marker = _marker(path, models_dir)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(f".tmp{os.getpid()}")
        record = {"path": str(path.resolve()), "sha256": sha256, "stamp": _stamp(path),
                  "tail_sha256": tail_sha256(path)}
        tmp.write_text(json.dumps(record), encoding="utf-8")
        fsync_file(tmp)
        os.replace(tmp, marker)
        fsync_dir(marker.parent)
    except OSError as exc:
        logger.debug("cannot record verification of %s: %s", path, exc)


def verify_sha256(path: Path, expected: str, models_dir: Path, *, what: str) -> None:
    """Raise ModelError unless `path` hashes to `expected`; remembers success."""
    if recorded_sha256(path, models_dir) == expected:
        logger.debug("%s: already verified (sha256 %s)", path, expected)
        return
    logger.info("verifying sha256 of %s (%s)", path, what)
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(
            f"checksum mismatch for {path} ({what}): sha256 is {actual}, expected {expected}. "
            "The file is corrupt, incomplete or a different build; delete it and download it "
            "again."
        )
    record_verified(path, actual, models_dir)
