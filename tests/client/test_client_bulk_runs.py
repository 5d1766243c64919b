"""One configuration per output: the run record (OUTPUT.run.json), reruns that resume or are
refused, --new-run, and servers that serve another model."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from genstruct.v1 import genstruct_pb2 as pb
from genstruct_client import ChannelConfig, GenerationOptions, ResubmitPolicy
from genstruct_client import card as card_module
from genstruct_client.bulk import PROMPT_TEMPLATE_VERSION, ColumnMapping, derive_id, run
from genstruct_client.bulk.run_record import (
    addresses,
    differences,
    fingerprint,
    record_path,
    server_infos,
)
from genstruct_client.bulk.writers import JsonlJournal
from genstruct_service.server import RunningServer

from tests.client.helpers import (
    ROOT,
    ServerProcess,
    assert_exactly_once,
    finish,
    genstruct,
    output_records,
    start_genstruct,
    wait_progress,
    write_documents,
)

DERIVED = ColumnMapping(id="")  # ids derived from the text, the default columns
TEMPLATE = ROOT / "service" / "genstruct_service" / "templates" / "genstruct.jinja"
# The template PROMPT_TEMPLATE_VERSION names. A change to the template fails this test: bump
# the version (outputs made with the old prompt must not be resumed with the new), then this.
TEMPLATE_SHA256 = {
    "genstruct/1": "e0cc5007dd6114c63440b34cc2ea4dcb976468161ee58ebc20a321277ebd9dcd",
}


@pytest.fixture(scope="module")
def other_model() -> Iterator[ServerProcess]:
    process = ServerProcess("--model-name", "other-model:Q8_0")
    yield process
    process.close()


def ids_of(records: list[dict[str, str]]) -> set[str]:
    return {derive_id(r["title"], r["content"]) for r in records}


def test_the_prompt_template_version_names_the_template() -> None:
    digest = hashlib.sha256(TEMPLATE.read_bytes()).hexdigest()
    assert TEMPLATE_SHA256.get(PROMPT_TEMPLATE_VERSION) == digest, (
        f"the Genstruct template changed (sha256 {digest}): bump PROMPT_TEMPLATE_VERSION "
        "in genstruct_client/bulk/run_record.py and record the new hash here"
    )


def info(**fields: Any) -> pb.GetModelInfoResponse:
    response = pb.GetModelInfoResponse(
        model_name="genstruct-7b:Q4_K_M", model_file="Genstruct-7B.Q4_K_M.gguf",
        quantization="Q4_K_M", parameter_count=7_241_732_096, architecture="llama",
        default_sampling=pb.SamplingParams(temperature=0.7, top_p=1.0, max_tokens=512),
    )
    for name, value in fields.items():
        if isinstance(value, pb.SamplingParams):
            getattr(response, name).CopyFrom(value)
        else:
            setattr(response, name, value)
    return response


@pytest.mark.parametrize(
    ("server", "options", "field"),
    [
        ({"model_file": "Genstruct-7B.Q8_0.gguf"}, {}, "model.model_file"),
        ({"quantization": "Q8_0"}, {}, "model.quantization"),
        ({}, {"temperature": 0.2}, "sampling.temperature"),
        ({}, {"max_tokens": 64}, "sampling.max_tokens"),
        ({}, {"seed": 1}, "sampling.seed"),
        ({}, {"stop": ("END",)}, "sampling.stop"),
        ({}, {"num_generations": 2}, "num_generations"),
        ({}, {"constrained": True}, "constrained"),
        ({}, {"truncate": True}, "truncation"),
    ],
)
def test_every_field_of_the_fingerprint_counts(
    server: dict[str, Any], options: dict[str, Any], field: str
) -> None:
    base = fingerprint(info(), GenerationOptions(), DERIVED)
    changed = differences(base, fingerprint(info(**server), GenerationOptions(**options), DERIVED))
    assert len(changed) == 1 and changed[0].startswith(field + " "), changed


@pytest.mark.parametrize(
    ("mapping", "change"),
    [
        (ColumnMapping(id="", title="heading"), 'columns.title "title" -> "heading"'),
        (ColumnMapping(id="", content="body"), 'columns.content "content" -> "body"'),
        (ColumnMapping(id="", columns=("source",)),
         'columns.passed_through ["*"] -> ["source"]'),
    ],
)
def test_the_column_mapping_is_part_of_the_fingerprint(mapping: ColumnMapping, change: str) -> None:
    # issue 34: a resume with another mapping silently mixed rows of both
    base = fingerprint(info(), GenerationOptions(), DERIVED)
    assert differences(base, fingerprint(info(), GenerationOptions(), mapping)) == [change]


def test_sampling_is_compared_as_in_force() -> None:
    # Unset is the server's default (sent as a 32-bit float): asking for it is no change...
    base = fingerprint(info(), GenerationOptions(), DERIVED)
    assert base["sampling"]["temperature"] == 0.7
    assert not differences(base, fingerprint(info(), GenerationOptions(temperature=0.7), DERIVED))
    # ... but a server whose default changed is one.
    moved = info(default_sampling=pb.SamplingParams(temperature=0.9, top_p=1.0, max_tokens=512))
    assert differences(base, fingerprint(moved, GenerationOptions(), DERIVED)) == [
        "sampling.temperature 0.7 -> 0.9"
    ]
    assert differences(base, fingerprint(info(), GenerationOptions(), ColumnMapping(id="id"))) == [
        'id_column null -> "id"'
    ]


def test_addresses_of_a_target() -> None:
    assert addresses("ipv4:10.0.0.1:1,10.0.0.2:2") == ["ipv4:10.0.0.1:1", "ipv4:10.0.0.2:2"]
    assert addresses("dns:///genstruct:50051") == ["dns:///genstruct:50051"]
    assert addresses("127.0.0.1:50051") == ["127.0.0.1:50051"]


async def test_a_server_that_does_not_answer_get_model_info_within_5_s_is_skipped(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One server answers at once; the other accepts the connection and never says a word.
    The run goes on with the first after 5 s, and says which one it did not check."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    quiet = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        config = ChannelConfig(target=f"ipv4:{server.target},{quiet}")
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            answers = await server_infos(config, ResubmitPolicy(budget_seconds=120))
        waited = time.monotonic() - started
    finally:
        silent.close()
    assert list(answers) == [f"ipv4:{server.target}"]
    assert 4.5 <= waited < 10, waited  # the 5 s, not the 120 s budget
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(quiet in m and "did not answer GetModelInfo" in m for m in warned), warned


def test_the_record_is_written_before_the_first_row(
    server_process: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.jsonl"
    write_documents(source, 5)
    output = tmp_path / "out.jsonl"
    appended: list[bool] = []
    append = JsonlJournal.append

    def checked(self: JsonlJournal, record: dict[str, Any]) -> None:
        if self.path == output:
            appended.append(record_path(output).exists())
        append(self, record)

    monkeypatch.setattr(JsonlJournal, "append", checked)
    summary = run(source, output, config=ChannelConfig(server_process.target),
                  options=GenerationOptions(temperature=0.2, num_generations=2), progress=False)
    assert summary.exit_code == 0
    assert appended == [True] * 10
    fingerprint = json.loads(record_path(output).read_text())["fingerprint"]
    assert fingerprint["model"] == {
        "model_name": "fake-model:Q4_K_M", "model_file": "fake-model.Q4_K_M.gguf",
        "quantization": "Q4_K_M", "parameter_count": 7_241_732_096, "architecture": "llama",
    }
    assert fingerprint["prompt_template"] == PROMPT_TEMPLATE_VERSION
    # Asked for, or the server's default (top_p), or a fresh seed per request.
    assert fingerprint["sampling"]["temperature"] == 0.2
    assert fingerprint["sampling"]["top_p"] == 1.0 and fingerprint["sampling"]["seed"] is None
    assert fingerprint["sampling"]["max_tokens"] > 0 and fingerprint["sampling"]["stop"] == []
    assert {key: fingerprint[key] for key in ("num_generations", "constrained", "truncation",
                                             "id_column")} == {
        "num_generations": 2, "constrained": False, "truncation": "refuse", "id_column": None
    }


def test_a_rerun_with_another_temperature_is_refused_and_the_same_one_resumes(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    documents = write_documents(source, 30)
    output = tmp_path / "out.jsonl"
    args = ("generate", str(source), "-o", str(output), "--target", server_process.target,
            "--no-progress", "--num-generations", "2")
    first = genstruct(*args, "--temperature", "0.2")
    assert first.returncode == 0, first.stderr
    # As if the run had stopped after 25 lines (a document may have one generation of two).
    kept = b"".join(output.read_bytes().splitlines(keepends=True)[:25])
    output.write_bytes(kept)
    record = record_path(output).read_bytes()

    refused = genstruct(*args, "--temperature", "0.9")
    assert refused.returncode == 2
    assert "sampling.temperature 0.2 -> 0.9" in refused.stderr, refused.stderr
    assert output.read_bytes() == kept and record_path(output).read_bytes() == record

    resumed = genstruct(*args, "--temperature", "0.2")
    assert resumed.returncode == 0, resumed.stderr
    assert "already done by an earlier run" in resumed.stderr
    assert output.read_bytes().startswith(kept)  # appended to, nothing rewritten
    assert_exactly_once(output_records(output), ids_of(documents), generations=2)
    # The same record (started, fingerprint), marked finished again when the run ends.
    after = json.loads(record_path(output).read_text())
    assert after.pop("finished")
    before = json.loads(record)
    before.pop("finished")
    assert after == before


def test_a_resume_under_another_rensa_is_refused_and_a_record_without_its_version_resumes(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    # rensa's MinHash digests decide which pairs are marked as duplicates: a resume under
    # another version could mark otherwise than the run it continues, silently
    source = tmp_path / "in.jsonl"
    documents = write_documents(source, 6)
    output = tmp_path / "out.jsonl"
    args = ("generate", str(source), "-o", str(output), "--target", server_process.target,
            "--no-progress")
    assert genstruct(*args).returncode == 0
    record = json.loads(record_path(output).read_text())
    dedup = record["fingerprint"]["curation"]["dedup"]
    assert dedup["library_version"] == importlib.metadata.version("rensa")
    kept = b"".join(output.read_bytes().splitlines(keepends=True)[:3])
    output.write_bytes(kept)

    dedup["library_version"] = "0.0.1"
    record_path(output).write_text(json.dumps(record))
    refused = genstruct(*args)
    assert refused.returncode == 2
    assert "curation.dedup.library_version" in refused.stderr, refused.stderr
    assert "pip install 'rensa==0.0.1'" in refused.stderr and "--new-run" in refused.stderr
    assert output.read_bytes() == kept

    # A record from before the version was kept: unknown, accepted, and left without one.
    del dedup["library_version"]
    record_path(output).write_text(json.dumps(record))
    resumed = genstruct(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert_exactly_once(output_records(output), ids_of(documents))
    after = json.loads(record_path(output).read_text())
    assert "library_version" not in after["fingerprint"]["curation"]["dedup"]


def counted_card_writes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The outputs whose card is written from now on."""
    written: list[Path] = []
    real = card_module.write_card

    def write_card(output: Path) -> Path:
        written.append(output)
        return real(output)

    monkeypatch.setattr(card_module, "write_card", write_card)
    return written


