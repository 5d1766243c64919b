"""Crash-safe output: an append-only JSONL journal, and Parquet converted from one at the end.

Lines are appended only: each document's lines are written (flushed to the OS) as its result
arrives, and fsynced in batches, so after a crash of the process or the machine only the last
line can be incomplete; opening the file again cuts that torn line off.
Parquet cannot be appended to, so Parquet output is journalled to `<output>.journal.jsonl`
beside it and converted (to a temporary file, then renamed into place) when the run has
finished; the journal is then removed. A run that stops early leaves the journal, which the
next run resumes from. Rows hold the pair's columns (COLUMNS), then the input's columns
passed through, whose Parquet types are found over the whole journal.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from genstruct_client.bulk.errors import UsageError
from genstruct_client.rows import PAIR_COLUMNS

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

OUTPUT_FORMATS = ("jsonl", "parquet")
# Output columns: the document's, then the pair's (rows.PAIR_COLUMNS: distilabel's user,
# assistant and model_name, and ours).
COLUMNS = ("id", "generation_index", "title", "content", *PAIR_COLUMNS)
# With --chunk, after the pair's columns: the part of the content a pair came from.
CHUNK_COLUMNS = ("chunk_index", "chunk_start", "chunk_end", "chunks")


def _json_value(value: Any) -> Any:
    """What JSON holds of a value passed through from Parquet or Arrow that it cannot hold."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)  # exactly, which a float would not be
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def encode_line(record: dict[str, Any]) -> bytes:
    """One JSONL line (UTF-8, newline included)."""
    return json.dumps(record, ensure_ascii=False, default=_json_value).encode("utf-8") + b"\n"


class CorruptFile(UsageError):
    """A line other than the last one of a journal is not valid JSON."""


def repair_torn_tail(path: Path) -> int:
    """Cuts off an incomplete last line (no newline at its end); returns the bytes removed."""
    if not path.exists():
        return 0
    with path.open("r+b") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        file.seek(size - 1)
        if file.read(1) == b"\n":
            return 0
        # Walk back to the last newline, a block at a time.
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - 65536)
            file.seek(start)
            block = file.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        file.truncate(keep)
        file.flush()
        os.fsync(file.fileno())
        return size - keep


