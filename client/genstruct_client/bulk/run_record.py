"""The run record: what a bulk output was made with, kept beside it as `OUTPUT.run.json`.

A resumed run appends to what an earlier run wrote, so both must have used the same model,
prompt and settings, or the output mixes configurations. The record holds the run's
fingerprint; a run whose fingerprint differs is refused (UsageError naming the fields),
unless it is told to start a new output. The model is identified by what GetModelInfo
reports: its name, file name, quantisation, parameter count and architecture. The server
reports no hash of the weights file, so a file replaced by another of the same name and
shape is not told apart.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from genstruct.v1 import genstruct_pb2 as pb

from genstruct_client._batching import ResubmitPolicy
from genstruct_client.aio import AsyncGenstructClient
from genstruct_client.bulk.documents import ColumnMapping
from genstruct_client.bulk.errors import UsageError
from genstruct_client.bulk.writers import ensure_unlocked, has_content, write_json_atomic
from genstruct_client.channel import ChannelConfig
from genstruct_client.curation import Curation
from genstruct_client.types import GenerationOptions

log = logging.getLogger("genstruct_client.bulk")

# The server does not report its prompt template, so the client names the one it expects:
# service/genstruct_service/templates/genstruct.jinja, the Genstruct-7B prompt. Bump it when
# that template changes (tests/client pin the template's text to this version).
PROMPT_TEMPLATE_VERSION = "genstruct/1"
RECORD_VERSION = 1
_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "max_tokens",
)
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
# Fingerprint fields added since the first records: an older record without one is accepted
# (its value is unknown), and kept as it is.
_UNRECORDED = ("curation.dedup.library_version",)
# Once one server has answered, how long the others of a list of addresses get to answer
# too; one that is down is not waited for (round_robin works around it), only logged.
_GRACE_SECONDS = 5.0


class RunMismatch(UsageError):
    """The output was made with another configuration than this run's."""


class ServersUnavailable(Exception):
    """No server answered GetModelInfo within the retry budget (or one refused it for good)."""


def record_path(output: Path) -> Path:
    return output.with_name(output.name + ".run.json")


def _number(value: Any) -> Any:
    # Floats travel as 32-bit floats: 0.7 and the server's 0.699999988 are the same setting.
    return float(f"{value:.7g}") if isinstance(value, float) else value


def fingerprint(
    info: pb.GetModelInfoResponse,
    options: GenerationOptions,
    columns: ColumnMapping,
    curation: Curation | None = None,
) -> dict[str, Any]:
    """What makes two runs' rows comparable. Sampling is as in force: a setting left unset
    is the server's default (GetModelInfo `default_sampling`), so a server whose defaults
    changed is a change too; `seed` None is a fresh seed per request. `columns` is resolved
    (its id column settled). `curation`: what the run filters and deduplicates (None: the
    default, Curation()); with the server's grounding run length, it decides which rows go
    where."""
    curation = curation or Curation()
    defaults = {field.name: value for field, value in info.default_sampling.ListFields()}
    sampling: dict[str, Any] = {}
    for name in _SAMPLING:
        value = getattr(options, name)
        sampling[name] = _number(defaults.get(name) if value is None else value)
    sampling["stop"] = list(options.stop)
    return {
        "model": {
            "model_name": info.model_name,
            "model_file": info.model_file,
            "quantization": info.quantization,
            "parameter_count": info.parameter_count,
            "architecture": info.architecture,
        },
        "prompt_template": PROMPT_TEMPLATE_VERSION,
        "sampling": sampling,
        "num_generations": options.num_generations,
        # as in force: unset is the server's default
        "constrained": info.default_constrained
        if options.constrained is None
        else options.constrained,
        "truncation": "chunk" if options.chunk else "truncate" if options.truncate
        else "refuse",
        "id_column": columns.id_column,  # other ids: every document would be written again
        # other columns: other documents under the same ids, or rows of other shapes, mixed
        "columns": {
            "title": columns.title,
            "content": columns.content,
            "passed_through": ["*"] if columns.columns is None else list(columns.columns),
        },
        # the parts a document is split into: another size would write other parts
        **({"chunking": {
            "chunk_tokens": options.chunk_tokens or info.limits.default_chunk_tokens,
            "chunk_overlap": options.chunk_overlap,  # None: the server's default for the size
            "server_default_overlap": info.limits.default_chunk_overlap_tokens,
        }} if options.chunk else {}),
        "curation": {
            **curation.record(),
            "grounding_min_run_tokens": info.grounding_min_run_tokens,
        },
    }


