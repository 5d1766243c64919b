"""Admission for the continuous batch: the waiting queue, the slots and the KV cache budget.

Pure: no llama.cpp, no threads, no clock; the step scheduler (engine/scheduler.py) owns one
`Admission` and asks it, between decode steps, which waiting requests start now and on which
slots.

A request needs one slot per generation and reserves KV cells for everything it can ever
write: its prompt (shared by its generations) plus `max_tokens` per generation, and starts
when it has its slots and its cells. The lowest free slots are handed out first, so the
slots in use stay one run from 0 where they can: a split KV cache decodes a run of
consecutive slots in one pass, and each gap costs another. Where a gap opens with nothing to
fill it, `move_down` gives a running generation the lowest free slot in place of its own.

Order is first come, first served, with one exception against head-of-line blocking: when
the request at the head does not fit yet (a long document, or many generations), later
requests that do fit go past it, but only `max_bypass` times while it waits at the head.
After that nothing starts until it fits, which it will: its reservation fits an empty engine
(`fits_ever`), and every running request ends. So idle slots are used, and nothing starves.

Each generation gives its `max_tokens` share back when it ends, and the prompt's share comes
back with the request's last generation, so a request whose generations end early frees its
cells for others at once.

Where reuse of a prompt's cells across requests would go (not built): a slot whose cells
already hold a prefix of the prompt would be chosen over the lowest free one, the reserved
cells would count that prefix once, and the request would start with those tokens computed.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class Ticket(Generic[T]):
    """One request as the scheduler sees it; `item` is the caller's own."""

    item: T
    generations: int  # slots it needs, one per generation
    prompt_cells: int
    cells_per_generation: int  # max_tokens
    bypassed: int = 0  # times a later request started while this one waited at the head
    slots: list[int] = field(default_factory=list)  # held while running

    @property
    def cells(self) -> int:
        """KV cells it reserves while running."""
        return self.prompt_cells + self.generations * self.cells_per_generation


class Admission(Generic[T]):
    """The queue, the free slots and the free KV cells of one engine."""

    def __init__(self, n_slots: int, n_cells: int, *, max_bypass: int | None = None) -> None:
        if n_slots < 1 or n_cells < 1:
            raise ValueError("admission needs at least one slot and one cell")
        self.n_slots = n_slots
        self.n_cells = n_cells
        self.max_bypass = n_slots if max_bypass is None else max_bypass
        self._free_slots = list(range(n_slots))  # a heap: the lowest is handed out first
        self._free_cells = n_cells
        self._waiting: deque[Ticket[T]] = deque()

    # -- what a request could ever get

    def fits_ever(self, ticket: Ticket[T]) -> bool:
        """Whether it could start in an empty engine."""
        return ticket.generations <= self.n_slots and ticket.cells <= self.n_cells

    # -- the queue

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return self.n_slots - len(self._free_slots)

    @property
    def has_gap(self) -> bool:
        """Whether a free slot lies below a busy one: the busy slots are not one run from 0."""
        return bool(self._free_slots) and self._free_slots[0] < self.busy_slots

    @property
    def reserved_cells(self) -> int:
        return self.n_cells - self._free_cells

    def enqueue(self, ticket: Ticket[T]) -> None:
        if not self.fits_ever(ticket):
            raise ValueError("this request can never start; check fits_ever before enqueue")
        self._waiting.append(ticket)

    def drop(self, unwanted: Callable[[Ticket[T]], bool]) -> list[Ticket[T]]:
        """Take waiting requests out of the queue (cancelled ones); returns them."""
        dropped = [t for t in self._waiting if unwanted(t)]
        if dropped:
            self._waiting = deque(t for t in self._waiting if not unwanted(t))
        return dropped

    def drain(self) -> list[Ticket[T]]:
        """Empty the queue (shutdown); returns what was waiting, in order."""
        waiting, self._waiting = list(self._waiting), deque()
        return waiting

    def __iter__(self) -> Iterator[Ticket[T]]:
        return iter(self._waiting)

    # -- starting and ending

    def _fits_now(self, ticket: Ticket[T]) -> bool:
        return ticket.generations <= len(self._free_slots) and ticket.cells <= self._free_cells

    def _take(self, ticket: Ticket[T]) -> None:
        ticket.slots = [heapq.heappop(self._free_slots) for _ in range(ticket.generations)]
        self._free_cells -= ticket.cells

    def admit(self) -> list[Ticket[T]]:
        """The requests that start now, in order, each with its `slots` assigned."""
        started: list[Ticket[T]] = []
        while self._waiting and self._fits_now(self._waiting[0]):
            ticket = self._waiting.popleft()
            self._take(ticket)
            started.append(ticket)
        if not self._waiting or not self._free_slots:
            return started
        head = self._waiting[0]
        if head.bypassed >= self.max_bypass:
            return started
        passed: list[Ticket[T]] = []
        for ticket in list(self._waiting)[1:]:
            if head.bypassed >= self.max_bypass or not self._free_slots:
                break
            if self._fits_now(ticket):
                self._take(ticket)
                head.bypassed += 1
                passed.append(ticket)
        if passed:
            gone = {id(t) for t in passed}
            self._waiting = deque(t for t in self._waiting if id(t) not in gone)
        return started + passed

    def release(self, ticket: Ticket[T], slot: int) -> None:
        """One generation of a running request ended: its slot and its cells come back
        (the prompt's cells with the last one)."""
        ticket.slots.remove(slot)
        heapq.heappush(self._free_slots, slot)
        self._free_cells += ticket.cells_per_generation
        if not ticket.slots:
            self._free_cells += ticket.prompt_cells

    def move_down(self, ticket: Ticket[T], slot: int) -> int | None:
        """Give one of a running request's generations the lowest free slot in place of
        `slot`, when that one is lower; returns the new slot, or None (no lower one free).
        The caller moves the sequence's KV cells from the old slot to the new."""
        if not self._free_slots or self._free_slots[0] > slot:
            return None
        lower = heapq.heapreplace(self._free_slots, slot)
        ticket.slots[ticket.slots.index(slot)] = lower
        return lower

    def release_all(self, ticket: Ticket[T]) -> None:
        """Every generation of a running request ended (or it could not start after all)."""
        for slot in list(ticket.slots):
            self.release(ticket, slot)
