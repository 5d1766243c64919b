"""From input rows to documents: column mapping, stable ids and the columns passed through."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from genstruct_client.bulk.errors import UsageError
from genstruct_client.bulk.writers import CHUNK_COLUMNS, COLUMNS
from genstruct_client.types import Document

log = logging.getLogger("genstruct_client.bulk")
# The pair's own output columns: an input column passed through must not take one's name.
RESERVED = frozenset(COLUMNS + CHUNK_COLUMNS)
ALL = "*"  # in `columns`: every input column not named otherwise


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


def parse_columns(spec: str) -> tuple[str, ...]:
    """`--columns a,b=c,*` as entries; an empty string is no column at all."""
    return tuple(part.strip() for part in spec.split(",") if part.strip())


def _names(names: Iterable[str]) -> str:
    return ", ".join(map(repr, names))


@dataclass(frozen=True, slots=True)
class ColumnMapping:
    """Which input columns hold the title, the content and the id, and which pass through.

    `id`: None takes a column named `id` as the id (a row without one gets a derived id);
    "" always derives ids from the text (derive_id). `columns` lists the columns copied to
    the output rows: `name`, `name=new_name` (renamed), `*` (every column not named
    otherwise); None is `*`, () none. The title, content and id columns are the output's
    title, content and id, so `*` leaves them out.
    """

    title: str = "title"
    content: str = "content"
    id: str | None = None
    columns: tuple[str, ...] | None = None
    # Parsed once (`columns` as (source, output name), None for `*`), not per row.
    _plan: tuple[tuple[str, str] | None, ...] = field(init=False, repr=False, compare=False)
    _skip: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plan = self._parse()
        named = {entry[0] for entry in plan if entry is not None}
        object.__setattr__(self, "_plan", plan)
        object.__setattr__(self, "_skip", frozenset(self._mapped() | named))

    def resolved(self, columns: Mapping[str, Any]) -> ColumnMapping:
        """The mapping with the id column settled from one row's columns (None: `id` or "")."""
        if self.id is not None:
            return self
        return dataclasses.replace(self, id="id" if "id" in columns else "")

    @property
    def id_column(self) -> str | None:
        """The column ids are read from (None: derived), as far as it is known."""
        return "id" if self.id is None else self.id or None

    def _mapped(self) -> set[str]:
        return {self.title, self.content} | ({self.id_column} if self.id_column else set())

    def _parse(self) -> tuple[tuple[str, str] | None, ...]:
        """(source, output name) per entry of `columns`; None stands for `*`."""
        plan: list[tuple[str, str] | None] = []
        for entry in (ALL,) if self.columns is None else self.columns:
            if entry == ALL:
                if None in plan:
                    raise UsageError("--columns: '*' is given twice")
                plan.append(None)
                continue
            source, _, name = entry.partition("=")
            source, name = source.strip(), (name.strip() if _ else source.strip())
            if not source or not name:
                raise UsageError(f"--columns: {entry!r} is not NAME or NAME=NEW_NAME")
            plan.append((source, name))
        return tuple(plan)

    def check(self, columns: Mapping[str, Any], *, sparse: bool = False) -> None:
        """Raises UsageError when mapped or listed columns are missing from a row's columns,
        or when an output column would take the name of one of the pair's. `sparse`: rows
        need not share their columns (JSONL), so a listed one missing is only logged."""
        wanted = [self.title, self.content] + ([self.id] if self.id else [])
        listed = [entry[0] for entry in self._plan if entry is not None]
        if sparse:
            absent = [name for name in listed if name not in columns and name not in wanted]
            if absent:
                log.warning("the first record has no column %s (--columns)", _names(absent))
            listed = []
        missing = [name for name in dict.fromkeys(wanted + listed) if name not in columns]
        if missing:
            raise UsageError(
                f"the input has no column {_names(missing)}; its columns are "
                f"{_names(columns)} (see --title-column, --content-column, --id-column, "
                "--columns)"
            )
        self.extras(columns)  # the collision checks, on this row's columns

    def document(self, values: Mapping[str, Any]) -> Document:
        """The document of one row; a missing or null value is an empty string."""
        title = _text(values.get(self.title))
        content = _text(values.get(self.content))
        id_column = self.id_column
        raw_id = values.get(id_column) if id_column else None
        doc_id = _text(raw_id) if raw_id is not None else ""
        return Document(title=title, content=content, id=doc_id or derive_id(title, content))

    def extras(self, values: Mapping[str, Any], record: int | None = None) -> dict[str, Any]:
        """The columns of one row that pass through, under their output names, unchanged.

        Raises UsageError when one would overwrite a column of the pair (`record`: the row's
        number, for the message).
        """
        out: dict[str, Any] = {}
        for entry in self._plan:
            if entry is None:
                for source, value in values.items():
                    if source not in self._skip:
                        self._place(out, source, source, value, record)
                continue
            source, name = entry
            if name in RESERVED and source == self._role(name):
                continue  # already there: the column is the output's title, content or id
            self._place(out, source, name, values.get(source), record)
        return out

    def _role(self, name: str) -> str | None:
        return {"title": self.title, "content": self.content, "id": self.id_column}.get(name)

    @staticmethod
    def _place(out: dict[str, Any], source: str, name: str, value: Any, record: int | None) -> None:
        where = f"record {record}: " if record is not None else ""
        if name in RESERVED:
            what = f"the input column {source!r}" + (f" (as {name!r})" if name != source else "")
            raise UsageError(
                f"{where}{what} would overwrite the pair's own output column {name!r} (the "
                f"pair's columns are {', '.join(COLUMNS)}); rename it, e.g. --columns "
                f"'*,{source}=input_{source}', or leave it out by listing the columns to keep, "
                "e.g. --columns 'a,b'"
            )
        if name in out:
            raise UsageError(f"{where}--columns gives two columns the name {name!r}")
        out[name] = value
