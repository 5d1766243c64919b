"""TLS, mutual TLS and the bearer token, with certificates made by the test (trustme)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import trustme
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc
from genstruct_service.server import RunningServer, start_server
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.fakes import FakeEngine
from tests.service.helpers import doc, health_status, make_settings

Stub = genstruct_pb2_grpc.GenstructServiceStub


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", "localhost")


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture
def tls_files(tmp_path: Path, server_cert: trustme.LeafCert) -> dict[str, Path]:
    return {
        "tls_cert_file": _write(tmp_path, "chain.pem", server_cert.cert_chain_pems[0].bytes()),
        "tls_key_file": _write(tmp_path, "key.pem", server_cert.private_key_pem.bytes()),
    }


async def _serve(**settings: object) -> RunningServer:
    return await start_server(make_settings(**settings), FakeEngine())


async def _generate(channel: grpc.aio.Channel, **kwargs: object) -> genstruct_pb2.GenerateResponse:
    return await Stub(channel).Generate(doc(), timeout=5, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def tls_server(tls_files: dict[str, Path]) -> AsyncIterator[RunningServer]:
    server = await _serve(**tls_files)
    yield server
    await server.stop(None)


async def test_tls(tls_server: RunningServer, ca: trustme.CA) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    async with grpc.aio.secure_channel(tls_server.target, credentials) as channel:
        assert (await _generate(channel)).pairs[0].parsed
    async with grpc.aio.insecure_channel(tls_server.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _generate(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    untrusted = grpc.ssl_channel_credentials(root_certificates=trustme.CA().cert_pem.bytes())
    async with grpc.aio.secure_channel(tls_server.target, untrusted) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _generate(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(
    tmp_path: Path, tls_files: dict[str, Path], ca: trustme.CA
) -> None:
    client_ca = trustme.CA()
    ca_file = _write(tmp_path, "client-ca.pem", client_ca.cert_pem.bytes())
    server = await _serve(**tls_files, tls_client_ca_file=ca_file)
    try:
        good = client_ca.issue_cert("client@example.com")
        stranger = trustme.CA().issue_cert("client@example.com")
        for leaf, ok in ((good, True), (stranger, False), (None, False)):
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca.cert_pem.bytes(),
                private_key=leaf.private_key_pem.bytes() if leaf else None,
                certificate_chain=leaf.cert_chain_pems[0].bytes() if leaf else None,
            )
            async with grpc.aio.secure_channel(server.target, credentials) as channel:
                if ok:
                    assert (await _generate(channel)).pairs[0].parsed
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await _generate(channel)
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_bearer_token() -> None:
    server = await _serve(auth_token="s3cret-token")
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            for metadata in ((), (("authorization", "Bearer wrong"),),
                             (("authorization", "s3cret-token"),)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _generate(channel, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization: Bearer" in (info.value.details() or "")
            stream = Stub(channel).GenerateStream(doc(), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stream.read()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", "Bearer s3cret-token"),)
            assert (await _generate(channel, metadata=good)).pairs[0].parsed
            # Probes and tooling need no token: health, and reflection.
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = [r async for r in reflection.ServerReflectionInfo(ask(), timeout=5)]
            names = {s.name for s in replies[0].list_services_response.service}
            assert "genstruct.v1.GenstructService" in names
    finally:
        await server.stop(None)
