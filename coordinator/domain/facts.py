"""What decisions are made from: the facts (a start or cancel command, an agent's result, a timer
come due, a person's answer or budget) and the policy they are judged under.

`fact_for` is `decide`'s inverse: the fact a recorded decision began with, rebuilt from its
first event, which is how replay re-decides a history. The reasons a decision records when a
person gave none are named here, so both directions use the same words.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, Field

from cairn.coordinator.domain.pricing import PriceTable
from cairn.coordinator.domain.state import RunState
from cairn.events import (
    ApprovalDenied,
    ApprovalEscalated,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalWarned,
    Budget,
    BudgetRaised,
    CapabilityUnserved,
    CarriedOutput,
    Event,
    ForkOrigin,
    Frozen,
    Intent,
    ResultReceived,
    RunCancelled,
    RunStarted,
    StepSpec,
    TaskResult,
    TaskTimedOut,
    WorkflowSpec,
)
from cairn.events.mappings import result_of

# What a step without a cost estimate of its own is expected to cost.
DEFAULT_ESTIMATE_USD = Decimal("0.01")

# The reason a decision records when the person or client gave none. `fact_for` reads each one
# back as no reason, which decides the same.
CANCEL_REASON = "cancelled on request"
APPROVE_REASON = "approved"
DENY_REASON = "no reason given"
BUDGET_REASON = "budget raised"


class StartRunFact(Frozen):
    run_id: uuid.UUID
    workflow: WorkflowSpec
    input: dict[str, Any]
    intent: Intent
    requested_by: str
    at: datetime
    budget: Budget | None = None
    tenant: str = "default"
    forked_from: ForkOrigin | None = None
    carried: dict[str, CarriedOutput] = Field(default_factory=dict)
    # The trace the run is recorded under (its root span: the start command's), when traced.
    trace_id: str | None = None
    trace_span_id: str | None = None


class ResultFact(Frozen):
    result: TaskResult
    at: datetime


class CancelFact(Frozen):
    run_id: uuid.UUID
    requested_by: str
    reason: str = ""
    at: datetime


class ApprovalFact(Frozen):
    """A person approved or denied a step's pending request."""

    run_id: uuid.UUID
    step: str
    by: str
    approve: bool
    reason: str = ""
    at: datetime


class BudgetFact(Frozen):
    """A person set the run's budget to new totals."""

    run_id: uuid.UUID
    usd: Decimal | None = None
    tokens: int | None = None
    by: str
    reason: str = ""
    at: datetime


TimerKind = Literal["timeout", "retry", "approval", "approval_warn"]


class TimerFact(Frozen):
    """A timer the coordinator set has come due: a step's timeout, the end of a backoff, or an
    approval request's warning or deadline."""

    run_id: uuid.UUID
    step: str
    attempt: int
    kind: TimerKind
    at: datetime
    request_id: str | None = None


class UnservedFact(Frozen):
    """A dispatched task's capability has no live agent (seen on its JetStream consumer) since
    the task was sent: the run records that it waits for one."""

    run_id: uuid.UUID
    step: str
    attempt: int
    capability: str
    at: datetime


Fact = StartRunFact | ResultFact | CancelFact | TimerFact | ApprovalFact | BudgetFact | UnservedFact


class Rejected(ValueError):
    """The fact does not belong to this run (an unknown task, a run that already exists...).

    Nothing is recorded in the run; the caller answers or dead-letters it with this reason.
    """


@dataclass(frozen=True)
class Policy:
    """The coordinator's rules that decisions consult: prices, output contracts, and what a
    step without a cost estimate is expected to cost when the run has a budget."""

    prices: PriceTable
    contract: Callable[[str], type[BaseModel]]
    default_estimate_usd: Decimal = DEFAULT_ESTIMATE_USD
    # What the run's tenant may still spend today, when it has a daily limit: a fact from
    # outside the run, given by the coordinator's ledger for each decision (and by the record
    # itself on replay).
    tenant: TenantAllowance | None = None

    def estimate(self, spec: StepSpec) -> Decimal:
        """What one attempt of the step is expected to cost: its own estimate, or the default."""
        return spec.cost_estimate_usd or self.default_estimate_usd


@dataclass(frozen=True)
class TenantAllowance:
    """The rest of a tenant's daily limit at the moment of a decision: its limit less today's
    charges and the reservations still open across all its runs. None: no limit of that kind."""

    usd: Decimal | None
    tokens: int | None


def task_id(run_id: uuid.UUID, step: str, attempt: int) -> str:
    """The id of a step's attempt: the same attempt always gets the same id."""
    return f"{run_id}:{step}:{attempt}"


def fact_for(state: RunState | None, event: Event) -> Fact | None:
    """The fact whose decision begins with `event`, given the state before it; None when the
    event cannot begin a decision."""
    if isinstance(event, RunStarted):
        return StartRunFact(
            run_id=event.run_id,
            workflow=event.workflow,
            input=event.input,
            intent=event.intent,
            requested_by=event.actor,
            at=event.at,
            budget=event.budget,
            tenant=event.tenant,
            forked_from=event.forked_from,
            carried=event.carried,
            trace_id=event.trace_id,
            trace_span_id=event.trace_span_id,
        )
    if state is None:
        return None
    if isinstance(event, ResultReceived):
        return ResultFact.model_construct(result=result_of(event), at=event.at)
    if isinstance(event, RunCancelled):
        return CancelFact(
            run_id=event.run_id,
            requested_by=event.actor,
            reason=_given(event.reason, CANCEL_REASON),
            at=event.at,
        )
    if isinstance(event, TaskTimedOut):
        return TimerFact(
            run_id=event.run_id,
            step=event.step,
            attempt=event.attempt,
            kind="timeout",
            at=event.at,
        )
    if isinstance(event, ApprovalGranted | ApprovalDenied):
        approve = isinstance(event, ApprovalGranted)
        return ApprovalFact(
            run_id=event.run_id,
            step=event.step,
            by=event.by,
            approve=approve,
            reason=_given(event.reason, APPROVE_REASON if approve else DENY_REASON),
            at=event.at,
        )
    if isinstance(event, BudgetRaised):
        return BudgetFact(
            run_id=event.run_id,
            usd=event.usd,
            tokens=event.tokens,
            by=event.by,
            reason=_given(event.reason, BUDGET_REASON),
            at=event.at,
        )
    if isinstance(event, ApprovalWarned | ApprovalEscalated | ApprovalExpired):
        approval = state.approvals.get(event.request_id)
        return TimerFact(
            run_id=event.run_id,
            step=event.step,
            attempt=approval.attempt if approval else 0,
            kind="approval_warn" if isinstance(event, ApprovalWarned) else "approval",
            at=event.at,
            request_id=event.request_id,
        )
    if isinstance(event, CapabilityUnserved):
        return UnservedFact(
            run_id=event.run_id,
            step=event.step,
            attempt=event.attempt,
            capability=event.capability,
            at=event.at,
        )
    # The end of a retry backoff: the first event of its decision is about a step waiting to
    # retry (usually its TaskDispatched; a reservation, an exhausted budget or a failure too).
    step_name = getattr(event, "step", None)
    step = state.steps.get(step_name) if isinstance(step_name, str) else None
    if step is not None and step.status == "retry_wait":
        return TimerFact(
            run_id=event.run_id,
            step=step.name,
            attempt=step.attempt + 1,
            kind="retry",
            at=event.at,
        )
    return None


def _given(recorded: str, default: str) -> str:
    """The reason the fact was given: none when the decision recorded its default."""
    return "" if recorded == default else recorded
