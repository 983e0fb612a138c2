"""The events of a run's stream, versioned.

Who decided is in `actor`: "coordinator" for policy decisions, "agent:<id>" for agent outputs,
"human:<name>" for people, "client:<name>" for whoever started or cancelled a run.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, Literal
from uuid import UUID

from pydantic import Field

from cairn.events.base import Event, Frozen, register, unset_none
from cairn.events.workflow import StepSpec, WorkflowSpec

Upcasters = dict[int, Callable[[dict[str, Any]], dict[str, Any]]]


class Intent(Frozen):
    """What the run is for; travels with every task so no step loses sight of it."""

    goal: str
    constraints: list[str] = Field(default_factory=list)
    success_criteria: list[str] = Field(default_factory=list)


class Usage(Frozen):
    """Metered consumption reported by an agent for one model."""

    model: str
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)


class Lineage(Frozen):
    """One earlier output a task was built from."""

    step: str
    attempt: int
    agent_id: str
    output_hash: str


class Budget(Frozen):
    """What a run may spend. When the next reservation does not fit, the coordinator does not
    dispatch: it asks for a raise (`ask`) or fails the run (`fail`)."""

    usd: Decimal | None = Field(default=None, ge=0)
    tokens: int | None = Field(default=None, ge=0)
    on_exhausted: Literal["ask", "fail"] = "ask"

    def raised(self, usd: Decimal | None, tokens: int | None) -> Budget:
        """This budget with the totals a BudgetRaised sets (None keeps a total as it is)."""
        return self.model_copy(
            update={
                "usd": usd if usd is not None else self.usd,
                "tokens": tokens if tokens is not None else self.tokens,
            }
        )


class CarriedOutput(Frozen):
    """A step output a forked run starts with instead of paying for the step again."""

    output: dict[str, Any]
    source: str  # where it came from: "run <id> step <name> attempt <n>", or an override


class ForkOrigin(Frozen):
    """The run and event a fork started from, and the steps it gave another model."""

    run_id: UUID
    seq: int
    models: dict[str, str] = Field(default_factory=dict)


def _unchanged(data: dict[str, Any]) -> dict[str, Any]:
    """A version that added optional fields only reads what the one before wrote as it is,
    with their defaults: version 2 (a step's `model`, a fork's `models`, a task's `model`),
    RunStarted's version 3 (the workflow's `input_schema`)."""
    return data


@register
class RunStarted(Event):
    # Version 3: the workflow may carry an `input_schema`. Older code reading one would fail
    # on an unknown field; the version makes it say "upgrade cairn" instead.
    version: ClassVar[int] = 3
    upcasters: ClassVar[Upcasters] = {1: _unchanged, 2: _unchanged}

    workflow: WorkflowSpec
    input: dict[str, Any]
    intent: Intent
    budget: Budget | None = None
    tenant: str = "default"
    forked_from: ForkOrigin | None = None
    carried: dict[str, CarriedOutput] = Field(default_factory=dict)
    # The run's root span (16 hex digits; its trace is `trace_id`): the start command's span,
    # under which the run's later decisions are traced.
    trace_span_id: str | None = unset_none()


@register
class OutputCarried(Event):
    """A forked run takes over a step's output (from its parent, or an override)."""

    step: str
    output_hash: str
    source: str


@register
class TaskDispatched(Event):
    """A task was sent to an agent capability; carries everything its envelope needs."""

    version: ClassVar[int] = 2
    upcasters: ClassVar[Upcasters] = {1: _unchanged}

    task_id: str
    step: str
    attempt: int
    capability: str
    input: dict[str, Any]
    intent: Intent
    lineage: list[Lineage] = Field(default_factory=list)
    contract: str | None = None
    repair: list[str] = Field(default_factory=list)
    timeout_s: float
    model: str | None = None  # the step's model, when it names one


class ReportedError(Frozen):
    message: str
    retryable: bool = True


@register
class ResultReceived(Event):
    """An agent's result as it arrived: the fact the decisions after it were made from.

    Recording inputs, not only decisions, is what lets today's code re-decide a history."""

    version: ClassVar[int] = 2
    upcasters: ClassVar[Upcasters] = {1: _unchanged}

    task_id: str
    step: str
    attempt: int
    agent_id: str
    output: dict[str, Any] | None = None
    error: ReportedError | None = None
    usage: list[Usage] = Field(default_factory=list)
    started_at: datetime
    finished_at: datetime
    review: str | None = None  # the agent asked for a person to look at its output
    proposals: list[StepSpec] = Field(default_factory=list)


@register
class TaskCompleted(Event):
    """The received output met the step's contract; later steps may use it."""

    task_id: str
    step: str
    attempt: int
    agent_id: str
    output_hash: str
    duration_ms: float = 0.0


