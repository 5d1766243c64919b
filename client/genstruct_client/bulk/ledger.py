"""The resume ledger: which (id, part, generation) rows are written, which ids failed for good.

It is rebuilt from the output journal and the errors file at the start of every run, so the
files themselves are the only state: nothing to get out of step with them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# bits per part in a mask: a document has at most this many generations (the server's limit)
_PART_BITS = 64


@dataclass(slots=True)
class Ledger:
    """Rows written per id (as a bit mask over part x generation), the parts of each chunked
    id, and ids that failed for good. An id that is not chunked has one part, number 0."""

    written: dict[str, int] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    parts: dict[str, int] = field(default_factory=dict)  # chunked ids only

    @classmethod
    def from_records(
        cls, outputs: Iterable[dict[str, Any]], errors: Iterable[dict[str, Any]] = ()
    ) -> Ledger:
        """From output rows as dicts (see from_keys for what is read of them)."""
        keys = (
            (str(r["id"]), int(r["generation_index"]), int(r.get("chunk_index") or 0),
             int(r.get("chunks") or 0))
            for r in outputs
        )
        return cls.from_keys(keys, errors)

    @classmethod
    def from_keys(
        cls, outputs: Iterable[tuple[str, int, int, int]], errors: Iterable[dict[str, Any]] = ()
    ) -> Ledger:
        """From (id, generation, part, parts) of every output row (parts 0: not chunked) and
        the errors file's records."""
        ledger = cls()
        for doc_id, index, part, parts in outputs:
            ledger.record(doc_id, index, part)
            if parts:
                ledger.parts[doc_id] = parts
        for error in errors:
            if not error.get("retryable", False):
                ledger.failed.add(str(error["id"]))
        return ledger

    def record(self, doc_id: str, index: int, part: int = 0) -> None:
        self.written[doc_id] = self.written.get(doc_id, 0) | (1 << (part * _PART_BITS + index))

    def has(self, doc_id: str, index: int, part: int = 0) -> bool:
        return bool(self.written.get(doc_id, 0) >> (part * _PART_BITS + index) & 1)

    def missing(self, doc_id: str, num_generations: int) -> list[tuple[int, int]]:
        """(part, generation) of `doc_id` not written yet, as far as its parts are known (a
        chunked document not seen yet counts as one part)."""
        return [
            (part, index)
            for part in range(self.parts.get(doc_id, 1))
            for index in range(num_generations)
            if not self.has(doc_id, index, part)
        ]

    def is_done(self, doc_id: str, num_generations: int) -> bool:
        """Every row written, or the document failed for good."""
        return doc_id in self.failed or not self.missing(doc_id, num_generations)
