"""bench.draft_replay's plans, without a model: the drafts offered along a text, and the
fastest plan that knows their outcome."""

from __future__ import annotations

from pathlib import Path

from genstruct_service.engine.speculation import SpeculationSettings
from genstruct_service.engine.step_cost import StepCost

from bench.draft_replay import (
    Point,
    Written,
    borrowing_points,
    foresight,
    points,
    replay_live,
    replay_planner,
)


def test_points_offer_the_copied_span_and_count_what_the_text_takes() -> None:
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    text = [20, 3, 4, 5, 6, 7, 30, 31, 32]  # copies 5 6 7 after "3 4", then leaves it
    found = points(prompt, text, SpeculationSettings(draft_max=4, ngram_min=2))
    assert [p.at for p in found] == list(range(1, len(text)))
    # after "3 4" (a match of 2) the prompt offers 5 6 7 8: the text takes 5 6 7
    assert found[2] == Point(at=3, match=2, draft=4, good=3)
    # no pair of the text's last tokens occurs before it
    assert found[-1] == Point(at=8, match=0, draft=0, good=0)


def test_foresight_drafts_what_pays_and_pads_to_a_cheaper_row_count() -> None:
    quiet = [Point(at, 0, 0, 0) for at in range(2, 6)]
    # rows: 1 -> 1.0 s, 2 and 3 -> 3.0 s, 4 -> 1.2 s (a kernel block: 4 rows cost less than 2)
    price = [0.0, 1.0, 3.0, 3.0, 1.2]
    # a draft of 3 whose first token holds: 1 row pays 2 tokens at 3.0 s, 4 rows at 1.2 s
    plan = foresight([[Point(1, 8, 3, 1), *quiet]], price)
    assert (plan.steps, plan.drafted, plan.accepted) == (4, 3, 1)
    assert plan.seconds == 1.2 + 3 * 1.0
    # where no row count pays, it decodes a token a step
    plan = foresight([[Point(1, 8, 3, 1), *quiet]], [0.0, 1.0, 3.0, 3.0, 3.0])
    assert (plan.steps, plan.drafted, plan.seconds) == (5, 0, 5.0)


def test_no_plan_is_faster_than_foresight() -> None:
    prompt = list(range(40))
    text = [99, *range(5, 20), 98, 97, *range(20, 35), 96, *range(8, 12)]
    texts = [points(prompt, text, SpeculationSettings(draft_max=8))]
    price = [0.0, 1.0, 1.8, 2.1, 2.4, 3.7, 4.1, 4.3, 3.7, 5.0]
    best = foresight(texts, price)
    planned = replay_planner(texts, price, ngram_max=8)
    plain = sum(len(found) for found in texts) * price[1]
    assert best.accepted > 0  # the copied spans are drafted
    assert best.seconds <= planned.seconds <= plain
    assert best.seconds < plain
    # every plan covers the whole text: its steps and accepted tokens add up to it
    for plan in (best, planned):
        assert plan.steps + plan.accepted == len(text) - 1


def test_saved_texts_come_back_as_written(tmp_path: Path) -> None:
    written = Written([("prompt one", "text one"), ("prompt two", "text two")],
                      {1: 0.0134, 4: 0.0287, 17: 0.0802}, drafted=969, accepted=676)  # fmt: skip
    path = tmp_path / "texts.json"
    written.save(path)
    assert Written.load(path) == written  # JSON's string keys are rows again


def test_a_later_document_borrows_what_an_earlier_one_wrote_and_the_live_plan_uses_it() -> None:
    spec = SpeculationSettings(draft_max=8, ngram_min=2)
    answer = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]  # the same answer to both
    pairs = [([1, 2, 3], answer), ([4, 5, 6], answer)]
    first, second = borrowing_points(pairs, spec)
    assert first == points(*pairs[0], spec)  # nothing before it to borrow from
    assert not any(p.draft for p in first)
    # the second's own text has nothing: all its drafts are the first one's text
    assert second[0] == Point(at=1, match=0, draft=0, good=0)  # one token: no 2-gram yet
    assert all(p.borrowed and p.draft and p.good == p.draft for p in second[1:-1])
    flat = [0.0] + [1.0] * 9
    cost = StepCost.fixed({rows: 1.0 for rows in range(1, 10)})
    own = replay_live([first, points(*pairs[1], spec)], flat, 8, cost)
    borrowing = replay_live([first, second], flat, 8, cost)
    for plan in (own, borrowing):
        assert plan.steps + plan.accepted == 2 * (len(answer) - 1)
    assert own.accepted == 0 < borrowing.accepted and borrowing.steps < own.steps
