"""The dataset card of a bulk output: a Hugging Face README.md with YAML front matter, and plots.

Written beside OUTPUT, in the folder OUTPUT's stem + .card, from the files alone (the output,
its run record, and the filtered, duplicates, errors and progress files), so `genstruct card
OUT` writes the same card again at any time. Needs matplotlib (the `curation` extra).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genstruct_client.bulk.errors import UsageError
from genstruct_client.bulk.run_record import read_record, record_path
from genstruct_client.bulk.writers import (
    card_path,
    output_records,
    read_jsonl_records,
    side_path,
)

# The license of the models the service is known to run, by the start of `model_name`
# (the demo stand-in reports "demo (gemma-3-270m ...)"); the pairs are the model's output.
MODEL_LICENSES = (
    ("genstruct-7b", "apache-2.0", "NousResearch/Genstruct-7B"),
    ("demo", "gemma", "google/gemma-3-270m"),
    ("gemma-3-270m", "gemma", "google/gemma-3-270m"),
)
PLOTS = {
    "parse_rate": "parse_rate.png",
    "grounding": "grounding.png",
    "lengths": "lengths.png",
    "duplicates": "duplicates_per_document.png",
    "throughput": "tokens_per_second.png",
}
_SIZE = (6.4, 4.0)  # inches; at 100 dpi a 640 x 400 image, readable as the README shows it
_DPI = 100


@dataclass
class FirstValues:
    """The first value that is not null of each output column (None while there is none),
    in the order the columns come: what the card's features are typed from. Rows are looked
    at until every column seen so far has a value; a column that first comes after that is
    not looked for."""

    values: dict[str, Any] = field(default_factory=dict)
    untyped: set[str] = field(default_factory=set)  # columns seen with nulls only, so far
    done: bool = False

    def see(self, row: Mapping[str, Any]) -> None:
        if self.done:
            return
        values = self.values
        if not row.keys() <= values.keys():
            for name, value in row.items():
                if name not in values:
                    values[name] = value
                    if value is None:
                        self.untyped.add(name)
        for name in self.untyped.intersection(row):
            if row[name] is not None:
                values[name] = row[name]
                self.untyped.discard(name)
        self.done = bool(values) and not self.untyped


@dataclass
class Figures:
    """What the card says of the pairs: counted over every pair the run generated (kept,
    filtered out, or moved aside as duplicates) unless said otherwise."""

    rows: int = 0  # in the output
    documents: int = 0  # in the output
    pairs: int = 0  # generated: the output's, the filtered and the moved-aside duplicates
    parsed: int = 0
    grounding: list[float] = field(default_factory=list)  # of parsed pairs
    question_grounding: list[float] = field(default_factory=list)
    question_words: list[int] = field(default_factory=list)  # of kept parsed pairs
    answer_words: list[int] = field(default_factory=list)
    duplicates_by_document: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    filtered: Counter[str] = field(default_factory=Counter)
    failed_documents: int = 0
    completion_tokens: int = 0
    columns: FirstValues = field(default_factory=FirstValues)  # of the output

    def add(self, row: Mapping[str, Any]) -> None:
        self.pairs += 1
        self.completion_tokens += int(row.get("completion_tokens") or 0)
        if not row.get("parsed"):
            return
        self.parsed += 1
        self.grounding.append(float(row.get("grounding") or 0.0))
        self.question_grounding.append(float(row.get("question_grounding") or 0.0))
        if row.get("duplicate_of") is not None:
            self.duplicates += 1
            self.duplicates_by_document[str(row["id"])] += 1

    def counts(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "documents": self.documents,
            "pairs_generated": self.pairs,
            "parsed": self.parsed,
            "duplicates": self.duplicates,
            "filtered": dict(sorted(self.filtered.items())),
            "failed_documents": self.failed_documents,
            "completion_tokens": self.completion_tokens,
        }


def _words(text: Any) -> int:
    return len(str(text).split()) if text else 0


def gather(output: Path) -> Figures:
    """The figures of an output and the files beside it, the output read once."""
    figures = Figures()
    documents: set[str] = set()
    for row in output_records(output):
        figures.rows += 1
        figures.columns.see(row)
        documents.add(str(row["id"]))
        figures.add(row)
        if row.get("parsed"):
            figures.question_words.append(_words(row.get("user")))
            figures.answer_words.append(_words(row.get("assistant")))
    figures.documents = len(documents)
    for row in read_jsonl_records(side_path(output, "filtered")):
        figures.filtered[str(row.get("filter_reason"))] += 1
        figures.add(row)
    for row in read_jsonl_records(side_path(output, "duplicates")):
        figures.add(row)
    failed = {str(row.get("id")) for row in read_jsonl_records(side_path(output, "errors"))
              if not row.get("retryable")}
    figures.failed_documents = len(failed)
    return figures


def pace(output: Path) -> list[tuple[float, float]]:
    """(seconds into the run, tokens/s since the line before) from the progress file; a
    resumed run's lines go on from where the last one ended, with no time between."""
    points: list[tuple[float, float]] = []
    offset = 0.0
    last: dict[str, Any] | None = None
    for line in read_jsonl_records(side_path(output, "progress")):
        if last is None or line.get("started") != last.get("started"):
            if last is not None:
                offset += float(last["time"]) - float(last["started"])
            last = {**line, "time": line["started"], "completion_tokens": 0}
        seconds = float(line["time"]) - float(last["time"])
        if seconds > 0:
            tokens = int(line["completion_tokens"]) - int(last["completion_tokens"])
            points.append((offset + float(line["time"]) - float(line["started"]),
                           tokens / seconds))
        last = line
    return points