def _flat(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, Mapping):
            flat.update(_flat(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`field old -> new` for every field that differs."""
    before, after = _flat(old), _flat(new)
    return [
        f"{key} {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
        for key in dict.fromkeys([*after, *before])
        if before.get(key) != after.get(key)
    ]


def read_record(path: Path) -> dict[str, Any] | None:
    """The run record at `path`, None when there is none."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the run record {path} ({exc}); see --new-run") from None
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), dict):
        raise UsageError(f"{path} is not a run record; see --new-run")
    return record


def _with_unrecorded(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """`recorded` with the fields of _UNRECORDED that it lacks and `current` has, taken from
    `current`: a record written before a field was kept says nothing of it, so its value is
    unknown, and accepted rather than refused."""
    known = copy.deepcopy(dict(recorded))
    for path in _UNRECORDED:
        *parents, name = path.split(".")
        old: Any = known
        new: Any = current
        for key in parents:
            old, new = old.get(key), new.get(key)
            if not isinstance(old, dict) or not isinstance(new, Mapping):
                break
        else:
            if name not in old and name in new:
                old[name] = new[name]
    return known


def _advice(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """What to do about a mismatch: for another rensa, the version to install."""
    old = recorded.get("curation", {}).get("dedup", {}).get("library_version")
    new = current.get("curation", {}).get("dedup", {}).get("library_version")
    if old is not None and new is not None and old != new:
        return (
            f"The duplicates were marked with rensa {old} and rensa {new} is installed (another "
            "version may mark other pairs): install the recorded one (pip install "
            f"'rensa=={old}') to resume it, or pass --new-run to move it aside and start a "
            "new output"
        )
    return (
        "Rerun with the settings and servers it was made with to resume it, or pass "
        "--new-run to move it aside and start a new output"
    )


def check(path: Path, current: dict[str, Any], output: Path, earlier_files: list[Path]) -> bool:
    """Whether the record must be written; RunMismatch when the record at `path` holds another
    fingerprint and the run it describes wrote rows, or when there are rows but no record."""
    record = read_record(path)
    written = [file for file in earlier_files if has_content(file)]
    if record is not None:
        recorded = _with_unrecorded(record["fingerprint"], current)
        changed = differences(recorded, current)
        if changed and written:
            raise RunMismatch(
                f"{output} was made with another configuration (see {path}): "
                f"{'; '.join(changed)}. {_advice(recorded, current)}"
            )
        # A record of a run that wrote nothing describes nothing: this run's replaces it.
        return bool(changed)
    if written:
        raise RunMismatch(
            f"{written[0]} holds rows but there is no run record {path}, so what they were "
            "made with is unknown (written by an older genstruct?); pass --new-run to move "
            "them aside and start a new output"
        )
    return True


def write(path: Path, current: dict[str, Any]) -> None:
    """Writes the run record (before the first row, so that no row is ever without one)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    write_json_atomic(
        path,
        {
            "genstruct_run": RECORD_VERSION,
            "started": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "fingerprint": current,
        },
    )


def mark_finished(path: Path, finished: bool) -> None:
    """Records that the run ended with every document written or failed for good (`finished`),
    or takes that back when a run resumes the output; a merge takes only finished outputs."""
    record = read_record(path)
    if record is None or bool(record.get("finished")) == finished:
        return
    if finished:
        now = datetime.datetime.now(datetime.timezone.utc)
        record["finished"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    else:
        record.pop("finished", None)
    write_json_atomic(path, record)


def started_stamp(path: Path) -> str:
    """When the run recorded at `path` started (now, without a readable record), for names."""
    try:
        started = (read_record(path) or {}).get("started")
    except UsageError:
        started = None  # an unreadable record is moved aside like the rest
    if isinstance(started, str) and started:
        return started.replace("-", "").replace(":", "")
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def move_aside(renames: list[tuple[Path, Path]]) -> list[Path]:
    """Renames an earlier run's files (none may be in use), so that a new run starts from
    nothing and nothing is lost; returns the new names."""
    for old, _ in renames:
        ensure_unlocked(old)
    for old, new in renames:
        old.rename(new)
    return [new for _, new in renames]


def addresses(target: str) -> list[str]:
    """The targets of each server an ipv4:/ipv6: list names; other targets as they are."""
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            parts = [part for part in target[len(scheme) :].split(",") if part]
            return [scheme + part for part in parts] if len(parts) > 1 else [target]
    return [target]


async def _ask(
    config: ChannelConfig, target: str, deadline: float, policy: ResubmitPolicy
) -> pb.GetModelInfoResponse:
    async with AsyncGenstructClient(config=dataclasses.replace(config, target=target)) as client:
        failures = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await client.model_info(timeout=max(0.5, min(10.0, remaining)))
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _TRANSIENT or time.monotonic() >= deadline:
                    raise
            failures += 1
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.sleep(min(policy.backoff(failures), remaining))


def _failure(target: str, error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"GetModelInfo of {target}: {error.code().name}: {error.details()}"
    return f"GetModelInfo of {target}: {error!r}"


async def server_infos(
    config: ChannelConfig, policy: ResubmitPolicy
) -> dict[str, pb.GetModelInfoResponse]:
    """GetModelInfo of every server the target names (of one, for a dns: name), retried
    while the servers are unavailable, for up to `policy.budget_seconds`.

    Raises ServersUnavailable when none answered, or one refused for good (a bad token).
    """
    deadline = time.monotonic() + policy.budget_seconds
    tasks = {
        asyncio.create_task(_ask(config, target, deadline, policy)): target
        for target in addresses(config.target)
    }
    answers: dict[str, pb.GetModelInfoResponse] = {}
    failures: dict[str, str] = {}
    pending = set(tasks)
    grace: float | None = None
    try:
        while pending:
            timeout = None if grace is None else max(0.0, grace - time.monotonic())
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break  # the rest did not answer in time
            for task in done:
                target, error = tasks[task], task.exception()
                if error is None:
                    answers[target] = task.result()
                    continue
                failures[target] = _failure(target, error)
                transient = isinstance(error, grpc.aio.AioRpcError) and error.code() in _TRANSIENT
                if not transient:
                    raise ServersUnavailable(failures[target])
            if answers and grace is None:
                grace = time.monotonic() + _GRACE_SECONDS
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    if not answers:
        raise ServersUnavailable("; ".join(failures.values()) or "no server answered")
    for target in tasks.values():
        if target not in answers:
            log.warning(
                "%s did not answer GetModelInfo (%s): what it serves is not checked",
                target,
                failures.get(target, "no answer in time"),
            )
    return answers


def agreed_fingerprint(
    answers: Mapping[str, pb.GetModelInfoResponse],
    options: GenerationOptions,
    columns: ColumnMapping,
    curation: Curation | None = None,
) -> dict[str, Any]:
    """The fingerprint every server gives; RunMismatch when two servers differ."""
    prints = {
        target: fingerprint(info, options, columns, curation) for target, info in answers.items()
    }
    (first, current), *others = prints.items()
    for target, other in others:
        changed = differences(current, other)
        if changed:
            raise RunMismatch(
                f"the servers do not run the same configuration, {first} -> {target}: "
                f"{'; '.join(changed)}; a run must not mix them: give --target servers "
                "that serve the same model with the same defaults"
            )
    return current
