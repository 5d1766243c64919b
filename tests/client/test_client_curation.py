"""Curation in the bulk command: near-duplicate questions (marked or moved aside, rebuilt on
resume, across shards by merge) and filters that leave a trace, against fake-engine servers
whose pairs echo each document (its title is the question, its content the answer)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from genstruct_client.bulk.documents import derive_id
from genstruct_client.curation import Filters, QuestionIndex, shingles

from tests.client.helpers import (
    ServerProcess,
    finish,
    genstruct,
    output_records,
    start_genstruct,
    wait_progress,
)

LONG = "The harbour wall of Brest was rebuilt in granite after the great storm of the winter."
# Titles become questions: B nearly repeats A (6 of their 7 word pairs shared), C does not.
A = "What causes the tides in Brest harbour"
B = "What causes the tides in Brest harbour today"
C = "Who rebuilt the harbour wall in granite"


@pytest.fixture(scope="module")
def echo_server() -> Iterator[ServerProcess]:
    process = ServerProcess("--echo", "--n-parallel", "8")
    yield process
    process.close()


def write(path: Path, docs: list[tuple[str, str]]) -> dict[str, str]:
    """The documents as JSONL; returns each id's title."""
    path.write_text("".join(json.dumps({"title": t, "content": c}) + "\n" for t, c in docs))
    return {derive_id(t, c): t for t, c in docs}


def key_of(row: dict[str, Any], titles: dict[str, str]) -> tuple[str, int]:
    return titles[row["id"]], row["generation_index"]


def marks(rows: list[dict[str, Any]], titles: dict[str, str]) -> dict[tuple[str, int], Any]:
    """(title, generation) -> the (title, generation) it repeats (titles must be unique)."""
    assert len(set(titles.values())) == len(titles)
    return {
        key_of(row, titles): None if row["duplicate_of"] is None
        else (titles[row["duplicate_of"]["id"]], row["duplicate_of"]["generation"])
        for row in rows
    }


def id_marks(rows: list[dict[str, Any]]) -> dict[tuple[str, int], Any]:
    """(id, generation) -> the (id, generation) it repeats, or None."""
    return {
        (row["id"], row["generation_index"]): None if row["duplicate_of"] is None
        else (row["duplicate_of"]["id"], row["duplicate_of"]["generation"])
        for row in rows
    }


def test_shingles_and_the_index() -> None:
    assert shingles("What is it?") == {"what is", "is it"}
    assert shingles("Tides") == {"tides"} and shingles("?!") == set()
    index = QuestionIndex(0.7)
    assert index.check(A, "a") is None
    assert index.check(B, "b") == "a"  # 6/7 alike: a duplicate, and not kept
    assert index.check(C, "c") is None
    assert index.check(B.upper(), "b2") == "a"  # case does not count
    assert index.check("", "empty") is None and index.check(None, "none") is None
    assert len(index) == 2
    strict = QuestionIndex(0.9)
    strict.check(A, "a")
    assert strict.check(B, "b") is None  # 0.86 is not 0.9


def test_filters_say_why() -> None:
    filters = Filters(require_parsed=True, min_grounding=0.5, max_question_grounding=0.8)
    row = {"parsed": True, "grounding": 0.6, "question_grounding": 0.2}
    assert filters.reason(row) is None
    assert filters.reason({**row, "parsed": False, "grounding": 0.0}) == "not_parsed"
    assert filters.reason({**row, "grounding": 0.4}) == "grounding_below_min"
    assert filters.reason({**row, "question_grounding": 0.9}) == "question_grounding_above_max"
    with pytest.raises(ValueError):
        Filters(min_grounding=1.5)


