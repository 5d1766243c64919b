"""Domain errors, raised where a problem is found and mapped to gRPC status codes in one place."""

from __future__ import annotations


class GenstructError(Exception):
    """Base of every error the service reports to a caller; the message is shown as is."""


class InvalidRequest(GenstructError):
    """The request itself is wrong (a field out of range, too long): INVALID_ARGUMENT."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ContextOverflow(InvalidRequest):
    """The prompt plus the tokens asked for can never fit the context: INVALID_ARGUMENT."""


class QueueFull(GenstructError):
    """The engine's queue is full; retry later with backoff: RESOURCE_EXHAUSTED."""


class Unavailable(GenstructError):
    """The service is loading its model or draining: UNAVAILABLE."""


class ModelError(GenstructError):
    """The model cannot be had or loaded (missing, corrupt, not a GGUF file, offline)."""
