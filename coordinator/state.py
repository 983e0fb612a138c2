"""A run's current state, folded from its events by `evolve`. Pure: no I/O, no clock."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from cairn.events import (
    ContractViolated,
    CostCharged,
    Event,
    Intent,
    ResultIgnored,
    ResultReceived,
    RetryScheduled,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepSkipped,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskTimedOut,
    WorkflowSpec,
    event_hash,
)

RunStatus = Literal["running", "completed", "failed", "cancelled"]
StepStatus = Literal["pending", "dispatched", "retry_wait", "completed", "skipped", "failed"]
# Statuses after which a step no longer holds up the steps that need it.
STEP_DONE: frozenset[str] = frozenset({"completed", "skipped"})


@dataclass(frozen=True)
class StepState:
    name: str
    status: StepStatus = "pending"
    attempt: int = 0
    task_id: str | None = None
    dispatched_at: datetime | None = None
    output: dict[str, Any] | None = None
    output_hash: str | None = None
    agent_id: str | None = None
    last_error: str | None = None
    timeout_s: float = 0.0
    retry_due_at: datetime | None = None
    repair: tuple[str, ...] = ()
    received: dict[str, Any] | None = None  # the latest result's output, until judged

    @property
    def timeout_due_at(self) -> datetime | None:
        """When the current attempt times out, if one is in flight."""
        if self.status != "dispatched" or self.dispatched_at is None:
            return None
        return self.dispatched_at + timedelta(seconds=self.timeout_s)


@dataclass(frozen=True)
class RunState:
    run_id: uuid.UUID
    version: int
    workflow: WorkflowSpec
    input: dict[str, Any]
    intent: Intent
    started_at: datetime
    status: RunStatus = "running"
    steps: dict[str, StepState] = field(default_factory=dict)
    cost_usd: Decimal = Decimal(0)
    output: Any = None
    error: str | None = None
    updated_at: datetime | None = None
    last_hash: str = ""  # hash of the latest event: the next one's prev_hash

    @property
    def terminal(self) -> bool:
        return self.status != "running"

    def step(self, name: str) -> StepState:
        return self.steps[name]


class EvolveError(ValueError):
    """An event does not fit the state it is applied to (a corrupt or foreign history)."""


def evolve(state: RunState | None, event: Event) -> RunState:
    """The state right after `event`."""
    if isinstance(event, RunStarted):
        if state is not None:
            raise EvolveError(f"run {event.run_id} started twice")
        if event.seq != 1:
            raise EvolveError(f"run {event.run_id} starts at event {event.seq}, not 1")
        return RunState(
            run_id=event.run_id,
            version=event.seq,
            workflow=event.workflow,
            input=event.input,
            intent=event.intent,
            started_at=event.at,
            steps={s.name: StepState(s.name) for s in event.workflow.steps},
            updated_at=event.at,
            last_hash=event_hash(event),
        )
    if state is None:
        raise EvolveError(f"{event.type_name()} before RunStarted in run {event.run_id}")
    if event.seq != state.version + 1:
        raise EvolveError(
            f"run {event.run_id}: event {event.seq} follows {state.version}, expected "
            f"{state.version + 1}"
        )
    state = replace(state, version=event.seq, updated_at=event.at, last_hash=event_hash(event))
    if isinstance(event, ResultReceived):
        return _with_step(state, event.step, received=event.output)
    if isinstance(event, TaskDispatched):
        return _with_step(
            state,
            event.step,
            status="dispatched",
            attempt=event.attempt,
            task_id=event.task_id,
            dispatched_at=event.at,
            timeout_s=event.timeout_s,
            retry_due_at=None,
            repair=tuple(event.repair),
        )
    if isinstance(event, TaskCompleted):
        previous = state.steps.get(event.step)
        return _with_step(
            state,
            event.step,
            status="completed",
            output=previous.received if previous else None,
            received=None,
            output_hash=event.output_hash,
            agent_id=event.agent_id,
        )
    if isinstance(event, TaskFailed):
        return _with_step(state, event.step, last_error=event.error, agent_id=event.agent_id)
    if isinstance(event, ContractViolated):
        return _with_step(
            state, event.step, last_error="; ".join(event.errors), agent_id=event.agent_id
        )
    if isinstance(event, TaskTimedOut):
        return _with_step(state, event.step, last_error=f"timed out after {event.timeout_s}s")
    if isinstance(event, RetryScheduled):
        return _with_step(
            state,
            event.step,
            status="retry_wait",
            retry_due_at=event.due_at,
            repair=tuple(event.repair),
        )
    if isinstance(event, StepSkipped):
        return _with_step(state, event.step, status="skipped", last_error=event.error)
    if isinstance(event, CostCharged):
        return replace(state, cost_usd=state.cost_usd + event.amount_usd)
    if isinstance(event, RunCompleted):
        return replace(state, status="completed", output=event.output)
    if isinstance(event, RunFailed):
        failed = state
        if event.step:
            failed = _with_step(state, event.step, status="failed")
        return replace(failed, status="failed", error=event.error)
    if isinstance(event, RunCancelled):
        return replace(state, status="cancelled")
    if isinstance(event, ResultIgnored):
        return state
    raise EvolveError(f"evolve does not know {event.type_name()}")


def fold(events: list[Event]) -> RunState | None:
    state: RunState | None = None
    for event in events:
        state = evolve(state, event)
    return state


def _with_step(state: RunState, name: str, **changes: Any) -> RunState:
    if name not in state.steps:
        raise EvolveError(f"run {state.run_id} has no step {name!r}")
    steps = dict(state.steps)
    steps[name] = replace(steps[name], **changes)
    return replace(state, steps=steps)
