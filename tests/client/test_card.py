"""The dataset card: a README.md that huggingface_hub reads as a dataset card, and plots with
titles and labelled axes, made from an output's files alone."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from genstruct_client import card as card_module
from genstruct_client.bulk import run_record
from genstruct_client.bulk.writers import COLUMNS, encode_line
from genstruct_client.card import PLOTS, fingerprint_hash, write_card
from huggingface_hub import DatasetCard

FINGERPRINT = {
    "model": {"model_name": "demo (gemma-3-270m Q4_K_M stand-in)", "model_file": "x.gguf"},
    "prompt_template": "genstruct/1",
    "curation": {"dedup": {"mode": "mark", "library": "rensa", "threshold": 0.7},
                 "filters": {"require_parsed": True}, "grounding_min_run_tokens": 6},
}


def row(doc: str, generation: int, *, parsed: bool = True, grounding: float = 0.5,
        duplicate_of: dict[str, Any] | None = None) -> dict[str, Any]:
    values = {
        "id": doc, "generation_index": generation, "title": "T", "content": "some content",
        "user": "What is it?" if parsed else None, "assistant": "It is so." if parsed else None,
        "model_name": "demo", "parsed": parsed, "finish_reason": "eos", "prompt_tokens": 10,
        "completion_tokens": 7, "truncated": False, "raw_text": "raw",
        "evidence": [{"start": 0, "end": 4}] if grounding else [], "grounding": grounding,
        "question_grounding": 0.0, "duplicate_of": duplicate_of,
    }
    assert list(values) == list(COLUMNS)
    return {**values, "source": "wiki"}  # a column passed through from the input


@pytest.fixture
def output(tmp_path: Path) -> Path:
    out = tmp_path / "pairs.jsonl"
    rows = [row("a", 0), row("a", 1, duplicate_of={"id": "a", "generation": 0}),
            row("b", 0, grounding=0.0), row("c", 0, grounding=1.0)]
    out.write_bytes(b"".join(encode_line(r) for r in rows))
    (tmp_path / "pairs.filtered.jsonl").write_bytes(
        encode_line({**row("d", 0, parsed=False, grounding=0.0), "filter_reason": "not_parsed"})
    )
    (tmp_path / "pairs.progress.jsonl").write_text("".join(json.dumps(line) + "\n" for line in [
        {"started": 100.0, "time": 101.0, "completion_tokens": 50},
        {"started": 100.0, "time": 102.0, "completion_tokens": 150},
        {"started": 500.0, "time": 502.0, "completion_tokens": 40},  # a resumed run
    ]))
    run_record.write(run_record.record_path(out), FINGERPRINT)
    return out


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def test_the_card_is_a_hugging_face_dataset_card(output: Path) -> None:
    readme = write_card(output)
    assert readme == output.with_name("pairs.card") / "README.md"
    card = DatasetCard.load(readme)
    data = card.data.to_dict()
    assert data["license"] == "gemma"
    assert data["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "pairs.jsonl"}]}]
    features = {f["name"]: f for f in data["dataset_info"]["features"]}
    assert list(features) == [*COLUMNS, "source"]
    assert features["grounding"]["dtype"] == "float64"
    assert features["parsed"]["dtype"] == "bool"
    assert [f["name"] for f in features["evidence"]["list"]] == ["start", "end"]
    assert data["dataset_info"]["splits"] == [{"name": "train", "num_examples": 4}]
    facts = data["genstruct"]
    assert facts["model"] == FINGERPRINT["model"]["model_name"]
    assert facts["model_license"] == "gemma" and facts["prompt_template"] == "genstruct/1"
    assert facts["fingerprint_sha256"] == fingerprint_hash(FINGERPRINT)
    assert facts["counts"] == {
        "rows": 4, "documents": 3, "pairs_generated": 5, "parsed": 4, "duplicates": 1,
        "filtered": {"not_parsed": 1}, "failed_documents": 0, "completion_tokens": 35,
    }
    assert "stand-in" in card.text
    for name in PLOTS.values():
        assert f"]({name})" in card.text
        assert png_size(readme.parent / name) == (640, 400)


def test_every_plot_has_a_title_and_labelled_axes(
    output: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved: dict[str, Any] = {}
    real_save = card_module._save

    def save(figure: Any, path: Path) -> None:
        saved[path.name] = [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel())
                            for ax in figure.axes]
        real_save(figure, path)

    monkeypatch.setattr(card_module, "_save", save)
    write_card(output)
    assert sorted(saved) == sorted(PLOTS.values())
    for name, axes in saved.items():
        assert axes and all(all(label.strip() for label in labels) for labels in axes), name


def test_tokens_per_second_runs_on_across_a_resume(output: Path) -> None:
    # 50 tokens in the first second, 100 in the next; the resumed run's 40 in 2 s
    assert card_module.pace(output) == [(1.0, 50.0), (2.0, 100.0), (4.0, 20.0)]


def test_a_card_without_a_run_record_says_unknown(tmp_path: Path) -> None:
    out = tmp_path / "bare.jsonl"
    out.write_bytes(encode_line(row("a", 0)))
    card = DatasetCard.load(write_card(out))
    assert card.data.to_dict()["genstruct"]["model"] == "unknown"
    assert card.data.to_dict()["license"] == "unknown"


def test_the_output_is_read_once(output: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a resume of a million rows spent a third of its time reading them twice for the card
    read: list[Path] = []
    real = card_module.output_records

    def counted(path: Path) -> Any:
        read.append(path)
        return real(path)

    monkeypatch.setattr(card_module, "output_records", counted)
    card = DatasetCard.load(write_card(output))
    assert read == [output]
    features = card.data.to_dict()["dataset_info"]["features"]
    assert [f["name"] for f in features] == [*COLUMNS, "source"]


def test_features_are_typed_from_the_first_value_that_is_not_null(tmp_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    rows = [row("a", 0, parsed=False), {**row("b", 0), "late": 3}]  # user first null
    out.write_bytes(b"".join(encode_line(r) for r in rows))
    features = DatasetCard.load(write_card(out)).data.to_dict()["dataset_info"]["features"]
    dtypes = {f["name"]: f.get("dtype") for f in features}
    assert dtypes["user"] == "string" and dtypes["late"] == "int64"
    assert dtypes["duplicate_of"] is None  # a struct, typed by name though always null