# --- YAML front matter ---------------------------------------------------------------------


def _yaml(value: Any, indent: int = 0) -> Iterator[str]:
    """Lines of a small YAML document: mappings, lists and scalars (strings in JSON's
    double-quoted form, which YAML reads the same)."""
    pad = " " * indent
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, (Mapping, list)) and item:
                yield f"{pad}{key}:"
                yield from _yaml(item, indent + 2)
            else:
                yield f"{pad}{key}: {_scalar(item)}"
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (Mapping, list)) and item:
                first, *rest = list(_yaml(item, indent + 2))
                yield f"{pad}- {first.lstrip()}"
                yield from rest
            else:
                yield f"{pad}- {_scalar(item)}"
    else:
        yield f"{pad}{_scalar(value)}"


def _scalar(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list):
        return "[]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value, ensure_ascii=False)


def _feature(name: str, value: Any) -> dict[str, Any]:
    """The `dataset_info` feature of a column, from its value in a row."""
    if name == "evidence":
        return {"name": name, "list": [{"name": "start", "dtype": "int32"},
                                        {"name": "end", "dtype": "int32"}]}
    if name == "duplicate_of":
        return {"name": name, "struct": [{"name": "id", "dtype": "string"},
                                         {"name": "generation", "dtype": "int32"},
                                         {"name": "chunk_index", "dtype": "int32"}]}
    if isinstance(value, bool):
        dtype = "bool"
    elif isinstance(value, int):
        dtype = "int64"
    elif isinstance(value, float) or name in ("grounding", "question_grounding"):
        dtype = "float64"
    else:
        dtype = "string"
    return {"name": name, "dtype": dtype}


def _features(columns: FirstValues) -> list[dict[str, Any]]:
    """Features of every column, typed from the first row that has a value in it."""
    return [_feature(name, value) for name, value in columns.values.items()]


def model_license(model_name: str) -> tuple[str, str | None]:
    """(license id, Hub repository) of a model by the name the server reports."""
    name = model_name.casefold()
    for prefix, license_id, repo in MODEL_LICENSES:
        if name.startswith(prefix):
            return license_id, repo
    return "unknown", None


# --- plots -----------------------------------------------------------------------------------


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=_SIZE, dpi=_DPI)


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)
    plt.close(figure)


def _empty(axes: Any, what: str) -> None:
    axes.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=axes.transAxes)


