"""Downloads against a fake Hub on 127.0.0.1: success, resume, checksums, and every failure."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from genstruct_service.errors import ModelError
from genstruct_service.model_files import download, integrity
from genstruct_service.model_files.download import download_file, partial_path
from model_files_helpers import FakeHub, make_gguf

REPO = "TestOrg/Genstruct-7B-GGUF"
FILE = "Genstruct-7B.Q4_K_M.gguf"
TAIL = 4096  # bytes of a partial file downloaded again and compared before resuming it


@pytest.fixture
def content() -> bytes:
    return make_gguf(n_floats=64 * 1024)  # 256 KiB of tensor data


def _hosted_with_partial(hub: FakeHub, models: Path, content: bytes) -> Path:
    """Put `content` on the Hub; the path of its partial download (folder made, no file)."""
    part = partial_path(models / FILE, hub.add(REPO, FILE, content))
    part.parent.mkdir(parents=True)
    return part


def _download(models: Path, **kwargs: object) -> download.DownloadResult:
    options: dict[str, object] = {"retry_wait": 0, "progress": False, "tail_check": TAIL}
    options.update(kwargs)
    return download_file(REPO, FILE, models / FILE, **options)  # type: ignore[arg-type]


def test_download_succeeds_and_is_verified(
    fake_hub: FakeHub, tmp_path: Path, content: bytes
) -> None:
    sha = fake_hub.add(REPO, FILE, content)
    result = _download(tmp_path)
    assert result.path == tmp_path / FILE
    assert result.path.read_bytes() == content
    assert result.sha256 == sha and result.size == len(content)
    assert result.commit is not None
    head = fake_hub.requests[0]
    assert (head.server, head.method, head.path) == ("hub", "HEAD", f"/{REPO}/resolve/main/{FILE}")
    assert [r.path.split("?")[0] for r in fake_hub.gets()] == [f"/blobs/{sha}"]
    assert "range" not in fake_hub.gets()[0].headers
    # Verified once: a restart needn't hash it again.
    assert integrity.recorded_sha256(result.path, tmp_path) == sha
    assert not list((tmp_path / ".cache" / "downloads").glob("*.part"))


def test_token_goes_to_the_hub_but_not_to_the_cdn(
    fake_hub: FakeHub, tmp_path: Path, content: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.add(REPO, FILE, content)
    fake_hub.gated[REPO] = "hf_secret"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    _download(tmp_path)
    assert fake_hub.requests[0].headers.get("authorization") == "Bearer hf_secret"
    assert "authorization" not in fake_hub.gets()[0].headers


def test_cut_connection_is_resumed_with_a_range_request(
    fake_hub: FakeHub, tmp_path: Path, content: bytes
) -> None:
    fake_hub.add(REPO, FILE, content)
    fake_hub.cut_next_gets = 1
    result = _download(tmp_path)
    first, second = fake_hub.gets()
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={len(content) // 2 - TAIL}-"
    assert result.path.read_bytes() == content


def test_interrupted_download_is_kept_and_resumed_by_the_next_call(
    fake_hub: FakeHub, tmp_path: Path, content: bytes
) -> None:
    sha = fake_hub.add(REPO, FILE, content)
    fake_hub.cut_next_gets = 1
    with pytest.raises(ModelError, match="run the same command again to resume"):
        _download(tmp_path, max_attempts=1)
    assert not (tmp_path / FILE).exists()  # a partial file never takes the final name
    part = partial_path(tmp_path / FILE, sha)
    assert part.stat().st_size == len(content) // 2

    result = _download(tmp_path)
    assert fake_hub.gets()[-1].headers["range"] == f"bytes={len(content) // 2 - TAIL}-"
    assert result.path.read_bytes() == content
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(
    fake_hub: FakeHub, tmp_path: Path, content: bytes
) -> None:
    fake_hub.add(REPO, FILE, content)
    fake_hub.cut_next_gets = 1
    fake_hub.ignore_range = True
    result = _download(tmp_path)
    assert "range" in fake_hub.gets()[1].headers
    assert result.path.read_bytes() == content


def test_corrupt_transfer_is_refused_and_removed(
    fake_hub: FakeHub, tmp_path: Path, content: bytes
) -> None:
    sha = fake_hub.add(REPO, FILE, content)
    fake_hub.corrupt_body = True
    with pytest.raises(ModelError, match=f"checksum mismatch.*expected {sha}"):
        _download(tmp_path)
    assert not (tmp_path / FILE).exists()
    assert not partial_path(tmp_path / FILE, sha).exists()


def test_registry_checksum_differing_from_the_hub_s_is_refused_before_downloading(
    fake_hub: FakeHub, tmp_path: Path, content: bytes
) -> None:
    fake_hub.add(REPO, FILE, content)
    with pytest.raises(ModelError, match="replaced upstream"):
        _download(tmp_path, expected_sha256="0" * 64)
    assert fake_hub.gets() == []
    assert not (tmp_path / FILE).exists()


def test_registry_checksum_is_checked_even_if_the_hub_agrees_with_the_bytes(
    fake_hub: FakeHub, tmp_path: Path, content: bytes
) -> None:
    # The Hub reports whatever it reports; the registry's sha256 is what must match.
    fake_hub.add(REPO, FILE, content)
    fake_hub.etag_override = "f" * 64
    expected = hashlib.sha256(content).hexdigest()
    with pytest.raises(ModelError, match="replaced upstream"):
        _download(tmp_path, expected_sha256=expected)


def test_missing_file_is_a_404_error(fake_hub: FakeHub, tmp_path: Path, content: bytes) -> None:
    fake_hub.add(REPO, "other.gguf", content)
    with pytest.raises(ModelError, match=r"not found on .* \(HTTP 404\).*check the file name"):
        _download(tmp_path)


def test_missing_repository_says_check_the_name_or_set_hf_token(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    with pytest.raises(
        ModelError, match=r"repository TestOrg/Genstruct-7B-GGUF not found.*HF_TOKEN"
    ):
        _download(tmp_path)


def test_gated_repository_says_set_hf_token(
    fake_hub: FakeHub, tmp_path: Path, content: bytes
) -> None:
    fake_hub.add(REPO, FILE, content)
    fake_hub.gated[REPO] = "hf_secret"
    with pytest.raises(ModelError, match=r"gated repository.*set HF_TOKEN"):
        _download(tmp_path)
    assert fake_hub.gets() == []


def test_offline_mode_makes_no_request(
    fake_hub: FakeHub, tmp_path: Path, content: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.add(REPO, FILE, content)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\).*copy it to"):
        _download(tmp_path)
    assert fake_hub.requests == []


def test_unreachable_endpoint_says_what_to_do(refused_endpoint: str, tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        _download(tmp_path)
    message = str(err.value)
    assert f"cannot reach the Hugging Face Hub at {refused_endpoint}" in message
    assert "copy it to" in message


def test_disk_full_is_refused_before_downloading(
    fake_hub: FakeHub, tmp_path: Path, content: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.add(REPO, FILE, content)
    monkeypatch.setattr(download, "free_bytes", lambda folder: 1000)
    with pytest.raises(ModelError, match=r"not enough free disk space.*GENSTRUCT_MODELS_DIR"):
        _download(tmp_path)
    assert fake_hub.gets() == []


def test_a_downloaded_non_gguf_never_takes_the_final_name(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    fake_hub.add(REPO, FILE, b"<!DOCTYPE html><html>login</html>")
    with pytest.raises(ModelError, match="not a GGUF model file"):
        _download(tmp_path)
    assert not (tmp_path / FILE).exists()


def test_disk_full_is_known_from_the_registry_size_before_any_request(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "free_bytes", lambda folder: 10**9)
    with pytest.raises(ModelError, match=r"needs 4\.37 GB and .* has 1\.00 GB free"):
        _download(tmp_path, expected_size=4_370_000_000)
    assert fake_hub.requests == []


def test_an_expired_download_link_is_replaced_by_a_fresh_one_from_the_hub(
    fake_hub: FakeHub, tmp_path: Path, content: bytes
) -> None:
    fake_hub.add(REPO, FILE, content)
    fake_hub.cut_next_gets = 1
    fake_hub.expire_cut_links = True  # the link of the cut GET answers 403 from then on
    result = _download(tmp_path)
    assert result.path.read_bytes() == content
    heads = [r for r in fake_hub.requests if r.server == "hub"]
    first, second = fake_hub.gets()[0], fake_hub.gets()[-1]
    assert len(heads) == 2 and first.path != second.path  # asked again, for a new signature
    assert second.headers["range"] == f"bytes={len(content) // 2 - TAIL}-"


def test_a_garbage_tail_of_a_partial_file_is_found_and_downloaded_again(
    fake_hub: FakeHub, tmp_path: Path, content: bytes
) -> None:
    part = _hosted_with_partial(fake_hub, tmp_path, content)
    kept = len(content) // 2
    # the last 1000 bytes kept were allocated but never written (a power loss)
    part.write_bytes(content[: kept - 1000] + bytes(1000))
    result = _download(tmp_path)
    assert result.path.read_bytes() == content
    (only,) = fake_hub.gets()  # resumed, not restarted: one GET, from just before the tail
    assert only.headers["range"] == f"bytes={kept - TAIL}-"


def test_a_partial_file_whose_tail_matches_is_resumed_as_it_is(
    fake_hub: FakeHub, tmp_path: Path, content: bytes
) -> None:
    part = _hosted_with_partial(fake_hub, tmp_path, content)
    part.write_bytes(content[:1000])  # shorter than the check: compared from byte 0
    result = _download(tmp_path)
    assert result.path.read_bytes() == content
    assert fake_hub.gets()[0].headers["range"] == "bytes=0-"


def test_a_disk_that_fills_during_the_download_says_so_with_the_sizes(
    fake_hub: FakeHub, tmp_path: Path, content: bytes
) -> None:
    part = _hosted_with_partial(fake_hub, tmp_path, content)
    part.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    with pytest.raises(ModelError) as err:
        _download(tmp_path)
    message = str(err.value)
    assert "the disk filled up while downloading" in message
    assert f"{len(content) / 1e9:.2f} GB" in message and "GENSTRUCT_MODELS_DIR" in message
    assert "resumes where it stopped" in message


def test_the_download_is_on_the_disk_before_it_takes_its_name(
    fake_hub: FakeHub, tmp_path: Path, content: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # issue 34: no fsync of the partial file before the rename, nor of the folder after it
    fake_hub.add(REPO, FILE, content)
    events: list[str] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        fsync(fd)

    def recording_replace(src: str | Path, dst: str | Path) -> None:
        events.append(f"replace {Path(src).name} -> {Path(dst)}")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    _download(tmp_path)
    installed = events.index(next(e for e in events if e.endswith(f"-> {tmp_path / FILE}")))
    assert events[installed - 1].startswith("fsync ") and events[installed - 1].endswith(".part")
    assert events[installed + 1] == f"fsync {tmp_path}"


def test_a_verified_file_whose_bytes_were_lost_is_hashed_again(tmp_path: Path) -> None:
    # a power loss can leave zeros where the bytes were, with the size, mtime and inode kept
    model = tmp_path / "model.gguf"
    model.write_bytes(bytes(range(256)) * 8192)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    integrity.record_verified(model, sha, tmp_path)
    assert integrity.recorded_sha256(model, tmp_path) == sha
    stat = model.stat()
    with model.open("r+b") as fh:
        fh.seek(stat.st_size - 4096)
        fh.write(bytes(4096))
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert integrity.recorded_sha256(model, tmp_path) is None
    with pytest.raises(ModelError, match="checksum mismatch"):
        integrity.verify_sha256(model, sha, tmp_path, what="a test model")
