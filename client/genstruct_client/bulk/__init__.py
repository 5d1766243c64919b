"""Bulk generation from files: readers, crash-safe writers, the resume ledger and the runner."""

from genstruct_client.bulk.documents import ColumnMapping, derive_id
from genstruct_client.bulk.errors import UsageError
from genstruct_client.bulk.run_record import PROMPT_TEMPLATE_VERSION, RunMismatch
from genstruct_client.bulk.runner import RunSummary, arun, run
from genstruct_client.bulk.shards import MergeSummary, Shard, merge, shard_of

__all__ = [
    "PROMPT_TEMPLATE_VERSION",
    "ColumnMapping",
    "MergeSummary",
    "RunMismatch",
    "RunSummary",
    "Shard",
    "UsageError",
    "arun",
    "derive_id",
    "merge",
    "run",
    "shard_of",
]
