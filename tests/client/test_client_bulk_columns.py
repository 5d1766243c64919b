"""Input columns in the output rows: pass-through for every format, --columns, the `id`
default, and the rule that no input column takes the name of one of the pair's."""

from __future__ import annotations

import datetime
import decimal
import json
from pathlib import Path
from typing import Any

import pytest
from genstruct_client import ChannelConfig
from genstruct_client.bulk import ColumnMapping, UsageError, derive_id, run
from genstruct_client.bulk.documents import parse_columns
from genstruct_client.bulk.readers import read_rows
from genstruct_client.bulk.writers import COLUMNS, Output, encode_line

from tests.client.helpers import ServerProcess, genstruct, output_records
from tests.client.test_client_bulk_files import write_input

# Columns of every kind a format can hold; CSV reads them all back as text.
RICH: list[dict[str, Any]] = [
    {"title": "Tides", "content": "The moon pulls the sea.", "source": "wiki", "n": 1,
     "score": 0.5, "ok": True, "tags": ["sea", "moon"], "meta": {"lang": "en"}, "note": None},
    {"title": "Bees", "content": "Bees dance to show where food is.", "source": "blog", "n": 2,
     "score": 1.25, "ok": False, "tags": [], "meta": {"lang": "fr"}, "note": "seen"},
]
EXTRA = ["source", "n", "score", "ok", "tags", "meta", "note"]


def by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in records}


@pytest.mark.parametrize("output_name", ["out.jsonl", "out.parquet"])
@pytest.mark.parametrize(
    ("fmt", "input_name"),
    [("jsonl", "in.jsonl"), ("csv", "in.csv"), ("parquet", "in.parquet"),
     ("arrow", "in.arrow"), ("hf", "ds"), ("hf-dict", "dsd")],
)
def test_every_input_column_passes_through(
    server_process: ServerProcess, tmp_path: Path, fmt: str, input_name: str, output_name: str
) -> None:
    source = write_input(tmp_path / input_name, fmt, RICH)
    output = tmp_path / output_name
    summary = run(source, output, config=ChannelConfig(server_process.target), progress=False)
    assert summary.exit_code == 0 and summary.pairs_written == 2
    records = output_records(output)
    # The pair's columns as before, then the input's others in the input's order.
    assert all(list(r) == [*COLUMNS, *EXTRA] for r in records)
    read = [row.values for row in read_rows(source)]
    if fmt != "csv":
        assert read == RICH  # so the comparison below is with the values as written
    written = by_id(records)
    for values in read:
        row = written[derive_id(values["title"], values["content"])]
        assert {name: row[name] for name in EXTRA} == {name: values[name] for name in EXTRA}
        assert (row["title"], row["content"]) == (values["title"], values["content"])


