"""The engine's scheduler, without a model: admission order, head-of-line bypass with a bound,
per-generation release, and that nothing starves."""

from __future__ import annotations

import random

import pytest
from genstruct_service.engine.admission import Admission, Ticket
from hypothesis import given, settings
from hypothesis import strategies as st


def ticket(name: str, prompt: int = 100, max_tokens: int = 100, n: int = 1) -> Ticket[str]:
    return Ticket(name, generations=n, prompt_cells=prompt, cells_per_generation=max_tokens)


def names(tickets: list[Ticket[str]]) -> list[str]:
    return [t.item for t in tickets]


def test_first_come_first_served_while_everything_fits() -> None:
    s: Admission[str] = Admission(4, 10_000)
    for name in "abc":
        s.enqueue(ticket(name))
    started = s.admit()
    assert names(started) == ["a", "b", "c"]
    assert [t.slots for t in started] == [[0], [1], [2]]
    assert s.busy_slots == 3 and s.reserved_cells == 600 and s.waiting == 0


def test_the_lowest_free_slot_is_handed_out_first() -> None:
    # a KV stream per slot decodes a run of consecutive slots in one pass: gaps are refilled
    s: Admission[str] = Admission(4, 10_000)
    for name in "abcd":
        s.enqueue(ticket(name))
    a, _, c, _ = s.admit()
    s.release(a, 0)
    s.release(c, 2)
    s.enqueue(ticket("e"))
    s.enqueue(ticket("f"))
    e, f = s.admit()
    assert (e.slots, f.slots) == ([0], [2])


def test_move_down_trades_a_busy_slot_for_the_lowest_free_one_below_it() -> None:
    s: Admission[str] = Admission(5, 10_000)
    for name in "abcd":
        s.enqueue(ticket(name, n=2 if name == "d" else 1))
    a, b, c, d = s.admit()
    assert d.slots == [3, 4]
    s.release(a, 0)
    s.release(c, 2)
    assert s.has_gap
    assert s.move_down(b, 1) == 0  # the lowest free slot, below its own
    assert b.slots == [0]
    assert s.move_down(d, 4) == 1  # 1 came free with b's move
    assert s.move_down(d, 1) is None  # the free ones, 2 and 4, are above it
    assert s.move_down(d, 3) == 2
    assert d.slots == [2, 1] and s.busy_slots == 3  # b and d hold slots 0 to 2, one run
    assert not s.has_gap
    s.enqueue(ticket("e", n=2))
    (e,) = s.admit()
    assert e.slots == [3, 4]
    for t in (b, d, e):
        s.release_all(t)
    assert s.busy_slots == 0 and s.reserved_cells == 0


def test_a_long_document_at_the_head_no_longer_idles_free_slots() -> None:
    s: Admission[str] = Admission(4, 2_000)
    running = ticket("running", prompt=800, max_tokens=200)
    s.enqueue(running)
    assert names(s.admit()) == ["running"]  # 1,000 of 2,000 cells, 3 slots free
    s.enqueue(ticket("long", prompt=1_400, max_tokens=200))  # needs 1,600: must wait
    s.enqueue(ticket("short1"))
    s.enqueue(ticket("short2"))
    assert names(s.admit()) == ["short1", "short2"]  # they go past the long one
    assert names(list(s)) == ["long"]
    s.release_all(running)
    assert running.slots == [] and s.reserved_cells == 400  # the two short ones
    assert names(s.admit()) == ["long"]  # 1,600 free: the long one starts as soon as it fits


def test_the_head_waits_at_most_max_bypass_admissions() -> None:
    s: Admission[str] = Admission(8, 1_000, max_bypass=2)
    blocker = ticket("blocker", prompt=300, max_tokens=100)
    s.enqueue(blocker)
    s.admit()
    s.enqueue(ticket("long", prompt=600, max_tokens=100))  # 700 > the 600 free
    for i in range(4):
        s.enqueue(ticket(f"s{i}", prompt=50, max_tokens=50))
    assert names(s.admit()) == ["s0", "s1"]  # two go past, then the head holds the line
    assert s.admit() == []
    assert names(list(s)) == ["long", "s2", "s3"]
    s.release_all(blocker)  # 800 free now
    assert names(s.admit()) == ["long", "s2"]  # the head first, then what fits beside it
    assert names(list(s)) == ["s3"]


