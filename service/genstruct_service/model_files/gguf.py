"""GGUF header check: refuse files llama.cpp would crash on or misread, before it sees them."""

from __future__ import annotations

import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from genstruct_service.errors import ModelError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Generous upper bounds: real models have a few thousand tensors and a few dozen keys.
# Anything beyond is a corrupt or hostile header, not a model.
MAX_TENSORS = 1 << 20
MAX_METADATA = 1 << 16
MAX_DIMS = 8

# gguf value types -> fixed byte width (8 = string and 9 = array are variable).
_SCALAR_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALAR_FORMAT = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9

# ggml tensor types -> (elements per block, bytes per block), from ggml's type traits.
# Used to compute where the tensor data ends, which catches truncated downloads cheaply.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}

# llama.cpp's llama_ftype (the `general.file_type` key) -> the quantisation's usual name.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}  # fmt: skip



def quantization_name(file_type: int) -> str:
    """The usual name of a `general.file_type` value, e.g. 15 -> "Q4_K_M"."""
    return FILE_TYPES.get(file_type, f"file_type {file_type}")


_WANTED_KEYS = ("general.architecture", "general.name", "general.file_type", "general.alignment")


@dataclass(frozen=True)
class GGUFInfo:
    """What the header says about a GGUF file that passed the check."""

    path: Path
    size: int
    version: int
    tensor_count: int
    metadata_count: int
    architecture: str | None
    name: str | None
    file_type: int | None
    data_end: int | None  # byte offset where the last tensor ends; None for unknown types

    @property
    def quantization(self) -> str | None:
        """The quantisation name (e.g. "Q4_K_M") from `general.file_type`, if known."""
        return None if self.file_type is None else quantization_name(self.file_type)


