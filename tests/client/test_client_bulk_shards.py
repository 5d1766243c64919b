"""Sharded runs: `--shard I/N` and JOB_COMPLETION_INDEX, shards as separate processes (one killed
and rerun), and `genstruct merge`, which takes only finished shards of one configuration."""

from __future__ import annotations

import json
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from genstruct_client.bulk import Shard, UsageError, derive_id, shard_of
from genstruct_client.bulk.run_record import record_path

from tests.client.helpers import (
    ENV,
    ServerProcess,
    assert_exactly_once,
    finish,
    genstruct,
    output_records,
    start_genstruct,
    wait_progress,
    write_documents,
)


@pytest.fixture
def three_servers() -> Iterator[list[ServerProcess]]:
    # Slow enough that a shard can be killed before it finishes.
    servers = [ServerProcess("--token-delay", "0.01", "--n-parallel", "4") for _ in range(3)]
    yield servers
    for server in servers:
        server.close()


def ids_of(records: list[dict[str, str]]) -> set[str]:
    return {derive_id(r["title"], r["content"]) for r in records}


def test_a_shard_is_parsed_0_based_and_read_from_an_indexed_job() -> None:
    assert Shard.parse("2/3") == Shard(2, 3)
    for bad in ("3/3", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(UsageError):
            Shard.parse(bad)
    assert Shard.from_env({}) is None
    assert Shard.from_env({"JOB_COMPLETION_INDEX": "1", "GENSTRUCT_SHARDS": "4"}) == Shard(1, 4)
    assert Shard.from_env({"JOB_COMPLETION_INDEX": "0", "JOB_COMPLETIONS": "2"}) == Shard(0, 2)
    with pytest.raises(UsageError, match="GENSTRUCT_SHARDS"):
        Shard.from_env({"JOB_COMPLETION_INDEX": "1"})


def test_every_id_has_one_shard_and_the_shards_share_them() -> None:
    ids = [f"doc-{i}" for i in range(3000)]
    counts = [sum(1 for doc_id in ids if shard_of(doc_id, 3) == i) for i in range(3)]
    assert sum(counts) == len(ids) and min(counts) > 900  # sha256: close to even
    assert all(Shard(shard_of(doc_id, 3), 3).takes(doc_id) for doc_id in ids)
    assert shard_of("doc-1", 3) == 1  # pinned: the same in every process, on every machine


def test_three_shard_processes_one_killed_and_rerun_merge_each_pair_once(
    three_servers: list[ServerProcess], tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    records = write_documents(source, 150)
    ids = ids_of(records)
    out = tmp_path / "out"

    def args(index: int) -> tuple[str, ...]:
        return ("generate", str(source), "-o", str(out / "pairs-{shard}.jsonl"),
                "--shard", f"{index}/3", "--target", three_servers[index].target,
                "--concurrency", "4")

    processes = [start_genstruct(*args(index)) for index in range(3)]
    wait_progress(processes[1], 75)  # half the input read: some of shard 1 written, not all
    processes[1].send_signal(signal.SIGKILL)
    for index, process in enumerate(processes):
        code, err = finish(process)
        assert code == (-signal.SIGKILL if index == 1 else 0), err

    killed = out / "pairs-1.jsonl"
    shard_ids = {doc_id for doc_id in ids if shard_of(doc_id, 3) == 1}
    assert 0 < len(output_records(killed)) < len(shard_ids)
    refused = genstruct("merge", str(out), "-o", str(tmp_path / "merged.jsonl"))
    assert refused.returncode == 2
    assert "shard 1/3" in refused.stderr and "unfinished" in refused.stderr
    assert not (tmp_path / "merged.jsonl").exists()

    rerun = genstruct(*args(1), "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    assert "already done by an earlier run" in rerun.stderr
    assert json.loads(record_path(killed).read_text())["finished"]

    for name in ("merged.jsonl", "merged.parquet"):
        merged = genstruct("merge", str(out), "-o", str(tmp_path / name))
        assert merged.returncode == 0, merged.stderr
        assert_exactly_once(output_records(tmp_path / name), ids)
    for index in range(3):  # each shard wrote its own documents only
        written = {r["id"] for r in output_records(out / f"pairs-{index}.jsonl")}
        assert written == {doc_id for doc_id in ids if shard_of(doc_id, 3) == index}


def test_a_shards_documents_do_not_depend_on_the_input_order(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    source, shuffled = tmp_path / "in.jsonl", tmp_path / "shuffled.jsonl"
    records = write_documents(source, 60)
    lines = source.read_text().splitlines(keepends=True)
    random.Random(7).shuffle(lines)
    shuffled.write_text("".join(lines))
    written = []
    for name, path in (("a", source), ("b", shuffled)):
        output = tmp_path / f"{name}.jsonl"
        result = genstruct("generate", str(path), "-o", str(output), "--shard", "2/3",
                           "--target", server_process.target, "--no-progress")
        assert result.returncode == 0, result.stderr
        written.append({r["id"] for r in output_records(output)})
    expected = {doc_id for doc_id in ids_of(records) if shard_of(doc_id, 3) == 2}
    assert written[0] == written[1] == expected


def test_the_shard_comes_from_job_completion_index(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    records = write_documents(source, 30)
    base = ("generate", str(source), "--target", server_process.target, "--no-progress")
    env = dict(ENV, JOB_COMPLETION_INDEX="1", GENSTRUCT_SHARDS="2")
    result = genstruct(*base, "-o", str(tmp_path / "pairs-{shard}.jsonl"), env=env)
    assert result.returncode == 0, result.stderr
    expected = {doc_id for doc_id in ids_of(records) if shard_of(doc_id, 2) == 1}
    assert {r["id"] for r in output_records(tmp_path / "pairs-1.jsonl")} == expected
    # Every pod of the Job would write one file: refused.
    same_file = genstruct(*base, "-o", str(tmp_path / "pairs.jsonl"), env=env)
    assert same_file.returncode == 2 and "{shard}" in same_file.stderr
    no_count = genstruct(*base, "-o", str(tmp_path / "p-{shard}.jsonl"),
                         env=dict(ENV, JOB_COMPLETION_INDEX="1"))
    assert no_count.returncode == 2 and "GENSTRUCT_SHARDS" in no_count.stderr


def test_merge_refuses_another_configuration_and_a_missing_shard_and_a_rerun_another_shard(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    write_documents(source, 20)
    base = ("generate", str(source), "--target", server_process.target, "--no-progress")
    first = genstruct(*base, "-o", str(tmp_path / "s0.jsonl"), "--shard", "0/2")
    assert first.returncode == 0, first.stderr
    missing = genstruct("merge", str(tmp_path / "s0.jsonl"), "-o", str(tmp_path / "m.jsonl"))
    assert missing.returncode == 2 and "shard 1/2 is missing" in missing.stderr

    other = genstruct(*base, "-o", str(tmp_path / "s1.jsonl"), "--shard", "1/2",
                      "--temperature", "0.2")
    assert other.returncode == 0, other.stderr
    refused = genstruct("merge", str(tmp_path), "-o", str(tmp_path / "m.jsonl"))
    assert refused.returncode == 2
    assert "shard 1/2" in refused.stderr and "sampling.temperature" in refused.stderr

    # The shard is part of the output's fingerprint.
    again = genstruct(*base, "-o", str(tmp_path / "s0.jsonl"), "--shard", "1/2")
    assert again.returncode == 2 and "shard.index 0 -> 1" in again.stderr


def test_merge_refuses_a_shard_given_twice_and_shards_of_different_counts(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    write_documents(source, 20)
    base = ("generate", str(source), "--target", server_process.target, "--no-progress")
    for name, shard in (("a0", "0/2"), ("a1", "1/2"), ("b0", "0/2"), ("c1", "1/3")):
        made = genstruct(*base, "-o", str(tmp_path / f"{name}.jsonl"), "--shard", shard)
        assert made.returncode == 0, made.stderr
    merged = tmp_path / "m.jsonl"

    def merge(*names: str) -> subprocess.CompletedProcess[str]:
        return genstruct("merge", *(str(tmp_path / f"{n}.jsonl") for n in names),
                         "-o", str(merged))

    twice = merge("a0", "a1", "b0")
    assert twice.returncode == 2 and "are the same shard" in twice.stderr, twice.stderr
    assert "shard 0/2" in twice.stderr
    counts = merge("a0", "c1")
    assert counts.returncode == 2 and "is one of 3 shards" in counts.stderr, counts.stderr
    assert not merged.exists()  # refused before a row was written
    done = merge("a0", "a1")  # the same shards, each once: merged
    assert done.returncode == 0, done.stderr
    assert len(output_records(merged)) == 20


def test_parquet_shards_merge_into_jsonl(server_process: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    records = write_documents(source, 24)
    for index in range(2):
        result = genstruct("generate", str(source), "-o", str(tmp_path / "s-{shard}.parquet"),
                           "--shard", f"{index}/2", "--target", server_process.target,
                           "--no-progress", "--num-generations", "2")
        assert result.returncode == 0, result.stderr
    merged = tmp_path / "merged.jsonl"
    result = genstruct("merge", str(tmp_path / "s-0.parquet"), str(tmp_path / "s-1.parquet"),
                       "-o", str(merged))
    assert result.returncode == 0, result.stderr
    assert_exactly_once(output_records(merged), ids_of(records), generations=2)
    record = json.loads(record_path(merged).read_text())
    assert "shard" not in record["fingerprint"] and len(record["merged_from"]) == 2
    again = genstruct("merge", str(tmp_path), "-o", str(merged))  # not its own earlier merge
    assert again.returncode == 0, again.stderr
    assert_exactly_once(output_records(merged), ids_of(records), generations=2)