def plot_all(figures: Figures, points: list[tuple[float, float]], folder: Path) -> None:
    """The card's PNG plots, each with a title and labelled axes."""
    fig, ax = _figure()
    not_parsed = figures.pairs - figures.parsed
    bars = ax.bar(["parsed", "did not parse"], [figures.parsed, not_parsed],
                  color=["tab:green", "tab:red"])
    ax.bar_label(bars)
    rate = figures.parsed / figures.pairs if figures.pairs else 0.0
    ax.set_title(f"Parse rate: {rate:.0%} of {figures.pairs} pairs generated")
    ax.set_xlabel("completion")
    ax.set_ylabel("pairs")
    _save(fig, folder / PLOTS["parse_rate"])

    fig, ax = _figure()
    bins = [i / 20 for i in range(21)]
    if figures.grounding:
        ax.hist([figures.grounding, figures.question_grounding], bins=bins,
                label=["answer (grounding)", "question (question_grounding)"],
                color=["tab:blue", "tab:orange"])
        ax.legend()
    else:
        _empty(ax, "parsed pairs")
    ax.set_title("Grounding: share of words copied from the document")
    ax.set_xlabel("share of the text's words in runs copied from the document")
    ax.set_ylabel("parsed pairs")
    ax.set_xlim(0, 1)
    _save(fig, folder / PLOTS["grounding"])

    fig, ax = _figure()
    if figures.question_words:
        top = max(max(figures.question_words), max(figures.answer_words), 1)
        step = max(1, math.ceil(top / 40))
        edges = list(range(0, top + 2 * step, step))
        ax.hist([figures.question_words, figures.answer_words], bins=edges,
                label=["question", "answer"], color=["tab:orange", "tab:blue"])
        ax.legend()
    else:
        _empty(ax, "parsed pairs in the output")
    ax.set_title("Question and answer lengths (pairs in the output)")
    ax.set_xlabel("length (words)")
    ax.set_ylabel("pairs")
    _save(fig, folder / PLOTS["lengths"])

    fig, ax = _figure()
    per_document = Counter(figures.duplicates_by_document.values())
    per_document[0] = figures.documents - len(figures.duplicates_by_document)
    counts = sorted(per_document)
    bars = ax.bar([str(n) for n in counts], [per_document[n] for n in counts],
                  color="tab:purple")
    ax.bar_label(bars)
    ax.set_title(f"Near-duplicate questions: {figures.duplicates} "
                 f"pair{'' if figures.duplicates == 1 else 's'}")
    ax.set_xlabel("pairs of a document whose question repeats an earlier one")
    ax.set_ylabel("documents")
    _save(fig, folder / PLOTS["duplicates"])

    fig, ax = _figure()
    if points:
        ax.plot([t for t, _ in points], [rate for _, rate in points], marker=".",
                color="tab:blue")
        ax.set_ylim(bottom=0)
    else:
        _empty(ax, "progress recorded")
    ax.set_title("Generation speed over the run")
    ax.set_xlabel("time into the run (s)")
    ax.set_ylabel("generated tokens/s")
    _save(fig, folder / PLOTS["throughput"])


