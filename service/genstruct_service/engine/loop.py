"""The engine thread's loop: inbox, then `schedule`, `execute` and `update`, step after step
(vLLM V1's `EngineCore.step`).

It knows the runner only through the `Executor` Protocol, so it imports nothing of llama.cpp.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from genstruct_service.engine.inbox import Inbox
from genstruct_service.engine.plan import StepPlan, StepResult
from genstruct_service.engine.request import Job, Request
from genstruct_service.engine.scheduler import StepScheduler
from genstruct_service.engine.update import Updater
from genstruct_service.errors import ModelError

log = logging.getLogger(__name__)


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepResult: ...


class EngineLoop:
    """Runs steps until the engine closes; one instance per engine thread."""

    def __init__(
        self, inbox: Inbox, scheduler: StepScheduler, runner: Executor, updater: Updater, *,
        make_request: Callable[[Job], Request], on_step: Callable[[int], None] | None,
    ) -> None:
        self._inbox = inbox
        self._scheduler = scheduler
        self._runner = runner
        self._updater = updater
        self._make_request = make_request  # a job's sequences and samplers
        self._on_step = on_step

    def run(self) -> None:
        """Steps until closed, or until a step fails: then every request in flight is told,
        and new ones are refused from then on."""
        try:
            while True:
                jobs, closing, cancelled = self._inbox.take(busy=self._scheduler.has_work)
                if closing:
                    self._updater.shut_down(jobs)
                    self._inbox.publish(waiting=0, busy=0)
                    return
                self._step(self._intake(jobs), cancelled, bool(jobs))
        except BaseException as exc:
            log.exception("the engine thread failed")
            left = self._inbox.fail(exc)
            try:
                # ModelError maps to UNAVAILABLE, so the callers in flight retry elsewhere
                error = ModelError(f"the engine failed and must be restarted: {exc}")
                self._updater.fail_everything(error, left)
            finally:
                self._inbox.settle_waiters(exc)

    def _intake(self, jobs: list[Job]) -> tuple[tuple[Job, BaseException], ...]:
        """Queue new jobs (their prompts were fitted before they came here); returns those
        that could not join."""
        refused = []
        for job in jobs:
            if job.cancelled:
                continue
            try:
                request = self._make_request(job)
            except Exception as exc:  # a grammar that does not parse: its caller is told
                refused.append((job, exc))
                continue
            self._scheduler.enqueue(request)
        return tuple(refused)

    def _step(
        self, refused: tuple[tuple[Job, BaseException], ...], cancelled: bool, taken: bool
    ) -> None:
        """One step: schedule, execute, update. `taken`: jobs came in since the last step."""
        scheduler = self._scheduler
        plan = scheduler.schedule(cancelled=cancelled, refused=refused)
        if taken or plan.admitted or plan.cancelled:
            # the queue's and the slots' counts changed here only: a sequence that ends
            # gives its slot back through the inbox itself (Inbox.slot_freed)
            self._inbox.publish(waiting=scheduler.waiting, busy=scheduler.admission.busy_slots)
        result = self._runner.execute(plan)
        if result.n_rows and self._on_step is not None:
            self._on_step(result.n_rows)
        self._updater.update(plan, result)