def test_each_generation_gives_its_share_back_when_it_ends() -> None:
    s: Admission[str] = Admission(4, 1_000)
    four = ticket("four", prompt=200, max_tokens=200, n=4)  # 1,000: the whole cache, 4 slots
    s.enqueue(four)
    s.admit()
    s.enqueue(ticket("next", prompt=100, max_tokens=100))
    assert s.admit() == []
    s.release(four, four.slots[0])  # one generation ended early: 200 cells and a slot back
    assert names(s.admit()) == ["next"]
    s.release(four, four.slots[0])
    s.release(four, four.slots[0])
    assert s.reserved_cells == 200 + 200 + 200  # the prompt stays with the last generation
    s.release(four, four.slots[0])
    assert s.reserved_cells == 200 and s.busy_slots == 1


def test_a_request_that_can_never_fit_is_refused_at_the_door() -> None:
    s: Admission[str] = Admission(2, 1_000)
    assert not s.fits_ever(ticket("big", prompt=950, max_tokens=100))
    assert not s.fits_ever(ticket("wide", n=3))
    with pytest.raises(ValueError):
        s.enqueue(ticket("wide", n=3))


def test_drop_and_drain_take_only_waiting_requests() -> None:
    s: Admission[str] = Admission(1, 1_000)
    for name in "abc":
        s.enqueue(ticket(name))
    s.admit()
    assert names(s.drop(lambda t: t.item == "b")) == ["b"]
    assert names(s.drain()) == ["c"] and s.waiting == 0 and s.busy_slots == 1


requests = st.lists(
    st.tuples(st.integers(1, 900), st.integers(1, 300), st.integers(1, 4)),
    min_size=1, max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(requests, st.integers(0, 2**32 - 1), st.integers(0, 6))
def test_every_request_starts_and_the_books_balance(
    wanted: list[tuple[int, int, int]], seed: int, max_bypass: int
) -> None:
    """Requests arrive, generations end and move down in any order: the cells and slots in
    use never exceed the engine's, each request starts exactly once, and none waits forever."""
    rng = random.Random(seed)
    s: Admission[int] = Admission(4, 2_000, max_bypass=max_bypass)
    tickets = [Ticket(i, generations=n, prompt_cells=p, cells_per_generation=m)
               for i, (p, m, n) in enumerate(wanted)]
    tickets = [t for t in tickets if s.fits_ever(t)]
    arriving = list(tickets)
    running: list[Ticket[int]] = []
    started: list[int] = []
    for _ in range(10_000):
        if not (arriving or running or s.waiting):
            break
        if arriving and rng.random() < 0.5:
            s.enqueue(arriving.pop(0))
        for t in s.admit():
            assert len(t.slots) == t.generations
            started.append(t.item)
            running.append(t)
        assert 0 <= s.reserved_cells <= s.n_cells
        assert s.reserved_cells == sum(
            (t.prompt_cells if t.slots else 0) + len(t.slots) * t.cells_per_generation
            for t in running)
        held = [slot for t in running for slot in t.slots]
        assert len(held) == len(set(held)) == s.busy_slots <= s.n_slots
        assert s.has_gap == (set(held) != set(range(len(held))))
        if running and rng.random() < 0.6:
            t = rng.choice(running)
            s.release(t, rng.choice(t.slots))
            if not t.slots:
                running.remove(t)
        if running and rng.random() < 0.3:  # the engine closing a gap
            t = rng.choice(running)
            slot = max(t.slots)
            lower = s.move_down(t, slot)
            assert lower is None or (lower < slot and lower in t.slots and slot not in t.slots)
    assert sorted(started) == sorted(t.item for t in tickets)
    assert s.reserved_cells == 0 and s.busy_slots == 0
