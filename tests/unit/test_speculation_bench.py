"""bench.speculation without a model: each round's paired ratios, from runs made up here,
and the order each round runs its systems in."""

from __future__ import annotations

from bench.speculation import Run, paired_table, round_order

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
