"""A run's current state, folded from its events by `evolve`. Pure: no I/O, no clock.

The statuses and what each event does to them come from `cairn.events.lifecycle` (`EFFECTS`),
which the views and the other folds of a run read too; `evolve` adds what only the
coordinator keeps (outputs, reservations, approvals, gates passed).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from cairn.events import (
    EFFECTS,
    RUN_ENDED,
    ApprovalDenied,
    ApprovalEscalated,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRequested,
    ApprovalWarned,
    Budget,
    BudgetExhausted,
    BudgetRaised,
    BudgetReserved,
    BudgetSettled,
    CapabilityUnserved,
    ContractViolated,
    CostCharged,
    Event,
    Intent,
    OutputCarried,
    ResultIgnored,
    ResultReceived,
    RetryScheduled,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepAdmitted,
    StepRefused,
    StepSkipped,
    StepSpec,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskTimedOut,
    WorkflowSpec,
    content_hash,
    event_hash,
)

# The shared vocabulary, re-exported: the decisions and the engine read it from here.
from cairn.events import STEP_DONE as STEP_DONE
from cairn.events import ApprovalStatus as ApprovalStatus
from cairn.events import RunStatus as RunStatus
from cairn.events import StepStatus as StepStatus


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
    received_hash: str | None = None
    seen_hashes: tuple[str, ...] = ()  # every output received for this step: loop guard
    proposals: tuple[StepSpec, ...] = ()  # follow-up steps the latest result proposed
    approval_id: str | None = None  # the open request holding this step
    cleared: frozenset[str] = frozenset()  # gates already passed, by approval kind
    extra_attempts: int = 0  # granted by people after the retry policy ran out
    unserved_attempt: int = 0  # the attempt recorded as waiting for an agent, if any

    @property
    def timeout_due_at(self) -> datetime | None:
        """When the current attempt times out, if one is in flight."""
        if self.status != "dispatched" or self.dispatched_at is None:
            return None
        return self.dispatched_at + timedelta(seconds=self.timeout_s)

    def awaits(self, task_id: str) -> bool:
        """The task is this step's attempt in flight: its result is the one expected."""
        return self.status == "dispatched" and self.task_id == task_id


@dataclass(frozen=True)
class ApprovalState:
    request_id: str
    step: str
    attempt: int
    kind: str
    group: str
    due_at: datetime
    warn_at: datetime | None
    status: ApprovalStatus = "pending"
    by: str | None = None
    escalations: int = 0


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
    # The latest event: its hash is the next event's prev_hash. Hashed when asked for, so a
    # fold pays for one hash per run, not one per event.
    last_event: Event | None = None
    budget: Budget | None = None
    tenant: str = "default"
    spent_tokens: int = 0
    reserved: dict[tuple[str, int], Decimal] = field(default_factory=dict)
    approvals: dict[str, ApprovalState] = field(default_factory=dict)
    attempts: int = 0  # tasks dispatched in all: a loop guard
    charged_tasks: frozenset[str] = frozenset()  # tasks whose usage has been charged
    ignored_tasks: frozenset[str] = frozenset()  # tasks a result was recorded as ignored for
    input_carried: dict[str, dict[str, Any]] = field(default_factory=dict)  # a fork's outputs
    # The run's trace and root span (RunStarted's), stamped on every later event; None when
    # the run was started with tracing off.
    trace_id: str | None = None
    trace_span_id: str | None = None

    @property
    def last_hash(self) -> str:
        return event_hash(self.last_event) if self.last_event is not None else ""

    @property
    def reserved_usd(self) -> Decimal:
        return sum(self.reserved.values(), Decimal(0))

    @property
    def remaining_usd(self) -> Decimal | None:
        if self.budget is None or self.budget.usd is None:
            return None
        return self.budget.usd - self.cost_usd - self.reserved_usd

    @property
    def remaining_tokens(self) -> int | None:
        if self.budget is None or self.budget.tokens is None:
            return None
        return self.budget.tokens - self.spent_tokens

    def pending_approvals(self) -> list[ApprovalState]:
        return [a for a in self.approvals.values() if a.status == "pending"]

    @property
    def terminal(self) -> bool:
        return self.status in RUN_ENDED

    def step(self, name: str) -> StepState:
        return self.steps[name]

    def is_current(self, step: str, task_id: str) -> bool:
        """The task is still wanted: the run goes on and the step awaits its result. A task that
        is not current is neither sent again nor expected to change anything."""
        found = self.steps.get(step)
        return not self.terminal and found is not None and found.awaits(task_id)

    def timer_matters(
        self, kind: str, step: str, attempt: int, request_id: str | None = None
    ) -> bool:
        """A timer set for this run still has something to act on: the run goes on and the
        timer is the step's current attempt's timeout (`timeout`), the end of the backoff before
        its next attempt (`retry`), or the deadline (`approval`) or warning not yet given
        (`approval_warn`) of a pending request. A timer that does not matter decides nothing
        and may be dropped. (Whether a matching approval timer is due yet is decide's to judge:
        an escalation moves the deadline.)"""
        if self.terminal:
            return False
        if kind in ("approval", "approval_warn"):
            approval = self.approvals.get(request_id or "")
            if approval is None or approval.status != "pending":
                return False
            return kind == "approval" or approval.warn_at is not None
        current = self.steps.get(step)
        if current is None:
            return False
        if kind == "timeout":
            return current.status == "dispatched" and current.attempt == attempt
        return kind == "retry" and current.status == "retry_wait" and current.attempt + 1 == attempt


