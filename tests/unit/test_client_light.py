"""The client package works where the server's dependencies cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Runs in a fresh interpreter in which llama_cpp (and the other server-only packages) fail to
# import, as in a service that installed only the light client.
SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {"llama_cpp", "jinja2", "pydantic_settings", "prometheus_client", "genstruct_service",
               "distilabel"}
    # Modules of optional extras, which say which extra they need (tests/client has theirs).
    OPTIONAL = {"genstruct_client.distilabel_step": "genstruct-grpc[distilabel]"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not installed in a client-only environment")
            return None

    sys.meta_path.insert(0, Block())
    import genstruct_client
    from genstruct.v1 import genstruct_pb2 as pb

    for module in pkgutil.walk_packages(genstruct_client.__path__, "genstruct_client."):
        if module.name not in OPTIONAL:
            importlib.import_module(module.name)
            continue
        try:
            importlib.import_module(module.name)
        except ImportError as exc:
            assert OPTIONAL[module.name] in str(exc), exc
        else:
            raise AssertionError(f"{module.name} imported without its extra")

    request = pb.GenerateRequest(
        id="doc-1",
        document=pb.Document(title="Tides", content="The moon pulls the sea."),
        sampling=pb.SamplingParams(temperature=0.2, max_tokens=64),
        num_generations=2,
    )
    assert pb.GenerateRequest.FromString(request.SerializeToString()) == request
    try:
        import llama_cpp
    except ImportError:
        print("client ok without llama_cpp")
    """
)


def test_client_imports_and_builds_requests_without_llama_cpp() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "client ok without llama_cpp"
