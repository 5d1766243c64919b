"""A Node @grpc/grpc-js client calls Generate and GenerateBatch on a server this test starts,
and reads a refusal's google.rpc.Status details as a program in another language would."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import google.rpc.status_pb2
import pytest
from genstruct_service.server import RunningServer

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "node"
# googleapis-common-protos ships google/rpc/status.proto beside its generated module.
GOOGLE_PROTOS = Path(google.rpc.status_pb2.__file__).resolve().parents[2]

pytestmark = pytest.mark.node


async def test_node_client_generate_and_batch(server: RunningServer) -> None:
    node = shutil.which("node")
    assert node is not None, "node is not installed"
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "run `npm ci --prefix tests/node` first"
    )
    assert (GOOGLE_PROTOS / "google" / "rpc" / "status.proto").is_file()
    process = await asyncio.create_subprocess_exec(
        node, str(NODE_DIR / "client.js"), server.target, str(ROOT / "protos"),
        str(GOOGLE_PROTOS),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result = json.loads(out)

    generated = result["generate"]
    assert generated["requestId"] == "node-1"
    response = generated["response"]
    assert response["id"] == "node-doc" and response["model_name"] == "fake-model:Q4_K_M"
    assert [p["index"] for p in response["pairs"]] == [0, 1]
    assert response["pairs"][0]["parsed"] is True
    assert response["pairs"][0]["finish_reason"] == "FINISH_REASON_EOS"
    assert response["pairs"][0]["user"] == "What is the document about?"

    by_id = {r["id"]: r for r in result["batch"]}
    assert by_id.keys() == {"a", "bad", "c"}
    bad = by_id["bad"]["error"]
    assert bad["code"] == 3 and "document.content" in bad["message"]
    assert by_id["a"]["error"] is None and by_id["a"]["pairs"][0]["parsed"] is True
    assert by_id["c"]["pairs"][0]["assistant"] == "It is about testing."

    refusal = result["refusal"]
    assert refusal["code"] == 3 and refusal["details"].startswith("document.content: ")
    status = refusal["status"]
    assert status is not None, "no grpc-status-details-bin trailer"
    assert status["code"] == 3 and status["message"] == refusal["details"]
    details = {d["type"]: d["value"] for d in status["details"]}
    info = details["google.rpc.ErrorInfo"]
    assert (info["reason"], info["domain"]) == ("FIELD_INVALID", "genstruct.v1")
    [violation] = details["google.rpc.BadRequest"]["field_violations"]
    assert violation["field"] == "document.content"