def test_duplicates_are_marked_within_a_document_and_across_the_run(
    echo_server: ServerProcess, tmp_path: Path
) -> None:
    titles = write(tmp_path / "in.jsonl", [(A, LONG), (B, LONG + " Really."), (C, LONG)])
    output = tmp_path / "out.jsonl"
    result = genstruct("generate", str(tmp_path / "in.jsonl"), "-o", str(output),
                       "--target", echo_server.target, "--num-generations", "2",
                       "--concurrency", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert marks(output_records(output), titles) == {
        (A, 0): None, (A, 1): (A, 0),  # the same question twice in one document
        (B, 0): (A, 0), (B, 1): (A, 0),  # a near repeat of another document's
        (C, 0): None, (C, 1): (C, 0),
    }
    assert "4 pairs nearly repeat an earlier pair's question: marked" in result.stderr
    assert not (tmp_path / "out.duplicates.jsonl").exists()  # nothing moved aside
    assert not (tmp_path / "out.filtered.jsonl").exists()


def test_drop_moves_duplicates_aside_and_off_looks_for_none(
    echo_server: ServerProcess, tmp_path: Path
) -> None:
    titles = write(tmp_path / "in.jsonl", [(A, LONG), (B, LONG + " Really."), (C, LONG)])
    output = tmp_path / "out.jsonl"
    args = ("generate", str(tmp_path / "in.jsonl"), "-o", str(output), "--target",
            echo_server.target, "--num-generations", "2", "--concurrency", "1", "--no-progress")
    result = genstruct(*args, "--dedup", "drop")
    assert result.returncode == 0, result.stderr
    assert marks(output_records(output), titles) == {(A, 0): None, (C, 0): None}
    moved = output_records(tmp_path / "out.duplicates.jsonl")
    assert marks(moved, titles) == {(A, 1): (A, 0), (B, 0): (A, 0), (B, 1): (A, 0),
                                    (C, 1): (C, 0)}
    # the curation is part of the run's configuration
    again = genstruct(*args, "--dedup", "off")
    assert again.returncode == 2 and "curation.dedup.mode" in again.stderr
    result = genstruct(*args, "--dedup", "off", "--new-run")
    assert result.returncode == 0, result.stderr
    assert all(row["duplicate_of"] is None for row in output_records(output))
    assert len(output_records(output)) == 6


def test_filters_move_rows_aside_with_their_reason(
    echo_server: ServerProcess, tmp_path: Path
) -> None:
    titles = write(tmp_path / "in.jsonl", [
        (A, LONG),
        (C, "[noparse] " + LONG),  # no marker: does not parse
        ("Why so short", "Too short to copy."),  # an answer of 4 words: grounding 0
        ("The harbour wall of Brest was rebuilt in granite", LONG),  # a copying question
    ])
    output = tmp_path / "out.jsonl"
    result = genstruct("generate", str(tmp_path / "in.jsonl"), "-o", str(output),
                       "--target", echo_server.target, "--no-progress", "--require-parsed",
                       "--min-grounding", "0.5", "--max-question-grounding", "0.5")
    assert result.returncode == 0, result.stderr
    kept = output_records(output)
    assert [titles[row["id"]] for row in kept] == [A]
    assert kept[0]["grounding"] == 1.0 and kept[0]["evidence"]
    start, end = kept[0]["evidence"][0]["start"], kept[0]["evidence"][0]["end"]
    assert LONG[start:end] == LONG  # the answer is the content, full stop included
    filtered = {titles[row["id"]]: row["filter_reason"]
                for row in output_records(tmp_path / "out.filtered.jsonl")}
    assert filtered == {
        C: "not_parsed",
        "Why so short": "grounding_below_min",
        "The harbour wall of Brest was rebuilt in granite": "question_grounding_above_max",
    }
    assert ("3 pairs filtered out (grounding_below_min 1, not_parsed 1, "
            "question_grounding_above_max 1)") in result.stderr
    # a rerun asks for nothing again: the filtered rows are written too
    again = genstruct("generate", str(tmp_path / "in.jsonl"), "-o", str(output),
                      "--target", echo_server.target, "--no-progress", "--require-parsed",
                      "--min-grounding", "0.5", "--max-question-grounding", "0.5")
    assert again.returncode == 0 and "4 documents already done" in again.stderr


def many_documents(path: Path, count: int) -> dict[str, str]:
    # questions from a few shapes, so that duplicates come often and from far back
    subjects = ["tides", "the harbour wall", "the lighthouse", "the ferry", "the storm"]
    docs = []
    for i in range(count):
        subject = subjects[i % len(subjects)]
        tail = "" if i % 3 else f" in year {i}"
        docs.append((f"What do we know about {subject} of Brest{tail}", f"{LONG} Number {i}."))
    return write(path, docs)


@pytest.mark.parametrize("mode", ["mark", "drop"])
def test_a_resumed_run_marks_what_an_uninterrupted_run_does(
    tmp_path: Path, mode: str
) -> None:
    server = ServerProcess("--echo", "--token-delay", "0.01", "--n-parallel", "4")
    try:
        many_documents(tmp_path / "in.jsonl", 150)
        common = ("--target", server.target, "--num-generations", "2", "--concurrency", "1",
                  "--dedup", mode)
        whole = tmp_path / "whole.jsonl"
        result = genstruct("generate", str(tmp_path / "in.jsonl"), "-o", str(whole), *common,
                           "--no-progress")
        assert result.returncode == 0, result.stderr
        cut = tmp_path / "cut.jsonl"
        process = start_genstruct("generate", str(tmp_path / "in.jsonl"), "-o", str(cut),
                                  *common)
        wait_progress(process, 60)
        process.send_signal(signal.SIGKILL)
        code, _ = finish(process)
        assert code == -signal.SIGKILL
        assert 0 < len(output_records(cut)) < len(output_records(whole))
        result = genstruct("generate", str(tmp_path / "in.jsonl"), "-o", str(cut), *common,
                           "--no-progress")
        assert result.returncode == 0, result.stderr
        assert "already done by an earlier run" in result.stderr
        for name in ("", ".duplicates"):
            made = [tmp_path / f"{stem}{name}.jsonl" for stem in ("whole", "cut")]
            assert made[0].exists() == made[1].exists() == (name == "" or mode == "drop")
            if made[0].exists():
                first, second = (id_marks(output_records(path)) for path in made)
                assert first == second
        marked = id_marks(output_records(
            tmp_path / ("whole.jsonl" if mode == "mark" else "whole.duplicates.jsonl")
        ))
        # duplicates within documents, and of documents far back
        assert sum(mark is not None for mark in marked.values()) > 150
    finally:
        server.close()


def test_merge_finds_duplicates_across_shards_and_writes_one_card(
    echo_server: ServerProcess, tmp_path: Path
) -> None:
    many_documents(tmp_path / "in.jsonl", 40)
    for index in range(2):
        result = genstruct("generate", str(tmp_path / "in.jsonl"), "-o",
                           str(tmp_path / "shards" / "out-{shard}.jsonl"), "--shard",
                           f"{index}/2", "--target", echo_server.target, "--concurrency", "1",
                           "--no-progress", "--no-card")
        assert result.returncode == 0, result.stderr
    shard_marks = [id_marks(output_records(tmp_path / "shards" / f"out-{i}.jsonl"))
                   for i in range(2)]
    merged = tmp_path / "merged.jsonl"
    result = genstruct("merge", str(tmp_path / "shards"), "-o", str(merged))
    assert result.returncode == 0, result.stderr
    rows = id_marks(output_records(merged))
    assert len(rows) == 40
    # within a shard, as the shard marked it; across shards, a question of shard 1 that
    # shard 0 asked already is marked now
    assert all(rows[key] == mark for key, mark in shard_marks[0].items())
    first_shard_kept = {key for key, mark in shard_marks[0].items() if mark is None}
    crossed = {key: rows[key] for key, mark in shard_marks[1].items()
               if mark is None and rows[key] is not None}
    assert crossed and all(mark in first_shard_kept for mark in crossed.values())
    assert f"{len(crossed)} pairs nearly repeat a question of an earlier shard" in result.stderr
    assert (tmp_path / "merged.card" / "README.md").exists()
