"""The events of a run's stream, versioned.

Who decided is in `actor`: "coordinator" for policy decisions, "agent:<id>" for agent outputs,
"human:<name>" for people, "client:<name>" for whoever started or cancelled a run.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import Field

from .base import Event, Frozen, register
from .workflow import WorkflowSpec


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


@register
class RunStarted(Event):
    workflow: WorkflowSpec
    input: dict[str, Any]
    intent: Intent


@register
class TaskDispatched(Event):
    """A task was sent to an agent capability; carries everything its envelope needs."""

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


class ReportedError(Frozen):
    message: str
    retryable: bool = True


@register
class ResultReceived(Event):
    """An agent's result as it arrived: the fact the decisions after it were made from.

    Recording inputs, not only decisions, is what lets today's code re-decide a history."""

    task_id: str
    step: str
    attempt: int
    agent_id: str
    output: dict[str, Any] | None = None
    error: ReportedError | None = None
    usage: list[Usage] = Field(default_factory=list)
    started_at: datetime
    finished_at: datetime


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


TERMINAL_EVENTS: tuple[type[Event], ...] = (RunCompleted, RunFailed, RunCancelled)
