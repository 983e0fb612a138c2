"""The rows the query API returns: frozen pydantic models, printable as JSON by the CLI."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from cairn.events import Frozen, RunStatus
from cairn.projections.projection import StepRowStatus


class RunRow(Frozen):
    """One run: where it stands, what it has cost, and how it ended."""

    run_id: uuid.UUID
    workflow: str
    workflow_version: int
    goal: str
    status: RunStatus
    current_step: str | None  # the latest dispatched step (where a finished run stopped)
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    steps_total: int
    steps_done: int
    attempts: int  # tasks dispatched, retries included
    cost_usd: Decimal
    error: str | None
    output: Any  # RunCompleted.output, None until the run completes
    last_seq: int
    last_position: int
    tenant: str = "default"


class StepRow(Frozen):
    """One step of a run, as of its latest attempt; cost and tokens cover all attempts."""

    run_id: uuid.UUID
    step: str
    capability: str
    status: StepRowStatus  # see `step_row_status`
    attempt: int
    agent_id: str | None
    dispatched_at: datetime | None
    finished_at: datetime | None
    cost_usd: Decimal
    input_tokens: int
    output_tokens: int


class CostRow(Frozen):
    """Charges summed over one key: a run id, an agent capability, a model, a tenant or a day."""

    key: str
    input_tokens: int
    output_tokens: int
    amount_usd: Decimal
    charges: int
    unpriced: int = 0  # charges a recomputation's price table did not cover


class AuditRow(Frozen):
    """One event as a decision or recorded fact: who, what, why."""

    position: int
    run_id: uuid.UUID
    seq: int
    at: datetime
    actor: str
    action: str  # the event type, e.g. "TaskDispatched"
    step: str | None
    reason: str
    detail: str
    trace_id: str | None = None  # the run's OpenTelemetry trace, when it was traced


class ProjectionStatus(Frozen):
    """How far one projection's views have followed the event log.

    The views record which log position they reflect, not when they got there: a wall-clock
    time would make rebuilt views differ from live ones. `last_event_at` is when the last
    projected event was recorded, `log_last_event_at` when the log's last one was; their
    difference is how far behind the views are in event time.
    """

    name: str
    views: list[str]  # the tables this projection keeps
    location: str
    built: bool  # False until a runner or a rebuild has created the views
    position: int
    log_position: int
    lag: int  # log positions not yet projected (events, bar gaps a PostgreSQL log may have)
    last_event_at: datetime | None
    log_last_event_at: datetime | None