# --- the card --------------------------------------------------------------------------------


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """sha256 of the run's fingerprint (keys sorted): equal for runs made alike."""
    text = json.dumps(fingerprint, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _median(values: Iterable[float]) -> float:
    found = list(values)
    return statistics.median(found) if found else 0.0


def card_text(output: Path, figures: Figures, record: Mapping[str, Any] | None) -> str:
    """README.md: the front matter, then what the data is and how it was made."""
    fingerprint: Mapping[str, Any] = (record or {}).get("fingerprint") or {}
    model = (fingerprint.get("model") or {}).get("model_name") or "unknown"
    license_id, model_repo = model_license(model)
    curation = fingerprint.get("curation") or {}
    meta: dict[str, Any] = {
        "license": license_id,
        "pretty_name": f"Genstruct pairs from {output.name}",
        "task_categories": ["question-answering", "text-generation"],
        "tags": ["synthetic", "genstruct", "instruction-response"],
        "size_categories": [_size_category(figures.rows)],
        "configs": [{
            "config_name": "default",
            "data_files": [{"split": "train", "path": output.name}],
        }],
        "dataset_info": {
            "features": _features(figures.columns),
            "splits": [{"name": "train", "num_examples": figures.rows}],
        },
        "genstruct": {
            "model": model,
            "model_license": license_id,
            **({"model_repo": model_repo} if model_repo else {}),
            "prompt_template": fingerprint.get("prompt_template", "unknown"),
            "fingerprint_sha256": fingerprint_hash(fingerprint) if fingerprint else "unknown",
            "fingerprint": dict(fingerprint),
            "counts": figures.counts(),
        },
    }
    front = "\n".join(_yaml(meta))
    rate = figures.parsed / figures.pairs if figures.pairs else 0.0
    grounded = sum(1 for g in figures.grounding if g > 0)
    filtered = ", ".join(f"{reason} {n}" for reason, n in sorted(figures.filtered.items()))
    dedup = curation.get("dedup") or {}
    stand_in = license_id == "gemma"
    lines = [
        "---", front, "---", "",
        f"# Genstruct pairs: {output.name}", "",
        f"Instruction/response pairs generated from documents by **{model}** through the "
        "genstruct-grpc service, with the Genstruct prompt "
        f"`{fingerprint.get('prompt_template', 'unknown')}`.",
        "",
    ]
    if stand_in:
        lines += [
            "> The model is the small demo stand-in (Gemma 3 270M), not Genstruct-7B: these "
            "pairs show the pipeline, not data worth training on. Their grounding says so.",
            "",
        ]
    lines += [
        "## Contents", "",
        f"- {figures.rows} rows in `{output.name}`, from {figures.documents} documents "
        f"({figures.failed_documents} documents failed).",
        f"- {figures.pairs} pairs generated, {figures.parsed} parsed ({rate:.1%}).",
        f"- Grounding (share of an answer's words in runs of at least "
        f"{curation.get('grounding_min_run_tokens', '?')} words copied from its document): "
        f"median {_median(figures.grounding):.2f} over parsed pairs; {grounded} answers copy "
        "at least one such run.",
        f"- Near-duplicate questions ({_dedup_words(dedup)}): {figures.duplicates}.",
        f"- Filtered out: {sum(figures.filtered.values())}"
        + (f" ({filtered})" if filtered else "") + ".",
        "",
        "## Columns", "",
        "`title`, `content`: the document. `user`, `assistant`: the question and the answer "
        "(null when the completion did not parse; `raw_text` keeps it). `evidence`: the spans "
        "of `content` (code points, [start, end)) the answer copies. `grounding`, "
        "`question_grounding`: the share of the answer's, the question's, words copied from "
        "the document. `duplicate_of`: the {id, generation} of the earlier pair whose question "
        "this one nearly repeats, or null.",
        "",
        "## Plots", "",
        f"![parse rate]({PLOTS['parse_rate']})",
        f"![grounding]({PLOTS['grounding']})",
        f"![lengths]({PLOTS['lengths']})",
        f"![duplicates per document]({PLOTS['duplicates']})",
        f"![tokens per second]({PLOTS['throughput']})",
        "",
        "## Licence", "",
        f"The pairs are the output of {model}"
        + (f" ([{model_repo}](https://huggingface.co/{model_repo}))" if model_repo else "")
        + f", under `{license_id}`; the documents' own licence applies to the text taken from "
        "them.",
        "",
    ]
    return "\n".join(lines)


def _dedup_words(dedup: Mapping[str, Any]) -> str:
    mode = dedup.get("mode", "unknown")
    if mode == "off":
        return "not looked for"
    return (
        f"{mode}, MinHash ({dedup.get('library', '?')}) over word pairs, Jaccard >= "
        f"{dedup.get('threshold', '?')}"
    )


def _size_category(rows: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if rows < limit:
            return name
    return "10M<n<100M"


def _recorded_facts(readme: str) -> dict[str, Any]:
    """The fingerprint hash and the whole-number counts that a card's front matter gives
    (`genstruct.fingerprint_sha256` and `genstruct.counts`, as _yaml writes them); those it
    lacks are left out."""
    front = readme.split("\n---\n", 1)[0]
    facts: dict[str, Any] = {}
    found = re.search(r'^  fingerprint_sha256: "([0-9a-f]{64})"$', front, re.MULTILINE)
    if found:
        facts["fingerprint_sha256"] = found.group(1)
    counts = re.search(r"^  counts:\n((?:    .*\n?)*)", front, re.MULTILINE)
    if counts:
        for name, value in re.findall(r"^    (\w+): (\d+)$", counts.group(1), re.MULTILINE):
            facts[name] = int(value)
    return facts


def is_current(output: Path, counts: Mapping[str, int]) -> bool:
    """Whether OUTPUT's card on disk was written from its files as they are, for a caller
    that knows none of them changed since it was (a resume that wrote nothing): its README
    and plots are there, and its front matter gives the run record's fingerprint and
    `counts` (some of Figures.counts(), as the caller counted them)."""
    output = Path(output)
    folder = card_path(output)
    readme = folder / "README.md"
    if not all((folder / name).is_file() for name in PLOTS.values()):
        return False
    try:
        facts = _recorded_facts(readme.read_text(encoding="utf-8"))
        record = read_record(record_path(output))
    except (OSError, ValueError, UsageError):  # no README, not UTF-8, an unreadable record
        return False
    if record is None:
        return False
    return facts.get("fingerprint_sha256") == fingerprint_hash(record["fingerprint"]) and all(
        facts.get(name) == value for name, value in counts.items()
    )


def write_card(output: Path) -> Path:
    """Writes OUTPUT's card folder (README.md and the plots); returns the README's path."""
    output = Path(output)
    record = read_record(record_path(output))
    figures = gather(output)
    folder = card_path(output)
    folder.mkdir(parents=True, exist_ok=True)
    plot_all(figures, pace(output), folder)
    readme = folder / "README.md"
    readme.write_text(card_text(output, figures, record), encoding="utf-8")
    return readme