def test_columns_selects_and_renames(server_process: ServerProcess, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", "jsonl", RICH)
    config = ChannelConfig(server_process.target)
    chosen = ColumnMapping(columns=parse_columns("n, source=origin"))
    run(source, tmp_path / "a.jsonl", config=config, columns=chosen, progress=False)
    rows = output_records(tmp_path / "a.jsonl")
    assert [list(r)[len(COLUMNS):] for r in rows] == [["n", "origin"]] * 2
    assert sorted(r["origin"] for r in rows) == ["blog", "wiki"]
    # '' passes none; '*' with a rename keeps the others in the input's order.
    run(source, tmp_path / "b.jsonl", config=config, columns=ColumnMapping(columns=()),
        progress=False)
    assert all(list(r) == list(COLUMNS) for r in output_records(tmp_path / "b.jsonl"))
    renamed = ColumnMapping(columns=parse_columns("*,note=remark"))
    run(source, tmp_path / "c.jsonl", config=config, columns=renamed, progress=False)
    assert all(list(r)[len(COLUMNS):] == [*EXTRA[:-1], "remark"]
               for r in output_records(tmp_path / "c.jsonl"))
    # A column named that the input does not have: refused where rows share their columns;
    # in JSONL, where they need not, a row without it gets a null.
    csv_source = write_input(tmp_path / "in.csv", "csv", RICH)
    with pytest.raises(UsageError, match="no column 'colour'"):
        run(csv_source, tmp_path / "d.jsonl", config=config,
            columns=ColumnMapping(columns=("colour",)), progress=False)
    assert not (tmp_path / "d.jsonl").exists()
    run(source, tmp_path / "e.jsonl", config=config, columns=ColumnMapping(columns=("colour",)),
        progress=False)
    assert [r["colour"] for r in output_records(tmp_path / "e.jsonl")] == [None, None]


def test_a_column_named_id_is_the_id(server_process: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"id": "doc-1", "title": "Tides", "content": "The moon.", "lang": "en"}) + "\n"
        + json.dumps({"id": None, "title": "Bees", "content": "They dance.", "lang": "fr"}) + "\n"
    )
    output = tmp_path / "out.jsonl"
    result = genstruct("generate", str(source), "-o", str(output),
                       "--target", server_process.target, "--no-progress")
    assert result.returncode == 0, result.stderr
    records = output_records(output)
    # A null id falls back on the sha256 of title and content.
    assert {r["id"]: r["lang"] for r in records} == {
        "doc-1": "en", derive_id("Bees", "They dance."): "fr"
    }
    assert all(list(r) == [*COLUMNS, "lang"] for r in records)  # not repeated as a column
    # --id-column '' derives every id; the input's id must then be renamed (or left out).
    args = ("generate", str(source), "-o", str(tmp_path / "derived.jsonl"), "--target",
            server_process.target, "--no-progress", "--id-column", "")
    refused = genstruct(*args)
    assert refused.returncode == 2 and "'id'" in refused.stderr, refused.stderr
    result = genstruct(*args, "--columns", "*,id=source_id")
    assert result.returncode == 0, result.stderr
    derived = output_records(tmp_path / "derived.jsonl")
    assert {r["id"]: r["source_id"] for r in derived} == {
        derive_id("Tides", "The moon."): "doc-1", derive_id("Bees", "They dance."): None
    }


