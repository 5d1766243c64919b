"""Typed clients of the Genstruct service, the bulk runner and the `genstruct` command."""

from genstruct_client._batching import BatchAborted, ResubmitPolicy
from genstruct_client.aio import AsyncGenstructClient
from genstruct_client.channel import ChannelConfig, RetryPolicy, TlsConfig, resolve_target
from genstruct_client.client import GenstructClient
from genstruct_client.types import Document, GenerationOptions

__all__ = [
    "AsyncGenstructClient",
    "BatchAborted",
    "ChannelConfig",
    "Document",
    "GenerationOptions",
    "GenstructClient",
    "ResubmitPolicy",
    "RetryPolicy",
    "TlsConfig",
    "resolve_target",
]