@register
class CostCharged(Event):
    """The price of one model's usage on one task, under a named price table version."""

    task_id: str
    step: str
    capability: str
    agent_id: str
    model: str
    input_tokens: int
    output_tokens: int
    price_table: str
    amount_usd: Decimal


@register
class TaskFailed(Event):
    task_id: str
    step: str
    attempt: int
    agent_id: str
    error: str
    retryable: bool


@register
class ContractViolated(Event):
    """An agent's output (in the ResultReceived before it) did not validate against the step's
    declared contract."""

    task_id: str
    step: str
    attempt: int
    agent_id: str
    contract: str
    errors: list[str]


@register
class TaskTimedOut(Event):
    """No result arrived within the step's timeout."""

    task_id: str
    step: str
    attempt: int
    timeout_s: float


@register
class RetryScheduled(Event):
    """The step will be tried again at `due_at` (after backoff with jitter)."""

    step: str
    attempt: int  # the attempt that will be dispatched
    due_at: datetime
    delay_s: float
    repair: list[str] = Field(default_factory=list)


@register
class StepSkipped(Event):
    """The step failed for good and its failure policy says to go on without it."""

    step: str
    error: str


@register
class ResultIgnored(Event):
    """A result that changed nothing (a duplicate, or for an attempt no longer current)."""

    task_id: str
    agent_id: str


@register
class RunCompleted(Event):
    output: Any


@register
class RunFailed(Event):
    step: str | None = None
    error: str


@register
class RunCancelled(Event):
    pass


ApprovalKind = Literal["before", "cost", "output", "exhausted", "budget", "tenant", "loop"]


class ApprovalContext(Frozen):
    """What a reviewer needs to decide without digging: why, what is proposed, what it costs."""

    intent: Intent
    step: str
    capability: str
    proposed: Any = None  # the input about to be sent, or the output about to be accepted
    cost_so_far_usd: Decimal
    estimate_usd: Decimal | None = None
    note: str = ""


@register
class ApprovalRequested(Event):
    request_id: str
    step: str
    attempt: int
    kind: ApprovalKind
    group: str
    due_at: datetime
    warn_at: datetime | None = None
    context: ApprovalContext


@register
class ApprovalWarned(Event):
    """The request is about to expire (announced so someone can still act)."""

    request_id: str
    step: str
    due_at: datetime


@register
class ApprovalEscalated(Event):
    request_id: str
    step: str
    group: str
    due_at: datetime
    warn_at: datetime | None = None


@register
class ApprovalGranted(Event):
    request_id: str
    step: str
    by: str


@register
class ApprovalDenied(Event):
    request_id: str
    step: str
    by: str


@register
class ApprovalExpired(Event):
    """Nobody decided in time: recorded as expiry, never as a denial."""

    request_id: str
    step: str


def _no_tenant_allowance(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "tenant_available_usd": None, "tenant_available_tokens": None}


@register
class BudgetReserved(Event):
    """The step's estimate is set aside before dispatch. When the run's tenant has a daily
    limit, what the tenant had left at that moment is recorded too: it came from outside the
    run, and replay needs it to decide the same way."""

    version: ClassVar[int] = 2
    upcasters: ClassVar[Upcasters] = {1: _no_tenant_allowance}

    step: str
    attempt: int
    amount_usd: Decimal
    tenant_available_usd: Decimal | None = None
    tenant_available_tokens: int | None = None


@register
class BudgetSettled(Event):
    """The attempt's reservation is released and its actual cost counted."""

    step: str
    attempt: int
    reserved_usd: Decimal
    actual_usd: Decimal
    actual_tokens: int


@register
class BudgetExhausted(Event):
    """The next reservation does not fit: the run's budget (`scope="run"`) or its tenant's
    daily limit (`scope="tenant"`, with what the tenant had left)."""

    version: ClassVar[int] = 2
    upcasters: ClassVar[Upcasters] = {
        1: lambda data: {**_no_tenant_allowance(data), "scope": "run"}
    }

    step: str
    needed_usd: Decimal
    remaining_usd: Decimal | None
    remaining_tokens: int | None
    scope: Literal["run", "tenant"] = "run"
    tenant_available_usd: Decimal | None = None
    tenant_available_tokens: int | None = None


@register
class BudgetRaised(Event):
    usd: Decimal | None
    tokens: int | None
    by: str


@register
class StepAdmitted(Event):
    """An agent proposed a follow-up step and it fits the run's limits."""

    version: ClassVar[int] = 2
    upcasters: ClassVar[Upcasters] = {1: _unchanged}

    spec: StepSpec
    proposed_by: str


@register
class CapabilityUnserved(Event):
    """A dispatched task waits for an agent: no live agent serves its capability (a name
    misspelt, an agent not started). Recorded once per attempt; the task stays queued, and the
    step's timeout still applies."""

    step: str
    attempt: int
    capability: str


@register
class StepRefused(Event):
    name: str
    proposed_by: str
