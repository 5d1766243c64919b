"""Model files: the registry of known GGUF builds, downloads, checks, and `--model` resolution."""

from genstruct_service.model_files.gguf import GGUFInfo, read_gguf
from genstruct_service.model_files.registry import (
    ModelEntry,
    Registry,
    default_models_dir,
    load_registry,
)
from genstruct_service.model_files.resolve import ResolvedModel, resolve_model

__all__ = [
    "GGUFInfo",
    "ModelEntry",
    "Registry",
    "ResolvedModel",
    "default_models_dir",
    "load_registry",
    "read_gguf",
    "resolve_model",
]