T = TypeVar("T")


def _update(obj: T, **changes: Any) -> T:
    """A copy of a frozen state with some fields changed. `dataclasses.replace` re-runs
    `__init__` over every field (≈5 µs on RunState); this copies the instance dict (<1 µs),
    which matters because evolve runs once per event on the hot path and in replay."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


class EvolveError(ValueError):
    """An event does not fit the state it is applied to (a corrupt or foreign history)."""


def evolve(state: RunState | None, event: Event) -> RunState:
    """The state right after `event`. The statuses it sets are those `EFFECTS` gives the event
    (a new run's and a new step's are the defaults above: "running", "pending")."""
    effect = EFFECTS.get(type(event))
    if effect is None:
        raise EvolveError(f"evolve does not know {event.type_name()}")
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
            last_event=event,
            budget=event.budget,
            tenant=event.tenant,
            input_carried={name: c.output for name, c in event.carried.items()},
            trace_id=event.trace_id,
            trace_span_id=event.trace_span_id,
        )
    if state is None:
        raise EvolveError(f"{event.type_name()} before RunStarted in run {event.run_id}")
    if event.seq != state.version + 1:
        raise EvolveError(
            f"run {event.run_id}: event {event.seq} follows {state.version}, expected "
            f"{state.version + 1}"
        )
    state = _update(state, version=event.seq, updated_at=event.at, last_event=event)
    if isinstance(event, ResultReceived):
        step = state.steps.get(event.step)
        if step is None or not step.awaits(event.task_id):
            return state  # a duplicate or stale result: recorded, changes nothing
        digest = content_hash(event.output) if event.output is not None else None
        return _with_step(
            state,
            event.step,
            received=event.output,
            received_hash=digest,
            seen_hashes=(*step.seen_hashes, digest) if digest else step.seen_hashes,
            proposals=tuple(event.proposals),
            agent_id=event.agent_id,
        )
    if isinstance(event, TaskDispatched):
        state = _update(state, attempts=state.attempts + 1)
        return _with_step(
            state,
            event.step,
            status=effect.step,
            attempt=event.attempt,
            task_id=event.task_id,
            dispatched_at=event.at,
            timeout_s=event.timeout_s,
            retry_due_at=None,
            repair=tuple(event.repair),
            approval_id=None,
        )
    if isinstance(event, TaskCompleted):
        previous = state.steps.get(event.step)
        return _with_step(
            state,
            event.step,
            status=effect.step,
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
            status=effect.step,
            retry_due_at=event.due_at,
            repair=tuple(event.repair),
        )
    if isinstance(event, StepSkipped):
        return _with_step(state, event.step, status=effect.step, last_error=event.error)
    if isinstance(event, CostCharged):
        return _update(
            state,
            cost_usd=state.cost_usd + event.amount_usd,
            spent_tokens=state.spent_tokens + event.input_tokens + event.output_tokens,
            charged_tasks=state.charged_tasks | {event.task_id},
        )
    if isinstance(event, BudgetReserved):
        reserved = dict(state.reserved)
        reserved[(event.step, event.attempt)] = event.amount_usd
        return _update(state, reserved=reserved)
    if isinstance(event, BudgetSettled):
        reserved = dict(state.reserved)
        reserved.pop((event.step, event.attempt), None)
        return _update(state, reserved=reserved)
    if isinstance(event, BudgetExhausted):
        return _with_step(state, event.step, status=effect.step)
    if isinstance(event, BudgetRaised):
        budget = (state.budget or Budget()).raised(event.usd, event.tokens)
        return _update(state, budget=budget)
    if isinstance(event, ApprovalRequested):
        approvals = dict(state.approvals)
        approvals[event.request_id] = ApprovalState(
            request_id=event.request_id,
            step=event.step,
            attempt=event.attempt,
            kind=event.kind,
            group=event.group,
            due_at=event.due_at,
            warn_at=event.warn_at,
        )
        state = _update(state, approvals=approvals)
        return _with_step(state, event.step, status=effect.step, approval_id=event.request_id)
    if isinstance(event, ApprovalEscalated):
        return _with_approval(
            state,
            event.request_id,
            group=event.group,
            due_at=event.due_at,
            warn_at=event.warn_at,
            escalations=state.approvals[event.request_id].escalations + 1,
        )
    if isinstance(event, ApprovalWarned):
        return _with_approval(state, event.request_id, warn_at=None)
    if isinstance(event, ApprovalGranted | ApprovalDenied | ApprovalExpired):
        by = event.by if isinstance(event, ApprovalGranted | ApprovalDenied) else None
        state = _with_approval(state, event.request_id, status=effect.approval, by=by)
        approval = state.approvals[event.request_id]
        step = state.steps[approval.step]
        changes: dict[str, Any] = {"approval_id": None}
        if effect.approval == "granted":
            changes["cleared"] = step.cleared | {approval.kind}
            if approval.kind in ("exhausted", "loop"):
                changes["extra_attempts"] = step.extra_attempts + 1  # one more try granted
        return _with_step(state, approval.step, **changes)
    if isinstance(event, OutputCarried):
        carried = state.input_carried.get(event.step)
        return _with_step(
            state,
            event.step,
            status=effect.step,
            output=carried,
            output_hash=event.output_hash,
            agent_id=event.source,
        )
    if isinstance(event, StepAdmitted):
        workflow = state.workflow.model_copy(update={"steps": [*state.workflow.steps, event.spec]})
        steps = dict(state.steps)
        steps[event.spec.name] = StepState(event.spec.name)
        return _update(state, workflow=workflow, steps=steps)
    if isinstance(event, CapabilityUnserved):
        return _with_step(state, event.step, unserved_attempt=event.attempt)
    if isinstance(event, ResultIgnored):
        return _update(state, ignored_tasks=state.ignored_tasks | {event.task_id})
    if isinstance(event, StepRefused):
        return state
    if isinstance(event, RunCompleted):
        return _update(state, status=effect.run, output=event.output)
    if isinstance(event, RunFailed):
        failed = state
        if event.step:
            failed = _with_step(state, event.step, status=effect.step)
        return _update(failed, status=effect.run, error=event.error)
    if isinstance(event, RunCancelled):
        return _update(state, status=effect.run)
    raise EvolveError(f"evolve does not know {event.type_name()}")


def fold(events: list[Event]) -> RunState | None:
    state: RunState | None = None
    for event in events:
        state = evolve(state, event)
    return state


def _with_approval(state: RunState, request_id: str, **changes: Any) -> RunState:
    if request_id not in state.approvals:
        raise EvolveError(f"run {state.run_id} has no approval request {request_id!r}")
    approvals = dict(state.approvals)
    approvals[request_id] = _update(approvals[request_id], **changes)
    return _update(state, approvals=approvals)


def _with_step(state: RunState, name: str, **changes: Any) -> RunState:
    if name not in state.steps:
        raise EvolveError(f"run {state.run_id} has no step {name!r}")
    steps = dict(state.steps)
    steps[name] = _update(steps[name], **changes)
    return _update(state, steps=steps)
