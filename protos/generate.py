"""Generate the contract's Python stubs into client/ (`make protos`), or its image for buf.

The messages, the gRPC stubs and their .pyi type stubs are committed; tests/unit/test_stubs.py
regenerates them into a temporary folder and fails when anything differs.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
CONTRACT = "genstruct/v1/genstruct.proto"
DEFAULT_OUT = PROTOS.parent / "client"


def _include_dirs() -> list[str]:
    # protoc's own well-known types, and google/rpc/status.proto from googleapis-common-protos
    # (it ships the .proto beside its generated module).
    well_known = resources.files("grpc_tools") / "_proto"
    import google.rpc.status_pb2 as status

    googleapis = Path(status.__file__).resolve().parents[2]
    return [str(PROTOS), str(well_known), str(googleapis)]


def _protoc(*options: str) -> None:
    includes = [f"-I{path}" for path in _include_dirs()]
    code = protoc.main(["grpc_tools.protoc", *includes, *options, CONTRACT])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def generate(out_dir: Path = DEFAULT_OUT) -> None:
    """Write genstruct/v1/genstruct_pb2{,_grpc}.py{,i} under out_dir."""
    # mypy-protobuf's plugins are installed beside this interpreter, which need not be on PATH.
    scripts = Path(sys.executable).parent
    _protoc(
        f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
    )


def write_image(path: Path) -> None:
    """Write the contract and its imports as a descriptor set, the input `buf lint` reads
    offline (buf would otherwise fetch google/rpc/status.proto from its registry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _protoc("--include_imports", "--include_source_info", f"--descriptor_set_out={path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the stubs")
    parser.add_argument("--image", type=Path, help="write a descriptor set here instead")
    args = parser.parse_args()
    if args.image is not None:
        write_image(args.image)
    else:
        generate(args.out)


if __name__ == "__main__":
    main()
