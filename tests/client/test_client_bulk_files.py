"""The pure parts of the bulk runner: readers, column mapping, ids, the journal and the ledger."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from genstruct_client.bulk.documents import ColumnMapping, derive_id
from genstruct_client.bulk.errors import UsageError
from genstruct_client.bulk.ledger import Ledger
from genstruct_client.bulk.readers import count_rows, detect_input_format, read_rows
from genstruct_client.bulk.writers import (
    CorruptFile,
    JsonlJournal,
    Output,
    read_jsonl_records,
    read_questions,
    read_row_keys,
    repair_torn_tail,
)
from genstruct_client.progress import Progress
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

RECORDS = [
    {"title": "Tides", "content": "The moon pulls the sea.", "key": "a"},
    {"title": "Bees", "content": "Bees dance to show where food is.", "key": "b"},
    {"title": "Ünïcode", "content": "Ça marche, 日本語も。", "key": "c"},
]


def write_input(path: Path, fmt: str, records: list[dict[str, Any]]) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    elif fmt == "csv":
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif fmt == "arrow":  # an Arrow IPC file (`datasets` folders hold IPC streams)
        import pyarrow as pa

        table = pa.Table.from_pylist(records)
        with pa.ipc.new_file(str(path), table.schema) as writer:
            writer.write_table(table)
    elif fmt == "hf":
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(str(path))
    elif fmt == "hf-dict":
        import datasets

        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(records)}
        ).save_to_disk(str(path))
    else:
        raise AssertionError(fmt)
    return path


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("jsonl", "in.jsonl"), ("csv", "in.csv"), ("parquet", "in.parquet"), ("arrow", "in.arrow"),
     ("hf", "ds"), ("hf-dict", "dsd")],
)
def test_every_input_format_reads_the_same_rows(tmp_path: Path, fmt: str, name: str) -> None:
    path = write_input(tmp_path / name, fmt, RECORDS)
    rows = list(read_rows(path))
    assert [row.values for row in rows] == RECORDS
    assert [row.error for row in rows] == [None, None, None]
    assert count_rows(path) in (3, None)  # CSV has no cheap count
    if fmt != "csv":
        assert count_rows(path) == 3


def test_datasets_folder_with_several_splits_needs_a_split(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "dsd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(RECORDS[:2]),
            "test": datasets.Dataset.from_list(RECORDS[2:]),
        }
    ).save_to_disk(str(folder))
    with pytest.raises(UsageError, match="--split"):
        list(read_rows(folder))
    assert [row.values["key"] for row in read_rows(folder, split="test")] == ["c"]
    with pytest.raises(UsageError, match="no split"):
        list(read_rows(folder, split="validation"))


def test_unreadable_jsonl_lines_become_error_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"title": "a", "content": "b"}\nnot json\n\n[1, 2]\n{"content": "c"}\n')
    rows = list(read_rows(path))
    assert [row.number for row in rows] == [1, 2, 4, 5]
    assert [row.error is None for row in rows] == [True, False, False, True]
    assert "line 2" in (rows[1].error or "")


def test_a_byte_that_is_not_utf8_in_a_csv_loses_only_its_own_record(tmp_path: Path) -> None:
    # issue 34: one 0xFF in record 100 of 300 wrote no rows, and 179 were never mentioned
    lines = [b"id,title,content"] + [
        f"r{i},Title {i},Content of record {i}".encode() for i in range(1, 301)
    ]
    lines[100] = b"r100,Title 100,Content \xff of record 100"
    path = tmp_path / "in.csv"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    rows = list(read_rows(path))
    assert [row.number for row in rows] == list(range(1, 301))
    errors = [row for row in rows if row.error is not None]
    assert [row.number for row in errors] == [100]
    assert errors[0].error == (
        "record 100 is not valid UTF-8: byte 0xFF at character 8 in column 'content'"
    )
    assert all(row.values["id"] == f"r{row.number}" for row in rows if row.error is None)
    assert rows[-1].values == {
        "id": "r300", "title": "Title 300", "content": "Content of record 300"
    }


def test_format_detection(tmp_path: Path) -> None:
    assert detect_input_format(tmp_path / "x.JSONL") == "jsonl"
    assert detect_input_format(tmp_path) == "hf"
    with pytest.raises(UsageError, match="--input-format"):
        detect_input_format(tmp_path / "x.txt")


def test_ids_are_stable_and_depend_on_title_and_content() -> None:
    assert derive_id("a", "b") == derive_id("a", "b")
    assert derive_id("ab", "c") != derive_id("a", "bc")
    assert derive_id("a", "b") != derive_id("a", "c")
    assert len(derive_id("", "x")) == 32


def test_column_mapping() -> None:
    mapping = ColumnMapping(title="headline", content="body", id="key")
    doc = mapping.document({"headline": "H", "body": "B", "key": 7})
    assert (doc.title, doc.content, doc.id) == ("H", "B", "7")
    # No id column: derived from the text; a null title is an empty one.
    doc = ColumnMapping().document({"title": None, "content": "B"})
    assert (doc.title, doc.id) == ("", derive_id("", "B"))
    mapping.check({"headline": 1, "body": 2, "key": 3})
    with pytest.raises(UsageError, match="'body'"):
        mapping.check({"headline": 1, "text": 2, "key": 3})


def test_torn_last_line_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "us')
    assert repair_torn_tail(path) == len(b'{"id": "c", "us')
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'
    assert repair_torn_tail(path) == 0
    # A file that is one torn line is emptied.
    path.write_bytes(b'{"id"')
    assert repair_torn_tail(path) == 5
    assert path.read_bytes() == b""


def test_torn_line_longer_than_a_block(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n' + b"x" * 200_000)
    repair_torn_tail(path)
    assert path.read_bytes() == b'{"id": "a"}\n'


def test_journal_appends_in_committed_batches_and_repairs_on_open(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    journal = JsonlJournal(path)
    journal.append({"id": "a", "text": "é"})
    assert path.read_bytes() == b""  # not committed yet
    journal.commit()
    journal.close()
    with path.open("ab") as file:
        file.write(b'{"id": "torn')
    journal = JsonlJournal(path)
    assert journal.repaired_bytes == len(b'{"id": "torn')
    assert list(journal.records()) == [{"id": "a", "text": "é"}]
    journal.rewrite([{"id": "z"}])
    journal.append({"id": "y"})
    journal.close()
    assert list(read_jsonl_records(path)) == [{"id": "z"}, {"id": "y"}]


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    journal = JsonlJournal(tmp_path / "out.jsonl")
    try:
        with pytest.raises(UsageError, match="another run"):
            JsonlJournal(tmp_path / "out.jsonl")
    finally:
        journal.close()


def test_corrupt_interior_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\ngarbage\n{"id": "b"}\n')
    with pytest.raises(CorruptFile, match="line 2"):
        list(read_jsonl_records(path))


def test_parquet_output_goes_through_a_journal_and_resumes_from_the_parquet(
    tmp_path: Path,
) -> None:
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    output = Output(path)
    assert output.journal_path == tmp_path / "pairs.parquet.journal.jsonl"
    row = {"id": "a", "generation_index": 0, "title": "t", "content": "c", "user": None,
           "assistant": None, "model_name": "m", "parsed": False, "finish_reason": "eos",
           "prompt_tokens": 3, "completion_tokens": 4, "truncated": False, "raw_text": "r",
           "evidence": [{"start": 0, "end": 1}], "grounding": 0.5, "question_grounding": 0.0,
           "duplicate_of": {"id": "b", "generation": 1, "chunk_index": None}}
    output.journal.append(row)
    output.finish()
    output.close()
    assert not output.journal_path.exists()
    assert pq.read_table(path).to_pylist() == [row]
    # A later run seeds its journal from the finished Parquet file and adds to it.
    output = Output(path)
    assert [record["id"] for record in output.journal.records()] == ["a"]
    output.journal.append({**row, "id": "b"})
    output.finish()
    output.close()
    assert [r["id"] for r in pq.read_table(path).to_pylist()] == ["a", "b"]


def test_ledger() -> None:
    ledger = Ledger.from_records(
        [{"id": "a", "generation_index": 0}, {"id": "a", "generation_index": 2},
         {"id": "b", "generation_index": 0}],
        [{"id": "c", "retryable": False}, {"id": "d", "retryable": True}],
    )
    assert ledger.missing("a", 3) == [(0, 1)]
    assert ledger.is_done("b", 1) and not ledger.is_done("b", 2)
    assert ledger.is_done("c", 4)  # failed for good
    assert not ledger.is_done("d", 1)  # a transient failure is tried again
    ledger.record("a", 1)
    assert ledger.is_done("a", 3) and ledger.missing("a", 4) == [(0, 3)]


def test_ledger_of_chunked_documents_counts_every_part() -> None:
    rows = [{"id": "long", "generation_index": g, "chunk_index": c, "chunks": 3}
            for c, g in [(0, 0), (0, 1), (2, 1)]]
    ledger = Ledger.from_records(rows)
    assert ledger.missing("long", 2) == [(1, 0), (1, 1), (2, 0)]
    assert not ledger.is_done("long", 2)
    assert ledger.has("long", 1, 2) and not ledger.has("long", 0, 2)
    for c, g in [(1, 0), (1, 1), (2, 0)]:
        ledger.record("long", g, c)
    assert ledger.is_done("long", 2)
    assert not ledger.is_done("unseen", 1)  # parts unknown until the server answers


def test_progress_lines_when_not_a_terminal() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(10, stream=stream, bar=False, interval=5.0, clock=lambda: now[0])
    progress.skip(2)
    now[0] = 1.0
    progress.update(tokens=10, pairs=1, parsed=1)
    assert stream.getvalue() == ""  # not yet: one line per interval
    now[0] = 6.0
    progress.update(tokens=20, pairs=1, parsed=0, failed=True)
    line = stream.getvalue()
    assert "4/10 documents (40%)" in line
    assert "5 tok/s" in line and "parsed 50%" in line and "1 failed" in line and "ETA" in line
    progress.close()


_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(st.tuples(_TEXT, st.integers(0, 63), st.integers(0, 999), _TEXT), max_size=8),
    chunked=st.booleans(),
)
def test_resume_keys_are_what_decoding_each_row_gives(
    tmp_path: Path, rows: list[tuple[str, int, int, str]], chunked: bool
) -> None:
    # ids and text with quotes, backslashes and any character; an extra column that holds
    # the part's field names as keys of its own
    path = tmp_path / f"keys-{chunked}.jsonl"
    path.unlink(missing_ok=True)
    journal = JsonlJournal(path)
    for doc_id, index, part, text in rows:
        record: dict[str, Any] = {"id": doc_id, "generation_index": index, "title": text,
                                  "content": f'"chunk_index": {part}', "raw_text": text}
        if chunked:
            record |= {"chunk_index": part, "chunk_start": 0, "chunk_end": 5, "chunks": part + 1}
        record["meta"] = {"chunk_index": 7, "chunks": 9, "text": text}
        journal.append(record)
    journal.commit()
    journal.close()
    decoded = [
        (str(r["id"]), int(r["generation_index"]), int(r.get("chunk_index") or 0),
         int(r.get("chunks") or 0))
        for r in read_jsonl_records(path)
    ]
    assert list(read_row_keys(path, chunked=chunked)) == decoded


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(_TEXT, st.one_of(st.none(), _TEXT), st.booleans(), st.booleans(), _TEXT),
        max_size=8,
    ),
    chunked=st.booleans(),
)
def test_resume_questions_are_what_decoding_each_row_gives(
    tmp_path: Path, rows: list[tuple[str, str | None, bool, bool, str]], chunked: bool
) -> None:
    # the question and the text around it with quotes, backslashes, any character, and the
    # names of the columns read; rows in the pair's column order, as a run writes them
    path = tmp_path / f"questions-{chunked}.jsonl"
    path.unlink(missing_ok=True)
    journal = JsonlJournal(path)
    for number, (doc_id, question, parsed, duplicate, text) in enumerate(rows):
        record: dict[str, Any] = {
            "id": doc_id, "generation_index": number, "title": text,
            "content": f'{text}, "user": "x", "parsed": true, "duplicate_of": null',
            "user": question, "assistant": text, "parsed": parsed, "raw_text": text,
            "duplicate_of": {"id": text, "generation": 0} if duplicate else None,
        }  # fmt: skip
        if chunked:
            record |= {"chunk_index": number, "chunk_start": 0, "chunk_end": 5, "chunks": 9}
        record["meta"] = {"user": text, "parsed": False, "duplicate_of": None}
        journal.append(record)
    journal.commit()
    journal.close()
    decoded = [
        ((str(r["id"]), int(r["generation_index"]), int(r.get("chunk_index") or 0),
          int(r.get("chunks") or 0)), r["user"], r["parsed"], r["duplicate_of"] is not None)
        for r in read_jsonl_records(path)
    ]  # fmt: skip
    assert list(read_questions(path, chunked=chunked)) == decoded


def test_resume_keys_of_a_line_in_another_shape_or_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "other.jsonl"
    path.write_text(
        '{"generation_index": 2, "id": "x"}\n\n{"id": "y", "generation_index": 0, "a": 1}\n'
    )
    assert list(read_row_keys(path, chunked=False)) == [("x", 2, 0, 0), ("y", 0, 0, 0)]
    path.write_text('{"id": "z", "generation_index": 1, "title": "cut off\n')
    with pytest.raises(CorruptFile):
        list(read_row_keys(path, chunked=False))