class _Truncated(Exception):
    """Raised by the reader when the header runs past the end of the file."""


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        self.pos += n

    def u32(self) -> int:
        value: int = struct.unpack("<I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack("<Q", self.take(8))[0]
        return value

    def string(self) -> bytes:
        return self.take(self.u64())

    def skip_string(self) -> None:
        self.skip(self.u64())

    def value(self, vtype: int, *, keep: bool) -> object:
        if vtype in _SCALAR_WIDTH:
            raw = self.take(_SCALAR_WIDTH[vtype])
            return struct.unpack(_SCALAR_FORMAT[vtype], raw)[0] if keep else None
        if vtype == _STRING:
            if keep:
                return self.string().decode("utf-8", errors="replace")
            self.skip_string()
            return None
        if vtype == _ARRAY:
            etype, count = self.u32(), self.u64()
            if etype in _SCALAR_WIDTH:
                self.skip(count * _SCALAR_WIDTH[etype])
            elif etype == _STRING:
                # Each string needs at least its 8-byte length: bound the loop by the file size.
                if count * 8 > self.size - self.pos:
                    raise _Truncated
                for _ in range(count):
                    self.skip_string()
            else:
                raise ValueError(f"unsupported array element type {etype}")
            return None
        raise ValueError(f"unknown metadata value type {vtype}")


def _describe_wrong_magic(head: bytes) -> str:
    """Say what a non-GGUF file most likely is, from its first bytes."""
    text = head.lstrip()
    if text.startswith(b"version https://git-lfs"):
        return (
            "it is a Git LFS pointer (a small text file), not the model: the weights were never "
            "downloaded. Run `git lfs pull`, or fetch it with `genstruct-server models download`"
        )
    if text[:15].lower().startswith((b"<!doctype", b"<html")):
        return "it is an HTML page (an error or login page saved in place of the model)"
    if head[:4] in (b"lmgg", b"fmgg", b"tjgg", b"ggml", b"ggjt"):
        return "it is an old GGML/GGJT model; convert it to GGUF with llama.cpp's tools"
    if head[:4] == b"FUGG":
        return "it has a byte-swapped GGUF magic (big-endian file), which this build cannot read"
    if head[:1] == b"{":
        return "it looks like a JSON text file"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "it is a text file"
    return f"its first bytes are {head[:8]!r}"


def read_gguf(path: Path) -> GGUFInfo:
    """Check that `path` is a complete, plausible GGUF file; raise ModelError saying why not."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelError(f"model file not found: {path}") from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not a .gguf model file")
    if size == 0:
        raise ModelError(
            f"{path} is empty (0 bytes): an interrupted download or copy. Delete it and "
            "download it again."
        )
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
            if size < 4 and GGUF_MAGIC.startswith(head):
                raise ModelError(
                    f"{path} is truncated ({size} bytes): an interrupted download or copy. "
                    "Delete it and download it again."
                )
            if head[:4] != GGUF_MAGIC:
                raise ModelError(f"{path} is not a GGUF model file: {_describe_wrong_magic(head)}.")
            if size < 24:
                raise ModelError(
                    f"{path} is truncated ({size} bytes): too short for a GGUF header. Delete "
                    "it and download it again."
                )
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, size)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc


def _parse(path: Path, buf: mmap.mmap, size: int) -> GGUFInfo:
    reader = _Reader(buf, size)
    reader.skip(4)
    version = reader.u32()
    if version == 1:
        raise ModelError(
            f"{path} is GGUF version 1, which llama.cpp no longer loads; use a newer conversion."
        )
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise ModelError(
            f"{path} has an unsupported GGUF version {version}{hint}; expected one of "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}."
        )
    tensor_count, metadata_count = reader.u64(), reader.u64()
    if not 0 < tensor_count <= MAX_TENSORS or metadata_count > MAX_METADATA:
        raise ModelError(
            f"{path} has an implausible GGUF header ({tensor_count} tensors, "
            f"{metadata_count} metadata keys): the file is corrupt."
        )

    found: dict[str, object] = {}
    try:
        for _ in range(metadata_count):
            key = reader.string().decode("utf-8", errors="replace")
            vtype = reader.u32()
            value = reader.value(vtype, keep=key in _WANTED_KEYS)
            if key in _WANTED_KEYS:
                found[key] = value
        data_end = _tensor_data_end(reader, tensor_count, found)
    except _Truncated:
        raise ModelError(
            f"{path} is truncated: its GGUF header runs past the end of the file ({size} "
            "bytes). The download or copy was interrupted; delete it and download it again."
        ) from None
    except ValueError as exc:
        raise ModelError(f"{path} has a corrupt GGUF header: {exc}.") from None

    if data_end is not None and data_end > size:
        raise ModelError(
            f"{path} is truncated: its tensors need {data_end} bytes but the file has {size} "
            f"({size / data_end:.1%}). The download or copy was interrupted; delete it and "
            "download it again."
        )
    file_type = found.get("general.file_type")
    arch = found.get("general.architecture")
    name = found.get("general.name")
    info = GGUFInfo(
        path=path,
        size=size,
        version=version,
        tensor_count=tensor_count,
        metadata_count=metadata_count,
        architecture=arch if isinstance(arch, str) else None,
        name=name if isinstance(name, str) else None,
        file_type=file_type if isinstance(file_type, int) else None,
        data_end=data_end,
    )
    logger.debug("GGUF header ok: %s", info)
    return info


def _tensor_data_end(reader: _Reader, tensor_count: int, found: dict[str, object]) -> int | None:
    """Read the tensor infos; return the byte offset where the tensor data ends."""
    extent = 0
    known = True
    for _ in range(tensor_count):
        reader.skip_string()
        n_dims = reader.u32()
        if not 0 < n_dims <= MAX_DIMS:
            raise ValueError(f"a tensor has {n_dims} dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= reader.u64()
        ggml_type = reader.u32()
        offset = reader.u64()
        block = GGML_BLOCKS.get(ggml_type)
        if block is None:
            known = False  # a type newer than this table: skip the size check, don't refuse
            continue
        per_block, block_bytes = block
        extent = max(extent, offset + -(-elements // per_block) * block_bytes)
    alignment = found.get("general.alignment")
    align = alignment if isinstance(alignment, int) and alignment > 0 else DEFAULT_ALIGNMENT
    data_start = -(-reader.pos // align) * align
    return data_start + extent if known else None