def read_jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a repaired journal; raises CorruptFile on a bad line."""
    if not path.exists():
        return
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            yield _decoded(path, number, line)


def _decoded(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFile(f"{path} line {number} is not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise CorruptFile(f"{path} line {number} is not a JSON object")
    return record


# What resume needs of a row, read from the start of its line as encode_line writes it: the id
# and generation (the first two keys), and with --chunk the part fields that follow the
# pair's columns. A quote inside a string value is escaped, so these cannot match text.
_ROW_KEY = re.compile(rb'\{"id": ("(?:[^"\\]|\\.)*"), "generation_index": (\d+), ')
_PART_KEY = re.compile(
    rb', "chunk_index": (\d+), "chunk_start": \d+, "chunk_end": \d+, "chunks": (\d+)'
)

RowKey = tuple[str, int, int, int]  # id, generation_index, chunk_index, chunks (0: not chunked)


def read_row_keys(path: Path, *, chunked: bool) -> Iterator[RowKey]:
    """The (id, generation, part, parts) of every row of a repaired journal, without decoding
    the text of the rows; a line in another shape is decoded whole (CorruptFile if bad)."""
    if not path.exists():
        return
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            match = _ROW_KEY.match(line)
            if match is None or not line.rstrip().endswith(b"}"):
                if not line.strip():
                    continue
                yield _decoded_key(path, number, line)
                continue
            part, parts = 0, 0
            if chunked:
                found = _PART_KEY.search(line, match.end())
                if found is None:
                    yield _decoded_key(path, number, line)
                    continue
                part, parts = int(found.group(1)), int(found.group(2))
            yield json.loads(match.group(1)), int(match.group(2)), part, parts


def _decoded_key(path: Path, number: int, line: bytes) -> RowKey:
    return _key_of(_decoded(path, number, line))


def _key_of(record: dict[str, Any]) -> RowKey:
    return (str(record["id"]), int(record["generation_index"]),
            int(record.get("chunk_index") or 0), int(record.get("chunks") or 0))


# What rebuilding the index of questions needs of a row, searched for after its key: its
# question, and the two pair columns that say whether the run kept it (encode_line writes
# them in PAIR_COLUMNS order, before the columns passed through).
_USER = re.compile(rb', "user": (null|"(?:[^"\\]|\\.)*"), "assistant": ')
_PARSED = b', "parsed": '
_DUPLICATE_OF = b', "duplicate_of": '

# a row's key, its question (`user`), `parsed`, and whether `duplicate_of` is set
QuestionRow = tuple[RowKey, "str | None", bool, bool]


def read_questions(path: Path, *, chunked: bool) -> Iterator[QuestionRow]:
    """The key, question, `parsed` and `duplicate_of` being set, of every row of a repaired
    journal, read as read_row_keys reads keys: the rest of a row (its content and answer,
    most of its bytes) is not decoded. A line in another shape is decoded whole."""
    if not path.exists():
        return
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            found = _question_fields(line, chunked)
            if found is not None:
                yield found
            elif line.strip():
                record = _decoded(path, number, line)
                yield (_key_of(record), record.get("user"), bool(record.get("parsed")),
                       record.get("duplicate_of") is not None)  # fmt: skip


def _question_fields(line: bytes, chunked: bool) -> QuestionRow | None:
    key = _ROW_KEY.match(line)
    if key is None or not line.rstrip().endswith(b"}"):
        return None
    user = _USER.search(line, key.end())
    if user is None:
        return None
    parsed_at = line.find(_PARSED, user.end()) + len(_PARSED)
    duplicate_at = line.find(_DUPLICATE_OF, parsed_at) + len(_DUPLICATE_OF)
    if parsed_at < len(_PARSED) or duplicate_at < len(_DUPLICATE_OF):
        return None
    parsed = line.startswith(b"true", parsed_at)
    if not parsed and not line.startswith(b"false", parsed_at):
        return None
    duplicate = not line.startswith(b"null", duplicate_at)
    if duplicate and not line.startswith(b"{", duplicate_at):
        return None
    part, parts = 0, 0
    if chunked:
        found = _PART_KEY.search(line, duplicate_at)
        if found is None:
            return None
        part, parts = int(found.group(1)), int(found.group(2))
    row_key = (_json_text(key.group(1)), int(key.group(2)), part, parts)
    return row_key, _json_text(user.group(1)), parsed, duplicate


def _json_text(value: bytes) -> Any:
    """A JSON string (or null) as read from a line; most hold no escape to undo."""
    if value.startswith(b'"') and b"\\" not in value:
        return value[1:-1].decode("utf-8")
    return json.loads(value)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JsonlJournal:
    """An append-only JSONL file, locked against a second writer, written in fsynced batches."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = repair_torn_tail(path)
        self._file = self._open()
        self._pending: list[bytes] = []
        self._unsynced = False

    def _open(self) -> BinaryIO:
        file = self.path.open("ab")
        if fcntl is not None:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                raise UsageError(f"another run is writing {self.path}") from None
        return file

    @property
    def closed(self) -> bool:
        return self._file.closed

    def records(self) -> Iterator[dict[str, Any]]:
        """What the file already holds."""
        return read_jsonl_records(self.path)

    def row_keys(self, *, chunked: bool) -> Iterator[RowKey]:
        """What resume needs of the rows the file holds (read_row_keys)."""
        return read_row_keys(self.path, chunked=chunked)

    def append(self, record: dict[str, Any]) -> None:
        """Queues one line; it reaches the file at the next flush or commit."""
        self._pending.append(encode_line(record))

    def flush(self) -> None:
        """Writes the queued lines to the OS: they survive the process being killed."""
        if not self._pending:
            return
        self._file.write(b"".join(self._pending))
        self._file.flush()
        self._pending.clear()
        self._unsynced = True

    def commit(self) -> None:
        """Writes the queued lines and fsyncs: they survive the machine going down."""
        self.flush()
        if self._unsynced:
            os.fsync(self._file.fileno())
            self._unsynced = False

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replaces the whole content (atomically: a temporary file renamed over it)."""
        self.commit()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as file:
            for record in records:
                file.write(encode_line(record))
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._file.close()
        self._file = self._open()

    def close(self) -> None:
        self.commit()
        self._file.close()


def side_path(output: Path, kind: str) -> Path:
    """Where a run keeps its rows of one `kind` beside OUTPUT (OUTPUT's stem + .KIND.jsonl):
    "errors" (failed documents), "filtered" (pairs a filter took out, with the reason),
    "duplicates" (near-duplicate pairs, with --dedup drop), "progress" (the run's pace)."""
    return output.with_name(f"{output.stem}.{kind}.jsonl")


def card_path(output: Path) -> Path:
    """The folder of OUTPUT's dataset card (OUTPUT's stem + .card): README.md and plots."""
    return output.with_name(f"{output.stem}.card")


def journal_path(path: Path, fmt: str) -> Path:
    """Where the rows of an output in `fmt` are appended as they come."""
    return path.with_name(path.name + ".journal.jsonl") if fmt == "parquet" else path


def has_content(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def ensure_unlocked(path: Path) -> None:
    """Raises UsageError when a run holds `path` open for writing (see JsonlJournal)."""
    if fcntl is None or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"another run is writing {path}") from None
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_json_atomic(path: Path, value: Any) -> None:
    """Writes a small JSON file so that it is whole or absent, also after a crash."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as file:
        json.dump(value, file, indent=2, ensure_ascii=False)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Output:
    """The output of a bulk run: a JSONL file, or Parquet through a JSONL journal."""

    def __init__(self, path: Path, fmt: str | None = None) -> None:
        self.path = path
        self.format = fmt or detect_output_format(path)
        if self.format not in OUTPUT_FORMATS:
            raise UsageError(f"unknown output format {fmt!r}; use jsonl or parquet")
        if self.format == "parquet":
            _parquet()
        self.journal_path = journal_path(path, self.format)
        if self.format == "parquet" and not self.journal_path.exists() and path.exists():
            self._seed_journal_from_parquet()
        self.journal = JsonlJournal(self.journal_path)

    def _seed_journal_from_parquet(self) -> None:
        """A finished Parquet output is resumed from: its rows become the journal."""
        table = _parquet().read_table(self.path)
        tmp = self.journal_path.with_name(self.journal_path.name + ".tmp")
        with tmp.open("wb") as file:
            for batch in table.to_batches(max_chunksize=4096):
                for record in batch.to_pylist():
                    file.write(encode_line(record))
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self.journal_path)

    def finish(self) -> None:
        """Everything is written: for Parquet, converts the journal and removes it."""
        self.journal.commit()
        if self.format != "parquet":
            return
        import pyarrow as pa

        pq = _parquet()
        schema, as_json = _parquet_schema(self.journal_path)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with pq.ParquetWriter(tmp, schema) as writer:
            for chunk in _chunks(self.journal_path):
                for record in chunk:
                    for name in as_json.intersection(record):
                        record[name] = _as_json_text(record[name])
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
        with tmp.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self.journal.close()
        self.journal_path.unlink()

    def close(self) -> None:
        if not self.journal.closed:
            self.journal.close()


def output_records(output: Path) -> Iterator[dict[str, Any]]:
    """The rows of a finished output, JSONL or Parquet, a batch at a time."""
    if detect_output_format(output) == "jsonl":
        yield from read_jsonl_records(output)
        return
    pq = _parquet()
    for batch in pq.ParquetFile(output).iter_batches(batch_size=4096):
        yield from batch.to_pylist()


def _chunks(path: Path, size: int = 4096) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for record in read_jsonl_records(path):
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _pair_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("generation_index", pa.int32()),
            ("title", pa.string()),
            ("content", pa.string()),
            ("user", pa.string()),
            ("assistant", pa.string()),
            ("model_name", pa.string()),
            ("parsed", pa.bool_()),
            ("finish_reason", pa.string()),
            ("prompt_tokens", pa.int32()),
            ("completion_tokens", pa.int32()),
            ("truncated", pa.bool_()),
            ("raw_text", pa.string()),
            ("evidence", pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32())]))),
            ("grounding", pa.float64()),
            ("question_grounding", pa.float64()),
            ("duplicate_of", pa.struct(
                [("id", pa.string()), ("generation", pa.int32()), ("chunk_index", pa.int32())]
            )),
        ]
    )


def _parquet_schema(path: Path) -> tuple[Any, set[str]]:
    """The schema of the Parquet file made from a journal, and the columns written as JSON.

    The pair's columns have fixed types; a passed-through column gets the type its values
    share over the whole journal (ints and floats: float; a column only ever null: null), so
    every chunk is written with the same schema. A column whose values share no type (a
    JSONL input may hold 1 in one row and "one" in the next) is written as JSON text.
    """
    import pyarrow as pa

    pair = _pair_schema()
    types: dict[str, Any] = {}
    as_json: set[str] = set()
    for chunk in _chunks(path):
        names = dict.fromkeys(name for record in chunk for name in record)
        for name in names:
            if name in pair.names or name in as_json:
                continue
            try:
                found = pa.array([record.get(name) for record in chunk]).type
                types[name] = _unify(types[name], found) if name in types else found
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                as_json.add(name)
                types[name] = pa.string()
    return pa.schema(list(pair) + [pa.field(name, kind) for name, kind in types.items()]), as_json


def _unify(first: Any, second: Any) -> Any:
    import pyarrow as pa

    if first == second:
        return first
    unified = pa.unify_schemas(
        [pa.schema([("x", first)]), pa.schema([("x", second)])], promote_options="permissive"
    )
    return unified.field("x").type


def _as_json_text(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, default=_json_value)


def detect_output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise UsageError(f"cannot tell the output format of {path}; use --output-format")


def _parquet() -> Any:
    try:
        import pyarrow.parquet
    except ImportError:
        raise UsageError(
            "Parquet output needs pyarrow: pip install 'genstruct-grpc[parquet]'"
        ) from None
    return pyarrow.parquet
