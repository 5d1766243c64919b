"""bench.speculation without a model: each round's paired ratios, from runs made up here,
the order each round runs its systems in, and `--each-alone`'s runs of one document each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.speculation import (
    Run,
    acceptance_table,
    documents,
    main,
    paired_table,
    round_order,
    summed,
)

SYSTEMS = ["engine:off", "engine:auto", "server:ngram-mod", "server:ngram-simple"]


def rounds(*speeds: tuple[float | None, ...]) -> list[dict[tuple[str, int], Run]]:
    """A round per row of tok/s in SYSTEMS' order (None: that system did not run)."""
    return [
        {
            (s, 8): Run(s, 8, 12, int(x * 10), 10.0, 0, 0)
            for s, x in zip(SYSTEMS, row, strict=True)
            if x is not None
        }
        for row in speeds
    ]


def test_each_round_is_paired_with_its_own_runs_and_the_best_ngram_by_median() -> None:
    table = paired_table(
        rounds(
            (60.0, None, 50.0, 90.0),  # auto did not run
            (100.0, 110.0, 90.0, 95.0),
            (50.0, 45.0, 60.0, 41.0),  # the machine slowed for this round
            (80.0, 88.0, 70.0, 85.0),
        ),
        SYSTEMS, [8],
    )
    rows = [line.split() for line in table.splitlines()[1:]]
    # ngram-simple's median round (85) beats ngram-mod's (60): it is the n-gram to beat;
    # auto's three runs pair with the last three rounds, not the first three
    assert rows == [
        ["engine:off", "8", "server:ngram-simple", "0.94x", "0.67", "1.05", "1.22", "0.94"],
        ["engine:auto", "8", "engine:off", "1.10x", "1.10", "0.90", "1.10"],
        ["engine:auto", "8", "server:ngram-simple", "1.10x", "1.16", "1.10", "1.04"],
        ["server:ngram-mod", "8", "engine:off", "0.88x", "0.83", "0.90", "1.20", "0.88"],
        ["server:ngram-mod", "8", "server:ngram-simple", "0.82x", "0.56", "0.95", "1.46",
         "0.82"],
        ["server:ngram-simple", "8", "engine:off", "0.95x", "1.50", "0.95", "0.82", "1.06"],
    ]


def test_rounds_alternate_the_order_of_their_systems() -> None:
    systems = ["engine:off", "engine:auto", "server:ngram-mod"]
    orders = [round_order(systems, r) for r in range(4)]
    assert orders == [systems, systems[::-1], systems, systems[::-1]]
    # over a pair of rounds each system runs in every position's mirror: first and last
    # alike, so neither sits always after the other
    assert all(orders[0].index(s) + orders[1].index(s) == len(systems) - 1 for s in systems)
    assert systems == ["engine:off", "engine:auto", "server:ngram-mod"]  # left as given


def test_runs_of_one_document_each_add_up_to_one_run_of_them_all() -> None:
    first = Run("engine:auto", 1, 1, 128, 2.0, 10, 8, ["b"], {1: 0.01, 2: 0.02},
                {2: [1, 10, 9, 8]}, 1.5)  # fmt: skip
    second = Run("engine:auto", 1, 1, 100, 3.0, 22, 22, ["a"], {1: 0.03},
                  {2: [2, 6, 6, 6], 8: [1, 16, 16, 16]}, 2.5)  # fmt: skip
    run = summed([first, second])
    assert (run.system, run.in_flight, run.documents) == ("engine:auto", 1, 2)
    assert (run.generated_tokens, run.seconds, run.decode_seconds) == (228, 5.0, 4.0)
    assert (run.drafted, run.accepted) == (32, 30)
    assert run.texts == ["a", "b"]
    assert run.by_match == {2: [3, 16, 15, 14], 8: [1, 16, 16, 16]}
    assert run.step_costs == {1: 0.01, 2: 0.02}  # the first document's, as timed for it
    assert first.by_match == {2: [1, 10, 9, 8]}  # its parts are left as they were


def test_the_acceptance_table_lists_borrowed_drafts_after_the_requests_own() -> None:
    runs = [
        Run("engine:auto", 1, 1, 128, 2.0, 36, 30, by_match={8: [1, 16, 16, 16],
                                                               -2: [2, 8, 5, 4]}),
        Run("engine:auto", 1, 1, 128, 2.0, 28, 23, by_match={-2: [1, 4, 4, 4],
                                                               3: [3, 8, 6, 5]}),
    ]  # fmt: skip
    rows = [line.split() for line in acceptance_table(runs).splitlines()[1:]]
    assert rows == [
        ["engine:auto", "3", "3", "8", "6", "5", "0.83", "0.62"],
        ["engine:auto", "8", "1", "16", "16", "16", "1.00", "1.00"],
        ["engine:auto", "2", "borrowed", "3", "12", "9", "8", "0.89", "0.67"],
    ]


def test_only_picks_one_of_the_first_n_documents(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(
        json.dumps({"title": f"T{i}", "content": f"C{i}"}) + "\n" for i in range(4)
    ))  # fmt: skip
    assert [d.title for d in documents(3, path)] == ["T0", "T1", "T2"]
    assert [d.title for d in documents(3, path, only=1)] == ["T1"]
    assert documents(3, path, only=3) == []  # past the first 3


def test_each_alone_is_refused_beside_other_requests(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["--each-alone", "--levels", "1,8"])
    assert refused.value.code == 2
    assert "--each-alone runs one document at a time" in capsys.readouterr().err
