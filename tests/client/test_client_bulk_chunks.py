"""`genstruct generate --chunk`: rows per part of each document, resumed exactly per
(id, part, generation), against fake-engine servers (one token per character)."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from genstruct_client.bulk import derive_id
from genstruct_client.bulk.writers import CHUNK_COLUMNS, COLUMNS

from tests.client.helpers import (
    ServerProcess,
    finish,
    genstruct,
    output_records,
    start_genstruct,
    wait_progress,
)

SENTENCES = [
    "The survey counted {n} nesting pairs on the north cliffs this spring.",
    "Most of them were kittiwakes, with a few fulmars on the higher ledges.",
    "Rats had reached the island by boat, and the colony shrank for years.",
    "Since the trapping began the number of chicks that fledge has doubled.",
]


def write_long(path: Path, count: int) -> dict[str, str]:
    """`count` documents of four paragraphs each; returns id -> content."""
    docs = {}
    with path.open("w") as file:
        for i in range(count):
            content = "\n\n".join(s.format(n=100 + i) for s in SENTENCES)
            title = f"Seabird survey {i}"
            file.write(json.dumps({"title": title, "content": content}) + "\n")
            docs[derive_id(title, content)] = content
    return docs


def assert_every_part_once(
    records: list[dict[str, Any]], docs: dict[str, str], generations: int = 1
) -> None:
    counts = Counter((r["id"], r["chunk_index"], r["generation_index"]) for r in records)
    assert not [key for key, n in counts.items() if n > 1], "a row written twice"
    for doc_id, content in docs.items():
        mine = [r for r in records if r["id"] == doc_id]
        parts = {r["chunks"] for r in mine}
        assert len(parts) == 1
        (n_parts,) = parts
        assert {(r["chunk_index"], r["generation_index"]) for r in mine} == {
            (c, g) for c in range(n_parts) for g in range(generations)
        }
        paragraphs = content.split("\n\n")
        for r in mine:  # the span is one of this document's paragraphs (each is a part)
            assert content[r["chunk_start"] : r["chunk_end"]] in paragraphs


ARGS = ("--chunk", "--chunk-tokens", "80", "--chunk-overlap", "0")


def test_rows_carry_their_part_and_each_part_gives_pairs(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    docs = write_long(tmp_path / "in.jsonl", 5)
    output = tmp_path / "out.jsonl"
    result = genstruct("generate", str(tmp_path / "in.jsonl"), "-o", str(output), "--target",
                       server_process.target, "--no-progress", "--num-generations", "2", *ARGS)
    assert result.returncode == 0, result.stderr
    records = output_records(output)
    assert len(records) == 5 * 4 * 2  # every paragraph is a part (80 characters each)
    assert_every_part_once(records, docs, generations=2)
    assert list(records[0])[len(COLUMNS) :] == list(CHUNK_COLUMNS)  # after the pair's own


def test_a_half_written_document_gets_only_its_missing_parts(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    docs = write_long(tmp_path / "in.jsonl", 3)
    output = tmp_path / "out.jsonl"
    args = ("generate", str(tmp_path / "in.jsonl"), "-o", str(output), "--target",
            server_process.target, "--no-progress", *ARGS)
    assert genstruct(*args).returncode == 0
    lines = output.read_text().splitlines()
    output.write_text("\n".join(lines[:6]) + "\n")  # as a crash leaves it: 1.5 documents
    result = genstruct(*args)
    assert result.returncode == 0, result.stderr
    assert_every_part_once(output_records(output), docs)  # nothing twice, nothing missing
    assert len(output_records(output)) == 3 * 4


def test_another_part_size_is_another_run(server_process: ServerProcess, tmp_path: Path) -> None:
    write_long(tmp_path / "in.jsonl", 2)
    output = tmp_path / "out.jsonl"
    base = ("generate", str(tmp_path / "in.jsonl"), "-o", str(output), "--target",
            server_process.target, "--no-progress", "--chunk")
    assert genstruct(*base, "--chunk-tokens", "80").returncode == 0
    refused = genstruct(*base, "--chunk-tokens", "160")
    assert refused.returncode == 2
    assert "chunking.chunk_tokens 80 -> 160" in refused.stderr
    both = genstruct(*base, "--truncate")
    assert both.returncode == 2 and "exclude each other" in both.stderr


@pytest.fixture
def slow_server() -> Iterator[ServerProcess]:
    process = ServerProcess("--token-delay", "0.01", "--n-parallel", "8")
    yield process
    process.close()


def test_killed_in_the_middle_of_chunked_documents_and_resumed(
    slow_server: ServerProcess, tmp_path: Path
) -> None:
    docs = write_long(tmp_path / "in.jsonl", 60)
    output = tmp_path / "out.jsonl"
    args = ("generate", str(tmp_path / "in.jsonl"), "-o", str(output), "--target",
            slow_server.target, "--concurrency", "8", *ARGS)
    process = start_genstruct(*args)
    wait_progress(process, 10)
    process.send_signal(signal.SIGKILL)
    code, _ = finish(process)
    assert code == -signal.SIGKILL
    written = len(output_records(output))
    assert 0 < written < 60 * 4
    result = genstruct(*args, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert_every_part_once(output_records(output), docs)
