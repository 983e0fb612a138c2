"""The coordinator's timers: step timeouts and retry backoffs, kept in a heap.

Timers are not stored: they are derived from run state (a dispatched attempt has a timeout, a
step waiting to retry has a due time), so a restarted coordinator rebuilds them from the log.
A timer that fires after its step moved on is harmless: the decision for it is empty.
"""

from __future__ import annotations

import heapq
import itertools
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cairn.coordinator.domain.facts import TimerFact, TimerKind
from cairn.coordinator.domain.state import RunState
from cairn.events import (
    ApprovalEscalated,
    ApprovalRequested,
    Event,
    RetryScheduled,
    TaskDispatched,
)


@dataclass(frozen=True, order=True)
class Timer:
    due: datetime
    order: int
    run_id: uuid.UUID = field(compare=False)
    step: str = field(compare=False)
    attempt: int = field(compare=False)
    kind: TimerKind = field(compare=False)
    request_id: str | None = field(default=None, compare=False)

    def matters(self, state: RunState | None) -> bool:
        """The timer still has something to act on in its run's `state` (None: a run not held,
        or ended)."""
        return state is not None and state.timer_matters(
            self.kind, self.step, self.attempt, self.request_id
        )

    def fact(self, at: datetime) -> TimerFact:
        return TimerFact(
            run_id=self.run_id,
            step=self.step,
            attempt=self.attempt,
            kind=self.kind,
            at=at,
            request_id=self.request_id,
        )


class TimerQueue:
    """Due times in order; `due(now)` pops every timer that has come due."""

    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(
        self,
        due: datetime,
        run_id: uuid.UUID,
        step: str,
        attempt: int,
        kind: TimerKind,
        request_id: str | None = None,
    ) -> None:
        timer = Timer(due, next(self._order), run_id, step, attempt, kind, request_id)
        heapq.heappush(self._heap, timer)

    def compact(self, live: Callable[[Timer], bool]) -> None:
        """Drop the timers `live` says no longer matter (their step moved on, their run ended),
        so memory follows the active runs, not how many tasks ran lately."""
        self._heap = [t for t in self._heap if live(t)]
        heapq.heapify(self._heap)

    def next_due(self) -> datetime | None:
        return self._heap[0].due if self._heap else None

    def due(self, now: datetime) -> list[Timer]:
        ready: list[Timer] = []
        while self._heap and self._heap[0].due <= now:
            ready.append(heapq.heappop(self._heap))
        return ready

    def add_for_events(self, events: Iterable[Event]) -> None:
        for timer in timers_for_events(events):
            self.push(*timer)

    def add_for_state(self, state: RunState) -> None:
        for timer in timers_for_state(state):
            self.push(*timer)


TimerSpec = tuple[datetime, uuid.UUID, str, int, TimerKind, str | None]


def timers_for_events(events: Iterable[Event]) -> Iterator[TimerSpec]:
    for event in events:
        if isinstance(event, TaskDispatched):
            due = event.at + timedelta(seconds=event.timeout_s)
            yield due, event.run_id, event.step, event.attempt, "timeout", None
        elif isinstance(event, RetryScheduled):
            yield event.due_at, event.run_id, event.step, event.attempt, "retry", None
        elif isinstance(event, ApprovalRequested | ApprovalEscalated):
            request = event.request_id
            attempt = getattr(event, "attempt", 0)
            yield event.due_at, event.run_id, event.step, attempt, "approval", request
            if event.warn_at is not None:
                yield event.warn_at, event.run_id, event.step, attempt, "approval_warn", request


def timers_for_state(state: RunState) -> Iterator[TimerSpec]:
    if state.terminal:
        return
    for step in state.steps.values():
        timeout_due = step.timeout_due_at
        if timeout_due is not None:
            yield timeout_due, state.run_id, step.name, step.attempt, "timeout", None
        if step.status == "retry_wait" and step.retry_due_at is not None:
            yield step.retry_due_at, state.run_id, step.name, step.attempt + 1, "retry", None
    for approval in state.pending_approvals():
        request = approval.request_id
        yield approval.due_at, state.run_id, approval.step, approval.attempt, "approval", request
        if approval.warn_at is not None:
            yield (
                approval.warn_at,
                state.run_id,
                approval.step,
                approval.attempt,
                "approval_warn",
                request,
            )