def card_files(readme: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(readme.parent.iterdir())}


def test_a_resume_that_writes_nothing_keeps_the_card(
    server_process: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # reading a million-row output again for the same card took a third of such a resume
    source = tmp_path / "in.jsonl"
    write_documents(source, 4)
    output = tmp_path / "out.jsonl"
    config = ChannelConfig(server_process.target)
    first = run(source, output, config=config, progress=False)
    readme = first.card
    assert readme is not None and not first.card_kept
    made = readme.stat().st_mtime_ns
    written = counted_card_writes(monkeypatch)

    again = run(source, output, config=config, progress=False)
    assert again.already_done == 4 and again.wrote_nothing
    assert written == [] and again.card == readme and again.card_kept
    assert readme.stat().st_mtime_ns == made and "unchanged" in again.report()
    # ... and it is the card its files make now: a run that did nothing adds no progress line
    kept = card_files(readme)
    card_module.write_card(output)
    assert card_files(readme) == kept

    # A card that does not give the output's counts is not its card as it is: written again.
    readme.write_text(readme.read_text().replace("pairs_generated: 4", "pairs_generated: 3"))
    third = run(source, output, config=config, progress=False)
    assert third.wrote_nothing and not third.card_kept
    assert written == [output, output] and "pairs_generated: 4" in readme.read_text()


def test_a_resume_that_adds_rows_writes_the_card_again(
    server_process: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.jsonl"
    write_documents(source, 3)
    output = tmp_path / "out.jsonl"
    config = ChannelConfig(server_process.target)
    readme = run(source, output, config=config, progress=False).card
    assert readme is not None and "    rows: 3\n" in readme.read_text()
    written = counted_card_writes(monkeypatch)
    write_documents(source, 5)  # the same 3, then 2 more

    again = run(source, output, config=config, progress=False)
    assert again.succeeded == 2 and not again.card_kept
    assert written == [output] and "    rows: 5\n" in readme.read_text()


def test_new_run_moves_the_old_run_aside(server_process: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    documents = write_documents(source, 4)
    output = tmp_path / "out.jsonl"
    args = ("generate", str(source), "-o", str(output), "--target", server_process.target,
            "--no-progress")
    assert genstruct(*args, "--temperature", "0.2").returncode == 0
    old_rows = output.read_bytes()
    started = json.loads(record_path(output).read_text())["started"]
    result = genstruct(*args, "--temperature", "0.9", "--new-run")
    assert result.returncode == 0, result.stderr
    assert "moved aside" in result.stderr
    stamp = started.replace("-", "").replace(":", "")
    moved = tmp_path / f"out.{stamp}.jsonl"
    assert moved.read_bytes() == old_rows
    assert (tmp_path / f"out.{stamp}.errors.jsonl").exists()
    old_record = json.loads(record_path(moved).read_text())
    assert old_record["fingerprint"]["sampling"]["temperature"] == 0.2
    new_record = json.loads(record_path(output).read_text())
    assert new_record["fingerprint"]["sampling"]["temperature"] == 0.9
    assert_exactly_once(output_records(output), ids_of(documents))
    # The old run stays whole: resumed under its new name with its settings, nothing to do.
    again = genstruct("generate", str(source), "-o", str(moved), "--target",
                      server_process.target, "--no-progress", "--temperature", "0.2")
    assert again.returncode == 0, again.stderr
    assert "4 documents already done" in again.stderr and moved.read_bytes() == old_rows


def test_an_output_without_a_record_is_refused(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    write_documents(source, 2)
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"id": "x", "generation_index": 0}) + "\n")
    args = ("generate", str(source), "-o", str(output), "--target", server_process.target,
            "--no-progress")
    refused = genstruct(*args)
    assert refused.returncode == 2 and "no run record" in refused.stderr, refused.stderr
    assert genstruct(*args, "--new-run").returncode == 0
    assert len(output_records(output)) == 2


def test_a_rerun_against_another_model_is_refused_before_sending(
    server_process: ServerProcess, other_model: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    write_documents(source, 3)
    output = tmp_path / "out.jsonl"
    base = ("generate", str(source), "-o", str(output), "--no-progress")
    assert genstruct(*base, "--target", server_process.target).returncode == 0
    written = output.read_bytes()
    # More documents to do, so that sending any would show in the output.
    write_documents(source, 6)
    refused = genstruct(*base, "--target", other_model.target)
    assert refused.returncode == 2
    assert "was made with another configuration" in refused.stderr, refused.stderr
    assert 'model.model_name "fake-model:Q4_K_M" -> "other-model:Q8_0"' in refused.stderr
    assert output.read_bytes() == written
    # Replicas of different models in one target are refused too, before any file is made.
    mixed = genstruct("generate", str(source), "-o", str(tmp_path / "mixed.jsonl"),
                      "--no-progress", "--target", server_process.target,
                      "--target", other_model.target)
    assert mixed.returncode == 2 and "do not run the same configuration" in mixed.stderr
    assert not (tmp_path / "mixed.jsonl").exists()


def test_a_server_that_changes_model_mid_run_stops_the_run(tmp_path: Path) -> None:
    server = ServerProcess("--token-delay", "0.01", "--n-parallel", "8")
    try:
        source = tmp_path / "in.jsonl"
        write_documents(source, 300)
        output = tmp_path / "out.jsonl"
        process = start_genstruct("generate", str(source), "-o", str(output),
                                  "--target", server.target, "--concurrency", "16")
        wait_progress(process, 30)
        server.kill()
        server.flags += ["--model-name", "other-model:Q8_0"]  # a rolling update, say
        server.restart()
        code, err = finish(process)
        assert code == 2, err
        assert "a server answered with model 'other-model:Q8_0'" in err
        rows = output_records(output)
        assert rows and {r["model_name"] for r in rows} == {"fake-model:Q4_K_M"}
        assert len(rows) < 300
    finally:
        server.close()
