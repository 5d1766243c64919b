"""Sharded runs: which documents a shard takes, and the merge of finished shards into one file.

Shards are 0-based, like a Kubernetes Indexed Job's JOB_COMPLETION_INDEX: `--shard I/N` takes
the documents whose id hashes (sha256, so the same in every process and on every machine) to
I, whatever the order of the input. Each shard writes its own output with its own run record;
the shard is part of the fingerprint, so a rerun with another shard refuses the output.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genstruct_client.bulk.errors import UsageError
from genstruct_client.bulk.run_record import RECORD_VERSION, differences, read_record, record_path
from genstruct_client.bulk.writers import (
    Output,
    detect_output_format,
    encode_line,
    ensure_unlocked,
    journal_path,
    output_records,
    side_path,
    write_json_atomic,
)
from genstruct_client.curation import DEFAULT_THRESHOLD, Curation
from genstruct_client.rows import duplicate_key

# Where an Indexed Job's pod finds its shard. Kubernetes sets the index itself; it does not
# set the count (completions), so the count is read from GENSTRUCT_SHARDS (or JOB_COMPLETIONS,
# which some set by hand), given in the pod's env.
INDEX_ENV = "JOB_COMPLETION_INDEX"
COUNT_ENVS = ("GENSTRUCT_SHARDS", "JOB_COMPLETIONS")
PLACEHOLDER = "{shard}"  # in the output name: replaced by the shard's index


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `index` (0-based) of `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UsageError(
                f"shard {self.index}/{self.count}: the index must be 0 to {self.count - 1} "
                "(shards are 0-based, like JOB_COMPLETION_INDEX)"
            )

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """`I/N`."""
        index, slash, count = spec.partition("/")
        try:
            if not slash:
                raise ValueError
            return cls(int(index), int(count))
        except ValueError:
            raise UsageError(f"--shard {spec!r} is not I/N (e.g. 0/4, 0-based)") from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Shard | None:
        """The shard of an Indexed Job's pod; None outside one."""
        env = os.environ if env is None else env
        index = env.get(INDEX_ENV, "").strip()
        if not index:
            return None
        count = next((env[name].strip() for name in COUNT_ENVS if env.get(name, "").strip()), "")
        if not count:
            raise UsageError(
                f"{INDEX_ENV} is set but not the number of shards: set {COUNT_ENVS[0]} to the "
                "Job's completions, or pass --shard I/N"
            )
        return cls.parse(f"{index}/{count}")

    def takes(self, doc_id: str) -> bool:
        """Whether the document `doc_id` is this shard's."""
        return shard_of(doc_id, self.count) == self.index

    def record(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count}

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(doc_id: str, count: int) -> int:
    """The shard of a document id: its sha256, never Python's hash() (salted per process)."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def output_for(output: Path, shard: Shard | None) -> Path:
    """`output` with `{shard}` replaced by the shard's index."""
    if PLACEHOLDER not in output.name:
        return output
    if shard is None:
        raise UsageError(f"the output {output} names {PLACEHOLDER} but the run is not sharded")
    return output.with_name(output.name.replace(PLACEHOLDER, str(shard.index)))


@dataclass(slots=True)
class MergeSummary:
    """What a merge did."""

    output: Path
    shards: int = 0
    rows: int = 0
    duplicates: int = 0  # (id, generation) rows met again in another shard: written once
    # pairs whose question nearly repeats one of an earlier shard (the cross-shard pass):
    # marked in duplicate_of, or moved to the merged duplicates file (--dedup drop)
    near_duplicates: int = 0
    dedup: str = "off"
    card: Path | None = None
    card_problem: str | None = None

    def report(self) -> str:
        extra = f"; {self.duplicates} repeated rows left out" if self.duplicates else ""
        lines = [f"merged {self.shards} shards, {self.rows} rows, into {self.output}{extra}"]
        if self.dedup != "off":
            where = (
                f"moved to {side_path(self.output, 'duplicates')}" if self.dedup == "drop"
                else "marked in duplicate_of"
            )
            lines.append(
                f"{self.near_duplicates} pairs nearly repeat a question of an earlier shard: "
                f"{where}"
            )
        if self.card is not None:
            lines.append(f"dataset card: {self.card}")
        elif self.card_problem:
            lines.append(f"no dataset card: {self.card_problem}")
        return "\n".join(lines)


