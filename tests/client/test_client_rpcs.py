"""The asyncio client against a real server (fake engine) in the test's event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from genstruct.v1 import genstruct_pb2 as pb
from genstruct_client import (
    AsyncGenstructClient,
    ChannelConfig,
    Document,
    GenerationOptions,
    ResubmitPolicy,
    TlsConfig,
    aio,
)
from genstruct_service.config import Settings
from genstruct_service.errors import QueueFull, Unavailable
from genstruct_service.server import RunningServer, start_server
from pydantic import SecretStr

from tests.fakes import FakeEngine

DOC = Document(title="Tides", content="The moon pulls the sea.", id="d1")


async def test_generate_model_info_and_health(server: RunningServer, engine: FakeEngine) -> None:
    async with AsyncGenstructClient(server.target) as client:
        response = await client.generate(
            DOC, GenerationOptions(num_generations=2, temperature=0.1, seed=7), timeout=10
        )
        assert response.id == "d1"
        assert [p.index for p in response.pairs] == [0, 1]
        assert response.pairs[0].parsed and response.pairs[0].user == "What is the document about?"
        assert engine.requests[-1].sampling.temperature == pytest.approx(0.1)
        assert engine.requests[-1].sampling.seed == 7
        info = await client.model_info(timeout=10)
        assert info.model_name == "fake-model:Q4_K_M" and info.limits.max_content_chars == 1000
        assert await client.health(timeout=10) == "SERVING"
        assert await client.health("genstruct.v1.GenstructService", timeout=10) == "SERVING"


async def test_generate_stream_and_early_exit_cancels(
    server: RunningServer, engine: FakeEngine
) -> None:
    async with AsyncGenstructClient(server.target) as client:
        messages = [m async for m in client.generate_stream(DOC, timeout=10)]
        assert "".join(m.delta.text for m in messages[:-1]).startswith("What is")
        assert messages[-1].result.pairs[0].parsed
        engine.hold()
        stream = client.generate_stream(Document("t", "held", "d2"), timeout=10)
        async for _ in stream:
            break  # leave after the first delta
        await stream.aclose()
        await engine.wait_for(lambda e: any(r.content == "held" for r in e.cancelled), 10)


async def test_generate_batch_raw(server: RunningServer) -> None:
    requests = [GenerationOptions().request(Document("t", f"c{i}", f"id{i}")) for i in range(5)]
    async with AsyncGenstructClient(server.target) as client:
        results = [r async for r in client.generate_batch(requests, timeout=20)]
    assert sorted(r.id for r in results) == [f"id{i}" for i in range(5)]


async def test_unary_retry_on_unavailable(server: RunningServer, engine: FakeEngine) -> None:
    engine.fail_next(Unavailable("draining"))
    async with AsyncGenstructClient(server.target) as client:
        response = await client.generate(DOC, timeout=20)
    assert response.pairs[0].parsed
    assert len(engine.requests) == 2  # refused once, then retried


async def test_without_retry_policy_unavailable_surfaces(
    server: RunningServer, engine: FakeEngine
) -> None:
    engine.fail_next(Unavailable("draining"))
    config = ChannelConfig(target=server.target, retry=None)
    async with AsyncGenstructClient(config=config) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.generate(DOC, timeout=20)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_generate_many_resubmits_refused_documents_and_reports_bad_ones(
    server: RunningServer, engine: FakeEngine
) -> None:
    engine.fail_next(QueueFull("queue full"))
    docs = [Document("t", f"content {i}", f"id{i}") for i in range(20)]
    docs.append(Document("t", "x" * 2000, "too-long"))  # over max_content_chars
    docs.append(Document("t", "   ", "empty"))
    policy = ResubmitPolicy(initial_backoff=0.01, max_backoff=0.05)
    async with AsyncGenstructClient(server.target) as client:
        results = [r async for r in client.generate_many(docs, window=4, policy=policy)]
    by_id = {r.id: r for r in results}
    assert len(results) == len(by_id) == 22
    assert by_id["too-long"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_id["empty"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    ok = [r for r in results if not r.HasField("error")]
    assert len(ok) == 20 and all(r.pairs[0].parsed for r in ok)
    assert len(engine.requests) == 21  # 20 + the one refused with RESOURCE_EXHAUSTED


async def test_generate_many_gives_up_on_a_document_after_max_attempts(
    server: RunningServer, engine: FakeEngine
) -> None:
    for _ in range(3):
        engine.fail_next(QueueFull("queue full"))
    policy = ResubmitPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    async with AsyncGenstructClient(server.target) as client:
        results = [r async for r in client.generate_many([DOC], policy=policy)]
    assert [r.error.code for r in results] == [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    # three tries, each refused; a fourth would have been served
    assert len(engine.requests) == 3


async def test_generate_many_deadline_per_document(
    server: RunningServer, engine: FakeEngine
) -> None:
    engine.hold()  # generations pause after their first token: "slow" never finishes
    engine.token_delay = 0.1  # one-token documents take a while, so some are in flight
    slow = GenerationOptions().request(Document("t", "slow", "slow"))
    fast = [Document("t", f"fast {i}", f"f{i}") for i in range(60)]
    policy = ResubmitPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)
    async with AsyncGenstructClient(server.target) as client:
        results = [
            r
            async for r in client.generate_many(
                [slow, *fast], GenerationOptions(max_tokens=1), window=4, deadline=0.4,
                policy=policy,
            )
        ]
    by_id = {r.id: r for r in results}
    assert len(results) == len(by_id) == 61
    assert by_id["slow"].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert all(not by_id[d.id].HasField("error") for d in fast)
    # The expired document cost itself only: it was tried twice, every other one once and
    # never cancelled (a whole-stream cancel would have resent those in flight).
    contents = [r.content for r in engine.requests]
    assert contents.count("slow") == 2
    assert sorted(c for c in contents if c != "slow") == sorted(d.content for d in fast)
    await engine.wait_for(lambda e: len(e.cancelled) == 2, 10)  # the slots were freed
    assert {r.content for r in engine.cancelled} == {"slow"}
    assert slow.timeout_ms == 0  # the caller's request is left as it was


async def test_generate_many_needs_ids(server: RunningServer) -> None:
    async with AsyncGenstructClient(server.target) as client:
        with pytest.raises(ValueError, match="unique id"):
            _ = [r async for r in client.generate_many([Document("t", "c")])]


async def test_generate_many_aborts_when_nothing_answers() -> None:
    # Nothing listens on this port: a bounded budget, then BatchAborted.
    from genstruct_client import BatchAborted

    policy = ResubmitPolicy(initial_backoff=0.01, max_backoff=0.05, budget_seconds=0.5)
    config = ChannelConfig(target="127.0.0.1:1", retry=None)
    async with AsyncGenstructClient(config=config) as client:
        with pytest.raises(BatchAborted) as info:
            _ = [r async for r in client.generate_many([DOC], policy=policy)]
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


async def test_stream_restart_resubmits_what_had_no_result(settings: Settings) -> None:
    """The server goes away mid-stream and comes back on the same port: nothing is lost."""
    engine = FakeEngine(hold=True)
    first = await start_server(settings, engine)
    target = first.target
    docs = [Document("t", f"c{i}", f"id{i}") for i in range(6)]
    policy = ResubmitPolicy(initial_backoff=0.01, max_backoff=0.2)
    async with AsyncGenstructClient(target) as client:
        results: list[pb.GenerateResponse] = []

        async def consume() -> None:
            async for r in client.generate_many(docs, window=3, policy=policy):
                results.append(r)

        task = asyncio.create_task(consume())
        await engine.wait_started(3)
        await first.stop(None)  # in-flight calls are cancelled, the port closes
        second_engine = FakeEngine()
        second = await start_server(settings.model_copy(update={"port": first.port}), second_engine)
        try:
            await asyncio.wait_for(task, 60)
        finally:
            await second.stop(None)
    assert sorted(r.id for r in results) == sorted(d.id for d in docs)
    assert all(not r.HasField("error") for r in results)


async def test_token_is_sent(engine: FakeEngine, settings: Settings) -> None:
    secured = settings.model_copy(update={"auth_token": SecretStr("s3cret")})
    running = await start_server(secured, engine)
    try:
        async with AsyncGenstructClient(config=ChannelConfig(running.target)) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate(DOC, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        config = ChannelConfig(running.target, token="s3cret")
        async with AsyncGenstructClient(config=config) as client:
            assert (await client.generate(DOC, timeout=10)).pairs[0].parsed
    finally:
        await running.stop(None)


@pytest.mark.parametrize("mutual", [False, True])
async def test_tls_and_mutual_tls(
    tmp_path: Path, engine: FakeEngine, settings: Settings, mutual: bool
) -> None:
    import trustme

    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    server_cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    update: dict[str, object] = {
        "tls_cert_file": tmp_path / "server.pem",
        "tls_key_file": tmp_path / "server.key",
    }
    if mutual:
        update["tls_client_ca_file"] = tmp_path / "ca.pem"
    running = await start_server(settings.model_copy(update=update), engine)
    try:
        client_cert = ca.issue_cert("client")
        client_cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))
        client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
        tls = TlsConfig.from_files(
            tmp_path / "ca.pem",
            tmp_path / "client.pem" if mutual else None,
            tmp_path / "client.key" if mutual else None,
            server_name="localhost",
        )
        async with AsyncGenstructClient(config=ChannelConfig(running.target, tls=tls)) as client:
            assert (await client.generate(DOC, timeout=10)).pairs[0].parsed
        # Without TLS (or, for mutual TLS, without a client certificate) the call fails.
        bare = ChannelConfig(running.target, retry=None)
        if mutual:
            bare = ChannelConfig(
                running.target, retry=None,
                tls=TlsConfig.from_files(tmp_path / "ca.pem", server_name="localhost"),
            )
        async with AsyncGenstructClient(config=bare) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate(DOC, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(None)


async def test_generate_stream_retries_until_its_first_message(
    server: RunningServer, engine: FakeEngine
) -> None:
    engine.fail_next(QueueFull("queue full"))
    async with AsyncGenstructClient(server.target) as client:
        messages = [m async for m in client.generate_stream(DOC, timeout=20)]
    assert messages[-1].result.pairs[0].parsed
    assert len(engine.requests) == 2


async def test_a_lane_opens_its_next_stream_only_when_it_has_room(
    server: RunningServer, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """round_robin binds a call to a server when the call opens, so a stream opened before it
    can send would go where the last one went, even once other servers are connected."""
    engine.hold()
    docs = [Document("t", f"c{i}", f"id{i}") for i in range(6)]
    # The lane, its first stream full, waits for room: from then on it opens nothing until a
    # result comes, so what it opened by then is all it opens while the engine holds.
    waiting_for_room = asyncio.Event()
    until_room = aio._until_room

    async def watched(*args: Any) -> None:
        waiting_for_room.set()
        await until_room(*args)

    monkeypatch.setattr(aio, "_until_room", watched)
    async with AsyncGenstructClient(server.target) as client:
        opened: list[int] = []
        open_stream = client._stub.GenerateBatch

        def counting(*args: object, **kwargs: object) -> object:
            opened.append(engine.started)
            return open_stream(*args, **kwargs)

        client._stub.GenerateBatch = counting  # type: ignore[method-assign]

        async def consume() -> list[pb.GenerateResponse]:
            return [r async for r in client.generate_many(docs, window=2, documents_per_stream=2)]

        task = asyncio.create_task(consume())
        await engine.wait_started(2)
        await asyncio.wait_for(waiting_for_room.wait(), 10)
        assert len(opened) == 1, opened
        engine.release()
        results = await asyncio.wait_for(task, 30)
    assert sorted(r.id for r in results) == sorted(d.id for d in docs)
    # every later stream opened once a result had made room: 3 streams of 2 documents each
    assert len(opened) >= 3 and all(started >= 2 for started in opened[1:]), opened
