"""Messages that cross NATS. Kept apart from stored events: the wire may change shape without
rewriting history, and the translation happens in one place (`events/mappings.py`).

Every message carries `v`, the protocol version; a receiver rejects versions it does not know.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from cairn.events.base import Frozen
from cairn.events.bounds import (
    MAX_ITEMS,
    MAX_NAME,
    MAX_USAGE_RECORDS,
    Amount,
    Attempt,
    BoundedBudget,
    BoundedIntent,
    BudgetTokens,
    JsonObject,
    Name,
    ReportedUsage,
    Text,
)
from cairn.events.run import Intent, Lineage
from cairn.events.workflow import StepSpec, WorkflowSpec

PROTOCOL_VERSION = 1


class TaskEnvelope(Frozen):
    """A unit of work for an agent, published on `cairn.task.<capability>`."""

    v: Literal[1] = 1
    task_id: str
    run_id: uuid.UUID
    step: str
    attempt: int
    capability: str
    input: dict[str, Any]
    intent: Intent
    lineage: list[Lineage] = Field(default_factory=list)
    contract: str | None = None
    # Validation errors of the previous attempt's output, so the agent can repair it.
    repair: list[str] = Field(default_factory=list)
    timeout_s: float
    # The model to use instead of the agent's default; sent only when the step names one.
    model: str | None = None
    # A secret for this task alone: its result must carry it back (`TaskResult.task_key`), so
    # a result answers the task it was sent with and nobody else's.
    task_key: str = ""


class TaskError(Frozen):
    message: Text
    retryable: bool = True


class TaskResult(Frozen):
    """What an agent publishes on `cairn.result.<capability>.<run_id>` when it is done with a
    task; `task_key` is the one its task envelope carried."""

    v: Literal[1] = 1
    task_id: Annotated[str, Field(max_length=3 * MAX_NAME)]
    run_id: uuid.UUID
    step: Name
    attempt: Attempt
    agent_id: Name
    output: JsonObject | None = None
    error: TaskError | None = None
    usage: list[ReportedUsage] = Field(default_factory=list, max_length=MAX_USAGE_RECORDS)
    started_at: datetime
    finished_at: datetime
    # Set by an agent that wants a person to look at its output before the run uses it.
    review: Text | None = None
    # Follow-up steps the agent proposes (admitted only if the step may propose, within limits).
    proposals: list[StepSpec] = Field(default_factory=list, max_length=50)
    task_key: Annotated[str, Field(max_length=200)] = ""


class StartRun(Frozen):
    """Command on `cairn.cmd.start`: begin a run of a workflow (by name, or given inline)."""

    v: Literal[1] = 1
    run_id: uuid.UUID | None = None  # give one to make the command idempotent
    workflow: Name | WorkflowSpec
    input: JsonObject = Field(default_factory=dict)
    intent: BoundedIntent | None = None
    budget: BoundedBudget | None = None
    tenant: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    requested_by: Name = "client:cli"


class CancelRun(Frozen):
    """Command on `cairn.cmd.cancel`."""

    v: Literal[1] = 1
    run_id: uuid.UUID
    requested_by: Name = "client:cli"
    reason: Text = ""


class ForkRun(Frozen):
    """Command on `cairn.cmd.fork`: a new run that starts from a run's state after event
    `at_seq`, taking over the outputs of the steps completed by then (and `overrides`, which
    replace a step's output and make the steps built from it run again). `models` gives steps
    another model: each runs again with it, and so do the steps built from it."""

    v: Literal[1] = 1
    parent_run_id: uuid.UUID
    at_seq: int = Field(ge=1)
    overrides: dict[Name, JsonObject] = Field(default_factory=dict, max_length=MAX_ITEMS)
    models: dict[Name, Name] = Field(default_factory=dict, max_length=MAX_ITEMS)
    run_id: uuid.UUID | None = None
    requested_by: Name = "client:cli"


class ApprovalDecision(Frozen):
    """Command on `cairn.cmd.approve` or `cairn.cmd.deny`: decide a step's pending approval."""

    v: Literal[1] = 1
    run_id: uuid.UUID
    step: Name
    by: Name
    reason: Text = ""


class RaiseBudget(Frozen):
    """Command on `cairn.cmd.budget`: set a run's budget to new totals."""

    v: Literal[1] = 1
    run_id: uuid.UUID
    usd: Amount | None = None
    tokens: BudgetTokens | None = None
    by: Name
    reason: Text = ""


class CommandReply(Frozen):
    """The answer to every command: ok with the run's id, or one clear error."""

    ok: bool
    run_id: uuid.UUID | None = None
    status: str | None = None
    error: str | None = None
    data: Any = None  # what a query command answers with


class DeadLetter(Frozen):
    """A message cairn could not process, republished on `cairn.dlq.<source>`."""

    subject: str
    reason: str
    payload: str  # the original bytes, decoded as UTF-8 with replacement
    received_at: datetime
    service: str


class EventNotice(Frozen):
    """The live feed on `cairn.event.<run_id>.<EventType>`: a committed event and its position."""

    position: int
    event_id: uuid.UUID
    type: str
    event: dict[str, Any]