def _shard_outputs(paths: Sequence[Path], merged: Path) -> list[Path]:
    """The outputs named by `paths`: files, or every output with a run record in a folder."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            for record in sorted(path.glob("*.run.json")):
                out = record.with_name(record.name[: -len(".run.json")])
                # Not the file being written, nor one an earlier merge wrote.
                if out.resolve() != merged.resolve() and "merged_from" not in (
                    read_record(record) or {}
                ):
                    found.append(out)
        elif path.name.endswith(".run.json"):
            found.append(path.with_name(path.name[: -len(".run.json")]))
        else:
            found.append(path)
    if not found:
        raise UsageError(f"no shard outputs (OUTPUT.run.json) in {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def _check_shards(outputs: list[Path]) -> dict[str, Any]:
    """The fingerprint every shard shares; UsageError naming the shard that is unfinished,
    missing, repeated or made with another configuration."""
    first: tuple[Path, dict[str, Any]] | None = None
    indices: dict[int, Path] = {}
    count = 0
    for output in outputs:
        record = read_record(record_path(output))
        if record is None:
            raise UsageError(f"{output} has no run record {record_path(output)}")
        fingerprint = dict(record["fingerprint"])
        shard = fingerprint.pop("shard", None)
        if not isinstance(shard, dict):
            raise UsageError(f"{output} is not a shard's output (its run had no --shard)")
        name = f"shard {shard['index']}/{shard['count']} ({output})"
        if not record.get("finished"):
            raise UsageError(f"{name} is unfinished: rerun it to the end, then merge")
        fmt = detect_output_format(output)
        ensure_unlocked(journal_path(output, fmt))
        if not output.exists():
            raise UsageError(f"{name} is recorded as finished but {output} is missing")
        if first is None:
            first, count = (output, fingerprint), int(shard["count"])
        else:
            changed = differences(first[1], fingerprint)
            if changed:
                raise UsageError(
                    f"{name} was made with another configuration than {first[0]}: "
                    f"{'; '.join(changed)}"
                )
            if shard["count"] != count:
                raise UsageError(f"{name} is one of {shard['count']} shards, {first[0]} of {count}")
        if shard["index"] in indices:
            raise UsageError(f"{name} and {indices[shard['index']]} are the same shard")
        indices[int(shard["index"])] = output
    missing = sorted(set(range(count)) - set(indices))
    if missing:
        raise UsageError(
            f"shard {', '.join(f'{i}/{count}' for i in missing)} is missing: merge every shard"
        )
    assert first is not None
    return first[1]


def merge(
    paths: Sequence[str | Path], output_path: str | Path, fmt: str | None = None,
    *, card: bool = True,
) -> MergeSummary:
    """Combines finished shard outputs into one JSONL or Parquet file, each (id, generation)
    once; raises UsageError (naming the shard) when one is unfinished, missing, repeated or
    made with another configuration. The file is written whole or not at all.

    Each shard found near-duplicate questions within itself; the merge does the pass across
    shards, in shard order, with the shards' own curation settings: a pair whose question
    nearly repeats one kept by an earlier shard is marked, or moved to the merged output's
    duplicates file. The shards' filtered, duplicates, errors and progress files are combined
    beside the merged output, and `card` writes its dataset card.
    """
    merged = Path(output_path)
    fmt = fmt or detect_output_format(merged)
    outputs = _shard_outputs([Path(path) for path in paths], merged)
    fingerprint = _check_shards(outputs)
    outputs.sort(key=_shard_index)
    curation = _curation(fingerprint)
    chunked = fingerprint.get("truncation") == "chunk"
    summary = MergeSummary(output=merged, shards=len(outputs), dedup=curation.dedup)
    index = curation.index()
    # Written beside the file, then renamed: a merge that stops leaves no half file.
    partial = merged.with_name(merged.name + ".partial")
    for stale in (partial, journal_path(partial, fmt)):
        stale.unlink(missing_ok=True)
    out = Output(partial, fmt)
    moved: list[dict[str, Any]] = []  # near duplicates across shards, with --dedup drop
    seen: set[tuple[str, int, int]] = set()
    try:
        for shard_output in outputs:
            for row in output_records(shard_output):
                key = (str(row["id"]), int(row.get("chunk_index") or 0),
                       int(row["generation_index"]))
                if key in seen:
                    summary.duplicates += 1
                    continue
                seen.add(key)
                if index is not None and row.get("parsed") and row.get("duplicate_of") is None:
                    earlier = index.check(
                        row.get("user"), (key[0], key[2], key[1] if chunked else None)
                    )
                    if earlier is not None:
                        row["duplicate_of"] = duplicate_key(*earlier)
                        summary.near_duplicates += 1
                        if curation.dedup == "drop":
                            moved.append(row)
                            continue
                out.journal.append(row)
                summary.rows += 1
                if summary.rows % 4096 == 0:  # lines out of memory, a batch at a time
                    out.journal.flush()
        out.finish()
    finally:
        out.close()
    os.replace(partial, merged)
    for kind in ("filtered", "duplicates", "errors", "progress"):
        extra = moved if kind == "duplicates" else []
        _combine([side_path(shard, kind) for shard in outputs], side_path(merged, kind), extra)
    write_json_atomic(
        record_path(merged),
        {
            "genstruct_run": RECORD_VERSION,
            "merged_from": [str(path) for path in outputs],
            "fingerprint": fingerprint,
        },
    )
    if card:
        try:
            from genstruct_client.card import write_card

            summary.card = write_card(merged)
        except ImportError as exc:
            summary.card_problem = (
                f"{exc.name or exc} is not installed (pip install 'genstruct-grpc[curation]')"
            )
    return summary


def _shard_index(output: Path) -> int:
    record = read_record(record_path(output)) or {}
    return int(record["fingerprint"]["shard"]["index"])


def _curation(fingerprint: Mapping[str, Any]) -> Curation:
    """The curation the shards were made with (as their run record keeps it)."""
    recorded = fingerprint.get("curation") or {}
    dedup = recorded.get("dedup") or {}
    return Curation(
        dedup=dedup.get("mode", "off"),
        threshold=float(dedup.get("threshold", DEFAULT_THRESHOLD)),
    )


def _combine(parts: list[Path], target: Path, extra: list[dict[str, Any]]) -> None:
    """The lines of every part, then `extra`, into `target` (whole or not at all); nothing
    is written when there is nothing to write."""
    found = [part for part in parts if part.exists() and part.stat().st_size]
    if not found and not extra:
        target.unlink(missing_ok=True)
        return
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as file:
        for part in found:
            with part.open("rb") as source:
                shutil.copyfileobj(source, file)
        for record in extra:
            file.write(encode_line(record))
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, target)
