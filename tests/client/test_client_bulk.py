"""The sync client, the bulk runner and the `genstruct` command against server subprocesses."""

from __future__ import annotations

import csv
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from genstruct_client import ChannelConfig, Document, GenerationOptions, GenstructClient
from genstruct_client.bulk import derive_id, run
from genstruct_client.bulk.writers import COLUMNS

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
from tests.client.test_client_bulk_files import RECORDS, write_input


def test_sync_client(server_process: ServerProcess) -> None:
    with GenstructClient(server_process.target) as client:
        client.wait_ready(30)
        assert client.health(timeout=10) == "SERVING"
        assert client.model_info(timeout=10).model_name == "fake-model:Q4_K_M"
        response = client.generate(Document("t", "c", "x"), GenerationOptions(num_generations=2))
        assert [p.index for p in response.pairs] == [0, 1]
        messages = list(client.generate_stream(Document("t", "c", "y"), timeout=10))
        assert messages[-1].result.id == "y"
        batch = list(client.generate_batch(
            [GenerationOptions().request(Document("t", f"c{i}", f"b{i}")) for i in range(3)]
        ))
        assert sorted(r.id for r in batch) == ["b0", "b1", "b2"]
        docs = [Document("t", f"content {i}", f"m{i}") for i in range(40)]
        results = list(client.generate_many(docs, window=8))
        assert sorted(r.id for r in results) == sorted(d.id for d in docs)
        # Leaving early stops the work without hanging.
        for _ in client.generate_many(docs, window=4):
            break


@pytest.mark.parametrize("output_name", ["out.jsonl", "out.parquet"])
@pytest.mark.parametrize(
    ("fmt", "input_name"),
    [("jsonl", "in.jsonl"), ("csv", "in.csv"), ("parquet", "in.parquet"), ("hf", "ds"),
     ("hf-dict", "dsd")],
)
def test_every_input_and_output_format(
    server_process: ServerProcess, tmp_path: Path, fmt: str, input_name: str, output_name: str
) -> None:
    source = write_input(tmp_path / input_name, fmt, RECORDS)
    output = tmp_path / output_name
    summary = run(
        source, output, config=ChannelConfig(server_process.target),
        options=GenerationOptions(num_generations=2), progress=False,
    )
    assert summary.exit_code == 0 and summary.succeeded == 3 and summary.pairs_written == 6
    records = output_records(output)
    # The pair's columns, then the input's other columns.
    assert all(list(r) == [*COLUMNS, "key"] for r in records)
    ids = {derive_id(r["title"], r["content"]) for r in RECORDS}
    assert_exactly_once(records, ids, generations=2)
    keys = {derive_id(r["title"], r["content"]): r["key"] for r in RECORDS}
    assert all(r["key"] == keys[r["id"]] for r in records)
    by_id = {r["id"]: r for r in records}
    unicode = by_id[derive_id("Ünïcode", "Ça marche, 日本語も。")]
    assert unicode["content"] == "Ça marche, 日本語も。"
    assert unicode["user"] == "What is the document about?" and unicode["parsed"] is True
    assert unicode["assistant"] == "It is about testing."
    assert unicode["model_name"] == "fake-model:Q4_K_M" and unicode["finish_reason"] == "eos"
    assert unicode["prompt_tokens"] > 0 and unicode["completion_tokens"] == 12
    assert not (tmp_path / (output_name + ".journal.jsonl")).exists()
    # Run again: nothing to do, nothing written twice.
    again = run(source, output, config=ChannelConfig(server_process.target),
                options=GenerationOptions(num_generations=2), progress=False)
    assert again.already_done == 3 and again.succeeded == 0 and again.exit_code == 0
    assert_exactly_once(output_records(output), ids, generations=2)


