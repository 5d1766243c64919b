"""Curation of pairs: near-duplicate questions (MinHash over word shingles) and filters that
say why they took a row out.

Needs the `curation` extra (`pip install 'genstruct-grpc[curation]'`) for deduplication:
MinHash is rensa's (measured here at 45.5k questions/s against datasketch's 2.1k/s, on 20k
questions); the LSH tables are numpy arrays (_Bands), a tenth of rensa's in memory.
Filters need nothing.
"""

from __future__ import annotations

import array
import hashlib
import importlib.metadata
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

DedupMode = Literal["mark", "drop", "off"]
DEDUP_MODES: tuple[DedupMode, ...] = ("mark", "drop", "off")

DEFAULT_THRESHOLD = 0.7
SHINGLE_WORDS = 2
# 16 bands of 8 rows: pairs of questions at Jaccard 0.7 meet in a band with probability 0.94,
# at 0.5 with 0.06; every candidate is then checked exactly against the threshold.
NUM_PERM = 128
NUM_BANDS = 16
SEED = 42

_WORD = re.compile(r"\w+")

# Why a filter took a row out: the `filter_reason` of OUT.filtered.jsonl.
NOT_PARSED = "not_parsed"
LOW_GROUNDING = "grounding_below_min"
COPIED_QUESTION = "question_grounding_above_max"


def shingles(question: str, size: int = SHINGLE_WORDS) -> set[str]:
    """The question's runs of `size` words (case-folded, punctuation left out); a shorter
    question is one shingle of all its words, an empty one none."""
    found = _WORD.findall(question.casefold())
    if len(found) <= size:
        return {" ".join(found)} if found else set()
    return {" ".join(found[i : i + size]) for i in range(len(found) - size + 1)}


def jaccard(first: set[str], second: set[str]) -> float:
    if not first and not second:
        return 1.0
    return len(first & second) / len(first | second)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        from genstruct_client.bulk.errors import UsageError

        raise UsageError(
            "finding duplicate questions needs numpy: pip install 'genstruct-grpc[curation]' "
            "(or pass --dedup off)"
        ) from None
    return numpy


def _rensa() -> Any:
    try:
        import rensa
    except ImportError:
        from genstruct_client.bulk.errors import UsageError

        raise UsageError(
            "finding duplicate questions needs rensa: pip install 'genstruct-grpc[curation]' "
            "(or pass --dedup off)"
        ) from None
    return rensa


def rensa_version() -> str:
    """The installed rensa's version: another may give other MinHash digests, so other
    candidates, and so mark other pairs as duplicates."""
    _rensa()  # a UsageError that says how to install it, when it is missing
    return importlib.metadata.version("rensa")