def test_a_column_named_like_the_pairs_is_refused(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "chat.jsonl"
    source.write_text(
        json.dumps({"title": "Tides", "content": "The moon.", "user": "u1", "lang": "en"}) + "\n"
    )
    output = tmp_path / "out.jsonl"
    base = ("generate", str(source), "-o", str(output), "--target", server_process.target,
            "--no-progress")
    refused = genstruct(*base)
    assert refused.returncode == 2
    assert "'user'" in refused.stderr and "--columns" in refused.stderr, refused.stderr
    assert not output.exists() and not (tmp_path / "out.jsonl.run.json").exists()
    result = genstruct(*base, "--columns", "*,user=input_user")
    assert result.returncode == 0, result.stderr
    (row,) = output_records(output)
    assert row["input_user"] == "u1" and row["lang"] == "en"
    assert row["user"] == "What is the document about?"  # the pair's, not overwritten
    result = genstruct(*base[:3], str(tmp_path / "kept.jsonl"), *base[4:], "--columns", "lang")
    assert result.returncode == 0, result.stderr
    assert list(output_records(tmp_path / "kept.jsonl")[0]) == [*COLUMNS, "lang"]


def test_collisions_in_the_mapping() -> None:
    # A `title` column that is not the title column would overwrite the output's title.
    with pytest.raises(UsageError, match="'title'"):
        ColumnMapping(title="headline").check({"headline": "h", "content": "c", "title": "t"})
    # An `id` column that is not the id column, likewise.
    with pytest.raises(UsageError, match="'id'"):
        ColumnMapping(id="key").check({"key": 1, "title": "t", "content": "c", "id": 2})
    # A rename onto one of the pair's names, or two columns onto one name.
    with pytest.raises(UsageError, match="'model_name'"):
        ColumnMapping(columns=("a=model_name",)).check({"title": "", "content": "", "a": 1})
    with pytest.raises(UsageError, match="two columns the name 'b'"):
        ColumnMapping(columns=("*", "a=b")).check({"title": "", "content": "", "a": 1, "b": 2})
    # Naming the title or content column under its role is already so: not a collision.
    mapping = ColumnMapping(columns=("title", "content", "x"))
    mapping.check({"title": "t", "content": "c", "x": 1})
    assert mapping.extras({"title": "t", "content": "c", "x": 1}) == {"x": 1}
    # A later record (JSONL rows need not share keys) is checked too, naming the record.
    with pytest.raises(UsageError, match=r"record 7: .*'parsed'"):
        ColumnMapping().extras({"title": "t", "content": "c", "parsed": 1}, 7)


def test_hostile_jsonl_rows_become_their_own_errors_and_the_run_goes_on(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    # issue 34: each of these stopped every rerun at the same place
    source = tmp_path / "in.jsonl"
    rows = [{"title": f"t{i}", "content": f"c{i}"} for i in range(6)]
    rows[3]["model_name"] = "mine"  # a later row with a key named like an output column
    lines = [json.dumps(r) for r in rows]
    lines[1] = '{"title": "deep", "content": ' + "[" * 100_000 + "]" * 100_000 + "}"
    lines[4] = '{"title": "half", "content": "a lone \\ud800 surrogate"}'
    source.write_text("".join(line + "\n" for line in lines))
    summary = run(source, tmp_path / "out.jsonl", config=ChannelConfig(server_process.target),
                  progress=False)
    assert summary.finished and summary.failed == 3 and summary.exit_code == 1
    assert sorted(r["title"] for r in output_records(tmp_path / "out.jsonl")) == [
        "t0", "t2", "t5"
    ]
    errors = [json.loads(line) for line in summary.errors.read_text().splitlines()]
    assert sorted((e["row"], e["code"]) for e in errors) == [
        (2, "INVALID_ARGUMENT"), (4, "INVALID_ARGUMENT"), (5, "INVALID_ARGUMENT")
    ]
    messages = {e["row"]: e["message"] for e in errors}
    assert "nests JSON too deeply" in messages[2]
    assert "'model_name'" in messages[4]
    assert "lone surrogate" in messages[5]


def test_id_default_in_the_mapping() -> None:
    assert ColumnMapping().resolved({"id": 1, "title": "", "content": ""}).id == "id"
    assert ColumnMapping().resolved({"title": "", "content": ""}).id == ""
    assert ColumnMapping(id="").resolved({"id": 1}).id == ""
    resolved = ColumnMapping().resolved({"id": 1})
    assert resolved.document({"id": 7, "title": "a", "content": "b"}).id == "7"
    assert ColumnMapping(id="").document({"id": 7, "title": "a", "content": "b"}).id == (
        derive_id("a", "b")
    )


def test_values_json_cannot_hold_are_written_as_text() -> None:
    line = encode_line({
        "when": datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2024, 5, 1),
        "price": decimal.Decimal("1.10"),
        "blob": b"\x00\xff",
    })
    assert json.loads(line) == {
        "when": "2024-05-01T12:30:00+00:00", "day": "2024-05-01", "price": "1.10",
        "blob": "AP8=",
    }


def test_parquet_output_types_hold_over_the_whole_journal(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    output = Output(path)
    pair = {"generation_index": 0, "title": "t", "content": "c", "user": "u", "assistant": "a",
            "model_name": "m", "parsed": True, "finish_reason": "eos", "prompt_tokens": 1,
            "completion_tokens": 2, "truncated": False, "raw_text": "r"}
    # The first chunk of the journal (4,096 rows) only ever has a null `late`, the second a
    # null `early`; `mixed` is an int in one row and text in another; `sparse` is in one row.
    for i in range(5000):
        extras: dict[str, Any] = {"late": None if i < 4500 else i, "early": i if i < 100 else None,
                                  "mixed": 1 if i else "one"}
        if i == 10:
            extras["sparse"] = [1.5]
        output.journal.append({"id": str(i), **pair, **extras})
    output.finish()
    output.close()
    table = pq.read_table(path)
    assert table.column_names == [*COLUMNS, "late", "early", "mixed", "sparse"]
    assert table.schema.field("late").type == pa.int64()
    assert table.schema.field("early").type == pa.int64()
    assert table.schema.field("mixed").type == pa.string()  # as JSON text
    rows = table.to_pylist()
    assert rows[4999]["late"] == 4999 and rows[0]["late"] is None
    assert rows[99]["early"] == 99 and rows[4999]["early"] is None
    assert [rows[0]["mixed"], rows[1]["mixed"]] == ['"one"', "1"]
    assert rows[10]["sparse"] == [1.5] and rows[11]["sparse"] is None