def test_column_mapping_id_column_and_duplicates_on_the_command_line(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "in.csv"
    with source.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["key", "headline", "body"])
        writer.writerow(["k1", "Tides", "The moon pulls the sea."])
        writer.writerow(["k2", "Bees", "Bees dance."])
        writer.writerow(["k1", "Tides again", "Same key: processed once."])
    output = tmp_path / "out.jsonl"
    result = genstruct(
        "generate", str(source), "-o", str(output), "--target", server_process.target,
        "--title-column", "headline", "--content-column", "body", "--id-column", "key",
        "--temperature", "0.2", "--max-tokens", "64", "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "1 records repeat an id" in result.stderr
    records = output_records(output)
    assert_exactly_once(records, {"k1", "k2"})
    assert {r["id"]: r["title"] for r in records} == {"k1": "Tides", "k2": "Bees"}
    # Derived ids: the same title and content twice is one document.
    source = tmp_path / "dup.jsonl"
    source.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[0]) + "\n")
    summary = run(source, tmp_path / "dup-out.jsonl",
                  config=ChannelConfig(server_process.target), progress=False)
    assert summary.duplicates == 1 and summary.succeeded == 1


def test_usage_errors_exit_2(server_process: ServerProcess, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", "jsonl", RECORDS)
    result = genstruct("generate", str(source), "-o", str(tmp_path / "o.jsonl"),
                       "--target", server_process.target, "--content-column", "body")
    assert result.returncode == 2 and "no column 'body'" in result.stderr
    result = genstruct("generate", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl"),
                       "--target", server_process.target)
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = genstruct("generate", str(source), "--target", server_process.target)
    assert result.returncode == 2  # argparse: -o is required


def test_per_document_errors_go_to_the_errors_file(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    lines = [json.dumps({"title": "ok", "content": f"fine {i}"}) for i in range(5)]
    lines.insert(2, "this is not json")
    lines.append(json.dumps({"title": "long", "content": "x" * 5000}))  # over the server limit
    lines.append(json.dumps({"title": "blank", "content": "   "}))
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.jsonl"
    args = ("generate", str(source), "-o", str(output), "--target", server_process.target,
            "--no-progress")
    result = genstruct(*args)
    assert result.returncode == 1, result.stderr
    assert "3 documents failed (INVALID_ARGUMENT 3)" in result.stderr
    errors = output_records(tmp_path / "out.errors.jsonl")
    assert sorted(e["id"] for e in errors) == sorted(
        ["row:3", derive_id("long", "x" * 5000), derive_id("blank", "   ")]
    )
    assert all(e["code"] == "INVALID_ARGUMENT" and e["message"] and not e["retryable"]
               for e in errors)
    # the server's reason and field next to the message; a row that did not read has none
    assert sorted((e["id"], e["reason"], e["field"]) for e in errors) == sorted([
        ("row:3", None, None),
        (derive_id("long", "x" * 5000), "FIELD_INVALID", "document.content"),
        (derive_id("blank", "   "), "FIELD_INVALID", "document.content"),
    ])
    assert len(output_records(output)) == 5
    # A rerun does not try them again and does not repeat them, and still says they failed.
    result = genstruct(*args)
    assert result.returncode == 1
    assert "3 documents failed for good in an earlier run" in result.stderr
    assert len((tmp_path / "out.errors.jsonl").read_text().splitlines()) == 3
    assert len(output_records(output)) == 5


def test_missing_generations_of_a_document_are_completed(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    source = write_input(tmp_path / "in.jsonl", "jsonl", RECORDS)
    output = tmp_path / "out.jsonl"
    first_id = derive_id(RECORDS[0]["title"], RECORDS[0]["content"])
    options = GenerationOptions(num_generations=3)
    # A run of nothing writes the run record; then, as if a crash had left generation 1 of
    # the first document only.
    (tmp_path / "empty.jsonl").write_text("")
    run(tmp_path / "empty.jsonl", output, config=ChannelConfig(server_process.target),
        options=options, progress=False)
    output.write_text(json.dumps({"id": first_id, "generation_index": 1, "user": "kept"}) + "\n")
    summary = run(source, output, config=ChannelConfig(server_process.target),
                  options=options, progress=False)
    assert summary.exit_code == 0 and summary.pairs_written == 8
    records = output_records(output)
    ids = {derive_id(r["title"], r["content"]) for r in RECORDS}
    assert_exactly_once(records, ids, generations=3)
    assert records[0]["user"] == "kept"


def test_torn_last_line_is_repaired_on_resume(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    write_documents(source, 20)
    output = tmp_path / "out.jsonl"
    args = ("generate", str(source), "-o", str(output), "--target", server_process.target,
            "--no-progress")
    assert genstruct(*args).returncode == 0
    data = output.read_bytes()
    output.write_bytes(data[: len(data) - 25])  # a crash in the middle of the last line
    result = genstruct(*args)
    assert result.returncode == 0, result.stderr
    assert "torn last line" in result.stderr
    records = output_records(output)
    assert_exactly_once(records, {r["id"] for r in records} | {
        derive_id(f"doc {i}", f"Paragraph number {i} about doc things.") for i in range(20)
    })
    assert len(records) == 20


@pytest.fixture
def slow_server() -> Iterator[ServerProcess]:
    process = ServerProcess("--token-delay", "0.01", "--n-parallel", "8")
    yield process
    process.close()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
@pytest.mark.parametrize("output_name", ["out.jsonl", "out.parquet"])
def test_resume_after_the_client_is_killed(
    slow_server: ServerProcess, tmp_path: Path, how: signal.Signals, output_name: str
) -> None:
    source = tmp_path / "in.jsonl"
    records = write_documents(source, 200)
    output = tmp_path / output_name
    args = ("generate", str(source), "-o", str(output), "--target", slow_server.target,
            "--concurrency", "16")
    process = start_genstruct(*args)
    wait_progress(process, 40)
    process.send_signal(how)
    code, err = finish(process)
    if how == signal.SIGINT:
        assert code == 1 and "interrupted" in err
    else:
        assert code == -signal.SIGKILL
    result = genstruct(*args, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "already done by an earlier run" in result.stderr
    ids = {derive_id(r["title"], r["content"]) for r in records}
    assert_exactly_once(output_records(output), ids)


def test_resume_after_the_server_is_killed(slow_server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    records = write_documents(source, 200)
    output = tmp_path / "out.jsonl"
    process = start_genstruct("generate", str(source), "-o", str(output),
                              "--target", slow_server.target, "--concurrency", "16")
    wait_progress(process, 50)
    slow_server.kill()
    slow_server.restart()
    code, err = finish(process)
    assert code == 0, err
    ids = {derive_id(r["title"], r["content"]) for r in records}
    assert_exactly_once(output_records(output), ids)


def test_a_run_out_of_retry_budget_exits_1_and_a_rerun_resumes_it(tmp_path: Path) -> None:
    """The server goes away for good: the run stops once --retry-budget is spent, unfinished;
    the same command, with a server back, finishes it; a later rerun takes `finished` off the
    run record while it runs and puts it back at its end."""
    server = ServerProcess("--token-delay", "0.01", "--n-parallel", "8")
    try:
        source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        records = write_documents(source, 200)
        record = output.with_name(output.name + ".run.json")
        args = ("generate", str(source), "-o", str(output), "--target", server.target,
                "--concurrency", "16", "--retry-budget", "2")
        process = start_genstruct(*args)
        wait_progress(process, 40)
        server.kill()
        code, err = finish(process, timeout=60)
        assert code == 1, err
        assert "stopped:" in err and "rerun the same command" in err, err
        assert "finished" not in json.loads(record.read_text())
        written = len(output_records(output))
        assert 40 <= written < len(records)

        server.restart()
        result = genstruct(*args, "--no-progress")
        assert result.returncode == 0, result.stderr
        assert f"{written} documents already done by an earlier run" in result.stderr
        ids = {derive_id(r["title"], r["content"]) for r in records}
        assert_exactly_once(output_records(output), ids)
        assert "finished" in json.loads(record.read_text())

        # More documents in the input: the rerun resumes the output, unfinished while it runs.
        more = write_documents(tmp_path / "more.jsonl", 200, prefix="more")
        with source.open("a") as extra:
            extra.write((tmp_path / "more.jsonl").read_text())
        process = start_genstruct(*args)
        wait_progress(process, 220)  # past the 200 done before: it is writing new ones
        assert "finished" not in json.loads(record.read_text())
        code, err = finish(process, timeout=120)
        assert code == 0, err
        assert "finished" in json.loads(record.read_text())
        ids |= {derive_id(r["title"], r["content"]) for r in more}
        assert_exactly_once(output_records(output), ids)
    finally:
        server.close()


def test_thousand_documents_with_the_server_killed_twice(tmp_path: Path) -> None:
    """The issue's "done when": 1,000 documents, two server kills, each id exactly once."""
    server = ServerProcess("--token-delay", "0.004", "--n-parallel", "16",
                           "--max-batch-in-flight", "32")
    try:
        source = tmp_path / "documents.jsonl"
        records = write_documents(source, 1000)
        output = tmp_path / "pairs.jsonl"
        process = start_genstruct("generate", str(source), "-o", str(output),
                                  "--target", server.target, "--concurrency", "32")
        wait_progress(process, 300)
        server.kill()
        server.restart()
        wait_progress(process, 650)
        server.kill()
        server.restart()
        code, err = finish(process)
        assert code == 0, err
        ids = {derive_id(r["title"], r["content"]) for r in records}
        assert len(ids) == 1000
        assert_exactly_once(output_records(output), ids)
    finally:
        server.close()


def test_round_robin_over_three_servers_one_stopped_mid_run(tmp_path: Path) -> None:
    # One model (a run refuses replicas of different ones); each replica answers its name.
    servers = [ServerProcess("--token-delay", "0.01", "--answer", f"replica-{i}")
               for i in range(3)]
    try:
        source = tmp_path / "in.jsonl"
        records = write_documents(source, 400)
        output = tmp_path / "out.jsonl"
        process = start_genstruct(
            "generate", str(source), "-o", str(output), "--concurrency", "8",
            *[arg for s in servers for arg in ("--target", s.target)],
        )
        wait_progress(process, 100)
        # Stop a replica that is doing work (one whose pairs are in the output already).
        busy = {r["assistant"] for r in output_records(output)}
        victim = next(s for i, s in enumerate(servers) if f"replica-{i}" in busy)
        victim.kill()
        code, err = finish(process)
        assert code == 0, err
        written = output_records(output)
        ids = {derive_id(r["title"], r["content"]) for r in records}
        assert_exactly_once(written, ids)
        # Streams are spread over the replicas (round_robin, a new stream every 64 documents).
        assert len({r["assistant"] for r in written}) == 3
    finally:
        for server in servers:
            server.close()


def test_health_and_info_commands(server_process: ServerProcess) -> None:
    result = genstruct("health", "--target", server_process.target)
    assert result.returncode == 0 and result.stdout.strip() == "SERVING"
    result = genstruct("info", "--target", server_process.target)
    assert result.returncode == 0
    assert json.loads(result.stdout)["modelName"] == "fake-model:Q4_K_M"
    loading = ServerProcess("--loading")
    try:
        result = genstruct("health", "--target", loading.target)
        assert result.returncode == 1 and result.stdout.strip() == "NOT_SERVING"
        result = genstruct("info", "--target", loading.target, "--timeout", "3")
        assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
    finally:
        loading.close()
    result = genstruct("health", "--target", "127.0.0.1:1", "--timeout", "2")
    assert result.returncode == 1


def test_health_with_token_and_env_target() -> None:
    server = ServerProcess("--auth-token", "t")
    try:
        env = dict(ENV, GENSTRUCT_TARGET=server.target, GENSTRUCT_TOKEN="t")
        result = genstruct("health", env=env)
        assert result.returncode == 0, result.stderr
        # Health is open to probes without a token, so `info` shows the token from the
        # environment is the one sent: right, it is let in; wrong, it is refused.
        assert genstruct("info", env=env).returncode == 0
        wrong = genstruct("info", env=dict(env, GENSTRUCT_TOKEN="not-t"))
        assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
        assert genstruct("health", env=dict(env, GENSTRUCT_TOKEN="not-t")).returncode == 0
    finally:
        server.close()


@pytest.mark.parametrize("mutual", [False, True])
def test_the_command_lines_tls_flags_against_a_tls_server(tmp_path: Path, mutual: bool) -> None:
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    served = ca.issue_cert("localhost", "127.0.0.1")
    served.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    served.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    own = ca.issue_cert("client")
    own.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    own.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    flags = ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key")]
    if mutual:
        flags += ["--tls-client-ca", str(tmp_path / "ca.pem")]
    server = ServerProcess(*flags)
    try:
        roots = ["--target", server.target, "--ca-cert", str(tmp_path / "ca.pem"),
                 "--server-name", "localhost"]
        tls = roots + (["--cert", str(tmp_path / "client.pem"), "--key",
                        str(tmp_path / "client.key")] if mutual else [])
        result = genstruct("health", *tls, "--timeout", "10")
        assert result.returncode == 0 and result.stdout.strip() == "SERVING", result.stderr
        result = genstruct("info", *tls)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["modelName"] == "fake-model:Q4_K_M"
        source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        records = write_documents(source, 3)
        result = genstruct("generate", str(source), "-o", str(output), *tls)
        assert result.returncode == 0, result.stderr
        assert_exactly_once(output_records(output),
                            {derive_id(r["title"], r["content"]) for r in records})
        # Refused: no TLS at all; TLS with the system's roots (not this CA); and, where the
        # server asks for one, no client certificate.
        refused = [["--target", server.target], ["--target", server.target, "--tls"]]
        if mutual:
            refused.append(roots)
        for wrong in refused:
            result = genstruct("info", *wrong, "--timeout", "5")
            assert result.returncode == 1 and "UNAVAILABLE" in result.stderr, (wrong, result)
    finally:
        server.close()


def test_sync_generate_errors_surface(server_process: ServerProcess) -> None:
    with GenstructClient(server_process.target) as client, pytest.raises(grpc.RpcError) as info:
        client.generate(Document("t", "x" * 5000), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deadline_is_explained_and_checked(tmp_path: Path) -> None:
    help_text = " ".join(genstruct("generate", "--help").stdout.split())
    assert "--deadline DEADLINE seconds one document may take at the server, from when the " \
        "server reads it" in help_text
    assert "stops that document only" in help_text
    source = write_input(tmp_path / "in.jsonl", "jsonl", RECORDS)
    result = genstruct("generate", str(source), "-o", str(tmp_path / "o.jsonl"), "--deadline",
                       "0", "--target", "127.0.0.1:1")
    assert result.returncode == 2 and "--deadline must be a positive" in result.stderr
    assert "Traceback" not in result.stderr


def test_columns_default_to_title_and_content(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    # Decoys that a wrong default would pick up: the pair must come from title and content.
    records = [{"headline": "H", "body": "B", "content": "The moon pulls the sea.",
                "title": "Tides", "text": "T"}]
    source = write_input(tmp_path / "in.jsonl", "jsonl", records)
    for output, run_it in [
        (tmp_path / "cli.jsonl", lambda out: genstruct(
            "generate", str(source), "-o", str(out), "--target", server_process.target,
            "--no-progress").returncode),
        (tmp_path / "lib.jsonl", lambda out: run(
            source, out, config=ChannelConfig(server_process.target), progress=False
        ).exit_code),
    ]:
        assert run_it(output) == 0
        (row,) = output_records(output)
        assert (row["title"], row["content"]) == ("Tides", "The moon pulls the sea.")
        assert row["id"] == derive_id("Tides", "The moon pulls the sea.")  # no id column
    # Without a `content` column the default is refused, naming the column to map.
    missing = write_input(tmp_path / "bad.jsonl", "jsonl", [{"title": "t", "body": "b"}])
    result = genstruct("generate", str(missing), "-o", str(tmp_path / "bad_out.jsonl"),
                       "--target", server_process.target, "--no-progress")
    assert result.returncode != 0 and "content" in result.stderr and "--content-column" in (
        result.stderr
    )


def test_token_flags(tmp_path: Path) -> None:
    server = ServerProcess("--auth-token", "s3cret")
    try:
        source = write_input(tmp_path / "in.jsonl", "jsonl", RECORDS)
        base = ("generate", str(source), "-o", str(tmp_path / "o.jsonl"), "--target",
                server.target, "--no-progress", "--retry-budget", "5")
        refused = genstruct(*base)
        # GetModelInfo, asked before anything is written or sent, is refused.
        assert refused.returncode == 1 and "stopped:" in refused.stderr
        assert "UNAUTHENTICATED" in refused.stderr
        assert not (tmp_path / "o.jsonl").exists()
        result = genstruct("info", "--target", server.target)
        assert result.returncode == 1 and "UNAUTHENTICATED" in result.stderr
        (tmp_path / "token").write_text("s3cret\n")
        assert genstruct(*base, "--token-file", str(tmp_path / "token")).returncode == 0
        result = genstruct("info", "--target", server.target, "--token", "s3cret")
        assert result.returncode == 0, result.stderr
    finally:
        server.close()
