"""The committed stubs are exactly what the contract generates, and typed."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / "client" / "genstruct" / "v1"
GENERATED = [
    "genstruct_pb2.py",
    "genstruct_pb2.pyi",
    "genstruct_pb2_grpc.py",
    "genstruct_pb2_grpc.pyi",
]


def test_regenerating_the_stubs_changes_nothing(tmp_path: Path) -> None:
    # The plugins (protoc-gen-mypy*) live beside the interpreter.
    env_path = f"{Path(sys.executable).parent}"
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        env={"PATH": env_path},
    )
    fresh = tmp_path / "genstruct" / "v1"
    stale = [
        name for name in GENERATED if not filecmp.cmp(fresh / name, STUBS / name, shallow=False)
    ]
    assert stale == [], (
        f"run `make protos`: {stale} differ from protos/genstruct/v1/genstruct.proto"
    )


def test_mypy_sees_every_field(tmp_path: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text(
        "from genstruct.v1 import genstruct_pb2 as pb\n"
        "r = pb.GenerateRequest(id='a', num_generations=2)\n"
        "r.document.title = 't'\n"
        "r.sampling.temperature = 0.5\n"
        "has: bool = r.sampling.HasField('seed')\n"
        "r.sampling.stop.append('END')\n"
        "reason: pb.FinishReason.ValueType = pb.FINISH_REASON_STOP\n"
    )
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from genstruct.v1 import genstruct_pb2 as pb\n"
        "r = pb.GenerateRequest()\n"
        "r.document.title = 1\n"
        "r.sampling.temprature = 0.5\n"
        "r.sampling.HasField('stop')\n"
    )
    mypy = [
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--no-incremental",
        "--config-file",
        "/dev/null",
    ]
    env = {"MYPYPATH": str(ROOT / "client"), "PATH": str(Path(sys.executable).parent)}
    ok = subprocess.run([*mypy, str(good)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stdout
    failed = subprocess.run([*mypy, str(bad)], capture_output=True, text=True, env=env)
    assert "bad.py:3" in failed.stdout  # int assigned to a string field
    assert "bad.py:4" in failed.stdout  # misspelt field
    assert "bad.py:5" in failed.stdout  # HasField on a repeated field


def test_imports_are_package_absolute() -> None:
    text = (STUBS / "genstruct_pb2_grpc.py").read_text()
    assert "from genstruct.v1 import genstruct_pb2" in text