class QuestionIndex:
    """The questions kept so far; `check` says which earlier one a question nearly repeats.

    Deterministic: the same questions checked in the same order give the same answers, so
    an index rebuilt from an output (resume) is the one the run had. Compact, because a
    resume puts a whole output back into it: a kept question costs its UTF-8 bytes, its
    key's, and 16 bytes more, and 8 bytes a band in the LSH tables (_Bands).
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError("the threshold must be in (0, 1]")
        rensa = _rensa()
        self.threshold = threshold
        self._minhash = rensa.RMinHash
        self._bands = _Bands(NUM_BANDS, NUM_PERM // NUM_BANDS)
        # by insertion number: the question (for the exact check) and its row's key, as one
        # JSON list in a shared buffer (a Python str and tuple each would cost 3 times more)
        self._kept = bytearray()
        self._ends = array.array("Q")

    def __len__(self) -> int:
        return len(self._ends)

    def check(self, question: str | None, key: Any) -> Any | None:
        """The key of the first question kept whose word shingles are at least `threshold`
        alike (Jaccard) to `question`'s; None when there is none, and then the question is
        kept, under `key`. A missing or wordless question is never a duplicate, nor kept."""
        if not question:
            return None
        mine = shingles(question)
        if not mine:
            return None
        digest = self._digest(mine)
        for number in self._bands.candidates(digest):
            earlier, earlier_key = self._entry(number)
            if jaccard(mine, shingles(earlier)) >= self.threshold:
                return earlier_key
        self._keep(question, digest, key)
        return None

    def add(self, question: str | None, key: Any) -> None:
        """Keeps a question known not to repeat one kept before (rebuilding the index of a
        run from its output, where `check` said so once already)."""
        mine = shingles(question) if question else set()
        if mine:
            self._keep(question or "", self._digest(mine), key)

    def _digest(self, shingled: set[str]) -> list[int]:
        minhash = self._minhash(NUM_PERM, SEED)
        minhash.update(sorted(shingled))
        digest: list[int] = minhash.digest()
        return digest

    def _keep(self, question: str, digest: list[int], key: Any) -> None:
        self._bands.add(digest)
        self._kept += json.dumps([question, key], ensure_ascii=False).encode("utf-8")
        self._ends.append(len(self._kept))

    def _entry(self, number: int) -> tuple[str, Any]:
        start = self._ends[number - 1] if number else 0
        question, key = json.loads(self._kept[start : self._ends[number]])
        return question, tuple(key) if isinstance(key, list) else key


class _Bands:
    """The LSH tables of the kept digests: a digest's values are cut into bands, and the
    digests that share a band with a query's are its candidates.

    rensa's RMinHashLSH keeps a Rust hash map entry and vector per band and digest (2.2 GB
    for a million digests). Here a band hash is 32 bits (vector multiply-shift), and a
    digest lives in three tiers: its values, until a batch of them is hashed; its band
    hashes (`_recent`, 64 bytes), scanned by a query; and, once a query finds enough of
    those, one entry `hash << 32 | insertion number` (8 bytes) in each band's sorted array.
    Two different bands meet by chance with odds of 2^-32; such a candidate is checked
    like any other.
    """

    _HASH_AT = 4096  # digests in `_values` hashed together (a rebuild's batch)
    _SORT_AT = 1024  # digests in `_recent` that a query sorts in first

    def __init__(self, bands: int, rows: int) -> None:
        np = _numpy()
        self._np = np
        self._shape = (bands, rows)
        # the multipliers and the addend of the band hash: fixed, so every run hashes alike
        words = hashlib.shake_256(b"genstruct question bands").digest(8 * (rows + 1))
        values = np.frombuffer(words, dtype="<u8").astype(np.uint64)
        self._multipliers, self._addend = values[:rows], values[rows]
        self._sorted = [np.empty(0, dtype=np.uint64) for _ in range(bands)]
        self._recent = array.array("I")  # band hashes, a digest after another
        self._values = array.array("I")  # digests not hashed yet, one after another
        self._count = 0  # digests added

    def add(self, digest: list[int]) -> None:
        self._values.extend(digest)
        self._count += 1
        if len(self._values) >= self._HASH_AT * NUM_PERM:
            self._hash_values()

    def candidates(self, digest: list[int]) -> list[int]:
        """Insertion numbers of the digests that share a band with `digest`, ascending."""
        np = self._np
        bands = self._shape[0]
        self._hash_values()
        if len(self._recent) >= self._SORT_AT * bands:
            self._sort_in()
        mine = self._hash(np.array(digest, dtype=np.uint32))[0]
        lows = mine.astype(np.uint64) << np.uint64(32)
        highs = lows | np.uint64(0xFFFFFFFF)
        found: list[Any] = []
        for table, low, high in zip(self._sorted, lows, highs, strict=True):
            start, end = table.searchsorted((low, high))
            if end > start:
                found.append(table[start:end] & np.uint64(0xFFFFFFFF))
        if self._recent:
            recent = np.frombuffer(self._recent, dtype=np.uint32).reshape(-1, bands)
            first = self._count - len(recent)
            found.append(np.flatnonzero((recent == mine).any(axis=1)) + first)
        if not found:
            return []
        return [int(number) for number in np.unique(np.concatenate(found))]

    def _hash(self, digests: Any) -> Any:
        """The band hashes (uint32, digests x bands) of `digests`, one after another."""
        np = self._np
        values = digests.reshape(-1, *self._shape).astype(np.uint64)
        mixed = (values * self._multipliers).sum(axis=2, dtype=np.uint64) + self._addend
        return (mixed >> np.uint64(32)).astype(np.uint32)

    def _hash_values(self) -> None:
        if self._values:
            hashed = self._hash(self._np.frombuffer(self._values, dtype=self._np.uint32))
            self._recent.frombytes(hashed.tobytes())
            self._values = array.array("I")

    def _sort_in(self) -> None:
        """Moves `_recent` into the sorted arrays, a band at a time (a rebuild's million
        digests make 8 MB of temporaries a band)."""
        np = self._np
        recent = np.frombuffer(self._recent, dtype=np.uint32).reshape(-1, self._shape[0])
        numbers = np.arange(self._count - len(recent), self._count, dtype=np.uint64)
        for band in range(self._shape[0]):
            packed = recent[:, band].astype(np.uint64) << np.uint64(32) | numbers
            merged = np.concatenate((self._sorted[band], packed))
            merged.sort(kind="stable")  # timsort: the sorted part is taken as one run
            self._sorted[band] = merged
        del recent
        self._recent = array.array("I")


@dataclass(frozen=True, slots=True)
class Filters:
    """Which pairs a run keeps; a pair another filter takes out goes elsewhere, with its
    reason (never dropped without a trace)."""

    require_parsed: bool = False
    min_grounding: float | None = None
    max_question_grounding: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_grounding", "max_question_grounding"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")

    @property
    def active(self) -> bool:
        return (
            self.require_parsed
            or self.min_grounding is not None
            or self.max_question_grounding is not None
        )

    def reason(self, row: Mapping[str, Any]) -> str | None:
        """Why the filters take `row` (the pair's columns) out; None when it is kept."""
        if self.require_parsed and not row["parsed"]:
            return NOT_PARSED
        if self.min_grounding is not None and (row["grounding"] or 0.0) < self.min_grounding:
            return LOW_GROUNDING
        if (
            self.max_question_grounding is not None
            and (row["question_grounding"] or 0.0) > self.max_question_grounding
        ):
            return COPIED_QUESTION
        return None

    def record(self) -> dict[str, Any]:
        return {
            "require_parsed": self.require_parsed,
            "min_grounding": self.min_grounding,
            "max_question_grounding": self.max_question_grounding,
        }


@dataclass(frozen=True, slots=True)
class Curation:
    """What a run does with its pairs: the filters, then near-duplicate questions."""

    dedup: DedupMode = "mark"
    threshold: float = DEFAULT_THRESHOLD
    filters: Filters = Filters()

    def __post_init__(self) -> None:
        if self.dedup not in DEDUP_MODES:
            raise ValueError(f"dedup must be one of {', '.join(DEDUP_MODES)}")

    def index(self) -> QuestionIndex | None:
        """A fresh index of questions, None when duplicates are not looked for."""
        return None if self.dedup == "off" else QuestionIndex(self.threshold)

    def record(self) -> dict[str, Any]:
        """What the run record keeps of it: another curation makes other rows."""
        dedup: dict[str, Any] = {"mode": self.dedup}
        if self.dedup != "off":
            dedup |= {
                "library": "rensa",
                "library_version": rensa_version(),
                "threshold": self.threshold,
                "shingle_words": SHINGLE_WORDS,
                "num_perm": NUM_PERM,
                "num_bands": NUM_BANDS,
            }
        return {"dedup": dedup, "filters": self.filters.record()}
