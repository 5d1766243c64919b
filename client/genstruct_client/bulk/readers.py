"""Input readers: JSONL, CSV, Parquet, Arrow and Hugging Face `datasets` folders, as rows."""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genstruct_client.bulk.errors import UsageError

INPUT_FORMATS = ("jsonl", "csv", "parquet", "arrow", "hf")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
}


@dataclass(frozen=True, slots=True)
class Row:
    """One input record; `error` says why it could not be read (then `values` is empty)."""

    number: int  # 1-based: the line of a JSONL file, the record of the others
    values: dict[str, Any]
    error: str | None = None


def detect_input_format(path: Path) -> str:
    """The format from the path: a folder is a `datasets` folder, else the suffix decides."""
    if path.is_dir():
        return "hf"
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"cannot tell the format of {path} from its suffix; use --input-format "
            f"({', '.join(INPUT_FORMATS)})"
        )
    return fmt


def read_rows(path: Path, fmt: str | None = None, split: str | None = None) -> Iterator[Row]:
    """Every record of the input, lazily, in order."""
    fmt = fmt or detect_input_format(path)
    if not path.exists():
        raise UsageError(f"input {path} does not exist")
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt == "csv":
        return _read_csv(path)
    if fmt == "parquet":
        return _read_parquet(path)
    if fmt == "arrow":
        return _read_arrow_files([path])
    if fmt == "hf":
        return _read_arrow_files(datasets_folder_files(path, split))
    raise UsageError(f"unknown input format {fmt!r}; use one of {', '.join(INPUT_FORMATS)}")


def count_rows(path: Path, fmt: str | None = None, split: str | None = None) -> int | None:
    """How many records the input holds (for the progress bar); None if unknown."""
    fmt = fmt or detect_input_format(path)
    if fmt == "jsonl":
        with path.open("rb") as file:
            return sum(1 for line in file if line.strip())
    if fmt == "parquet":
        return int(_pyarrow_parquet().ParquetFile(path).metadata.num_rows)
    if fmt in ("arrow", "hf"):
        files = [path] if fmt == "arrow" else datasets_folder_files(path, split)
        return int(sum(batch.num_rows for file in files for batch in _arrow_batches(file)))
    return None


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                values = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield Row(number, {}, f"line {number} is not valid JSON: {exc}")
                continue
            except RecursionError:
                yield Row(number, {}, f"line {number} nests JSON too deeply to be read")
                continue
            if not isinstance(values, dict):
                yield Row(number, {}, f"line {number} is not a JSON object")
                continue
            if not _encodable(values):
                yield Row(
                    number, {}, f"line {number} holds a lone surrogate (such as \\ud800), "
                    "which is not text in UTF-8"
                )
                continue
            yield Row(number, values)


def _encodable(values: dict[str, Any]) -> bool:
    """Whether every string of a JSON object (keys too) can be written as UTF-8: JSON's
    escapes can spell lone surrogates, which every later step (ids, protobuf, the output)
    would refuse, some after the server has done the work."""
    try:
        json.dumps(values, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


# what the surrogateescape error handler makes of a byte that is not UTF-8
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _read_csv(path: Path) -> Iterator[Row]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # Bytes that are not UTF-8 are kept as stand-ins (surrogateescape) rather than raised: a
    # decode error raised from inside the csv reader loses the rest of the decoder's buffer,
    # and the records in it with it. The record that holds them becomes an error row.
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as file:
        reader = csv.DictReader(file)
        number = 0
        while True:
            number += 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Row(number, {}, f"record {number} cannot be read: {exc}")
                continue
            if None in values:  # more fields than the header has
                yield Row(number, {}, f"record {number} has more fields than the header")
                continue
            bad = _not_utf8(values)
            if bad is not None:
                yield Row(number, {}, f"record {number} is not valid UTF-8: {bad}")
                continue
            yield Row(number, dict(values))


def _not_utf8(values: dict[str, Any]) -> str | None:
    """Where the first byte that is not UTF-8 is in a CSV record (names and values)."""
    for name, value in values.items():
        for text, what in ((name, "in the header"), (value, f"in column {name!r}")):
            found = _NOT_UTF8.search(text) if isinstance(text, str) else None
            if found is not None:
                byte = ord(found.group()) - 0xDC00
                return f"byte 0x{byte:02X} at character {found.start()} {what}"
    return None


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise UsageError(
            "Parquet, Arrow and datasets folders need pyarrow: "
            "pip install 'genstruct-grpc[parquet]'"
        ) from None
    return pyarrow


def _pyarrow_parquet() -> Any:
    _pyarrow()
    import pyarrow.parquet

    return pyarrow.parquet


def _read_parquet(path: Path) -> Iterator[Row]:
    parquet_file = _pyarrow_parquet().ParquetFile(path)
    number = 0
    for batch in parquet_file.iter_batches(batch_size=1024):
        for values in batch.to_pylist():
            number += 1
            yield Row(number, values)


def _arrow_batches(path: Path) -> Iterator[Any]:
    """Record batches of an Arrow IPC stream (what `datasets` writes) or an Arrow IPC file."""
    pa = _pyarrow()
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            for index in range(file_reader.num_record_batches):
                yield file_reader.get_batch(index)
            return
        yield from reader


def _read_arrow_files(files: list[Path]) -> Iterator[Row]:
    number = 0
    for path in files:
        for batch in _arrow_batches(path):
            for values in batch.to_pylist():
                number += 1
                yield Row(number, values)


def datasets_folder_files(folder: Path, split: str | None) -> list[Path]:
    """The Arrow files of a folder written by `Dataset.save_to_disk` (or of one split of a
    `DatasetDict.save_to_disk` folder), in order."""
    dict_file = folder / "dataset_dict.json"
    if dict_file.exists():
        splits = [str(name) for name in json.loads(dict_file.read_text())["splits"]]
        if split is None:
            if len(splits) != 1:
                raise UsageError(f"{folder} holds splits {splits}; choose one with --split")
            split = splits[0]
        if split not in splits:
            raise UsageError(f"{folder} has no split {split!r}; it has {splits}")
        folder = folder / split
    elif split is not None and (folder / split).is_dir():
        folder = folder / split
    state_file = folder / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        files = [folder / entry["filename"] for entry in state.get("_data_files", [])]
        if files:
            return files
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise UsageError(f"{folder} is not a datasets folder: no .arrow files in it")
    return files
