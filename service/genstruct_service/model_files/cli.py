"""`genstruct-server models list|download|verify`: manage the model files on this machine."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from genstruct_service.errors import ModelError
from genstruct_service.model_files.registry import Registry, default_models_dir, load_registry
from genstruct_service.model_files.resolve import (
    local_status,
    resolve_entry,
    resolve_model,
)

logger = logging.getLogger(__name__)


def build_parser(prog: str = "genstruct-server models") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="List, download and verify the GGUF model files the server can load.",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="folder holding the .gguf files (default: $GENSTRUCT_MODELS_DIR, else ./models)",
    )
    parser.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="registry.toml to read (default: $GENSTRUCT_MODEL_REGISTRY, else the bundled one)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="show the known models and which are here")
    listing.add_argument(
        "--verify", action="store_true", help="hash files not verified yet (slow for 7B models)"
    )
    download = commands.add_parser("download", help="download a registry model, verified")
    download.add_argument("name", help="registry name, e.g. genstruct-7b:Q4_K_M, or hf://...")
    download.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify = commands.add_parser("verify", help="check a model's checksum and GGUF header")
    verify.add_argument("name_or_path", help="registry name, or a path to a .gguf file")
    return parser


def main(argv: list[str]) -> int:
    """Run a `models` subcommand; returns the process exit code (0 ok, 1 failed, 2 usage)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    models_dir: Path = args.models_dir or default_models_dir()
    try:
        registry = load_registry(args.registry)
        if args.command == "list":
            return _list(registry, models_dir, verify=args.verify)
        if args.command == "download":
            model = resolve_model(
                args.name, models_dir, registry=registry, progress=not args.no_progress
            )
            print(f"{model.display_name}: {model.path} (verified, sha256 {model.sha256})")
            return 0
        model = resolve_model(
            args.name_or_path, models_dir, registry=registry, allow_download=False
        )
        checked = f"sha256 {model.sha256}" if model.sha256 else "no known checksum"
        print(
            f"{model.display_name}: {model.path} ok: GGUF v{model.gguf.version}, "
            f"{model.gguf.architecture or '?'}, {model.quantization or '?'}, "
            f"{model.gguf.tensor_count} tensors, {checked}"
        )
        return 0
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _list(registry: Registry, models_dir: Path, *, verify: bool) -> int:
    rows = [("NAME", "QUANT", "SIZE", "STATUS", "FROM")]
    failed = False
    for entry in registry.entries.values():
        status = local_status(entry, models_dir)
        if entry.source == "pypi" or (verify and status == "present, not verified"):
            try:
                model = resolve_entry(entry, models_dir, allow_download=False, progress=False)
                status = "verified" if model.sha256 else "present (no checksum)"
                if entry.source == "pypi":
                    status += " (installed package)"
            except ModelError as exc:
                status = "not installed" if entry.source == "pypi" else "CORRUPT"
                logger.info("%s: %s", entry.name, exc)
                failed = failed or entry.source != "pypi"
        marks = " (default)" if entry.name == registry.default else ""
        size = f"{entry.size / 1e9:.2f} GB" if entry.size else "?"
        rows.append((entry.name + marks, entry.quant, size, status, entry.origin))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    print(f"\nmodels folder: {models_dir.resolve()}  (registry: {registry.path})")
    return 1 if failed else 0
