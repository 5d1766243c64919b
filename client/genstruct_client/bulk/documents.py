"""From input rows to documents: column mapping and stable ids."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from genstruct_client.bulk.errors import UsageError
from genstruct_client.types import Document


def derive_id(title: str, content: str) -> str:
    """A stable id from the text: the same title and content always give the same id."""
    digest = hashlib.sha256()
    digest.update(title.encode("utf-8"))
    digest.update(b"\x00")  # so ("ab", "c") and ("a", "bc") differ
    digest.update(content.encode("utf-8"))
    return digest.hexdigest()[:32]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


@dataclass(frozen=True, slots=True)
class ColumnMapping:
    """Which input columns hold the title, the content and (optionally) the id."""

    title: str = "title"
    content: str = "content"
    id: str | None = None  # None: ids derived from the text (derive_id)

    def check(self, columns: Mapping[str, Any]) -> None:
        """Raises UsageError when the mapped columns are missing from a row's columns."""
        wanted = [self.title, self.content] + ([self.id] if self.id else [])
        missing = [name for name in wanted if name not in columns]
        if missing:
            raise UsageError(
                f"the input has no column {', '.join(map(repr, missing))}; its columns are "
                f"{', '.join(map(repr, columns))} (see --title-column, --content-column, "
                "--id-column)"
            )

    def document(self, values: Mapping[str, Any]) -> Document:
        """The document of one row; a missing or null value is an empty string."""
        title = _text(values.get(self.title))
        content = _text(values.get(self.content))
        raw_id = values.get(self.id) if self.id else None
        doc_id = _text(raw_id) if raw_id is not None else ""
        return Document(title=title, content=content, id=doc_id or derive_id(title, content))
