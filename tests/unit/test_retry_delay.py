"""The waits a refusal carries as RetryInfo: the queue's pace, and what is left of a drain."""

from __future__ import annotations

import pytest
from genstruct_service.errors import Draining, Loading, QueueFull
from genstruct_service.servicer import ServiceState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_full_queue_waits_for_the_pace_at_which_documents_are_answered() -> None:
    clock = Clock()
    state = ServiceState(max_documents=4, max_per_connection=2, clock=clock)
    for peer in ("a", "a", "b", "c"):
        state.take_document(peer)
    with pytest.raises(QueueFull) as first:
        state.take_document("d")
    assert first.value.retry_after is None  # nothing answered yet: no measure
    assert first.value.figures == {"held": 4, "limit": 4, "scope": "server"}
    clock.now += 10.0  # idle time before the first answer is not counted
    state.give_document("b")
    clock.now += 2.0
    state.give_document("a")  # one answer 2 s after the other, documents held meanwhile
    state.take_document("b")
    state.take_document("c")
    with pytest.raises(QueueFull) as server:
        state.take_document("d")
    assert server.value.retry_after == pytest.approx(2.0)
    assert state.retry_delay(QueueFull("the engine's queue")) == pytest.approx(2.0)
    state.give_document("c")
    state.give_document("b")  # two more answers at once: the pace quickens
    gap = 0.8 * (0.8 * 2.0)
    state.take_document("a")  # "a" holds 2 of the 3: its share, and 2/3 of the answers
    with pytest.raises(QueueFull) as connection:
        state.take_document("a")
    assert connection.value.figures == {"held": 2, "limit": 2, "scope": "connection"}
    assert connection.value.retry_after == pytest.approx(gap * 3 / 2)


def test_a_drain_says_what_is_left_of_it() -> None:
    clock = Clock()
    state = ServiceState(clock=clock)
    assert state.retry_delay(Loading("loading")) is None
    state.start_draining(30.0)
    clock.now += 10.0
    assert state.retry_delay(Draining("shutting down")) == pytest.approx(20.0)
    clock.now += 25.0
    assert state.retry_delay(Draining("shutting down")) is None  # its time is up
