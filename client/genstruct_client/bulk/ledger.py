"""The resume ledger: which (id, generation) pairs are already written, which ids failed for good.

It is rebuilt from the output journal and the errors file at the start of every run, so the
files themselves are the only state: nothing to get out of step with them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Ledger:
    """Generation indices written per id (as a bit mask), and ids that failed for good."""

    written: dict[str, int] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)

    @classmethod
    def from_records(
        cls, outputs: Iterable[dict[str, Any]], errors: Iterable[dict[str, Any]] = ()
    ) -> Ledger:
        ledger = cls()
        for record in outputs:
            ledger.record(str(record["id"]), int(record["generation_index"]))
        for error in errors:
            if not error.get("retryable", False):
                ledger.failed.add(str(error["id"]))
        return ledger

    def record(self, doc_id: str, index: int) -> None:
        self.written[doc_id] = self.written.get(doc_id, 0) | (1 << index)

    def missing(self, doc_id: str, num_generations: int) -> list[int]:
        """Generation indices of `doc_id` not written yet."""
        mask = self.written.get(doc_id, 0)
        return [index for index in range(num_generations) if not mask >> index & 1]

    def is_done(self, doc_id: str, num_generations: int) -> bool:
        """Every generation written, or the document failed for good."""
        return doc_id in self.failed or not self.missing(doc_id, num_generations)
