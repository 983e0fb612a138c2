"""Request bodies and response shapes of the HTTP API (they make its OpenAPI document)."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cairn.projections import AuditRow, CostRow, RunRow, StepRow


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Decide(Body):
    """Approve or deny the pending request of a step. Who decides is the token's subject."""

    step: str = Field(min_length=1, max_length=200, description="the step waiting at a gate")
    reason: str = Field(default="", max_length=2000, description="why, for the record")


class Cancel(Body):
    reason: str = Field(default="", max_length=2000, description="why, for the record")


class RaiseBudget(Body):
    """New totals for the run's budget; at least one of `usd` and `tokens`."""

    usd: Decimal | None = Field(default=None, ge=0, max_digits=18, decimal_places=10)
    tokens: int | None = Field(default=None, ge=0)
    reason: str = Field(default="", max_length=2000)

    @model_validator(mode="after")
    def _something(self) -> RaiseBudget:
        if self.usd is None and self.tokens is None:
            raise ValueError("give usd, tokens or both: the budget's new totals")
        return self


class StartRun(Body):
    """Start a run of a workflow the coordinator knows by name; who started it is the token's
    subject (`human:<subject>`)."""

    workflow: str = Field(
        min_length=1, max_length=200, description="a workflow name (built in, or <home>/workflows)"
    )
    input: dict[str, Any] = Field(
        default_factory=dict, description="the run input, checked against the workflow first"
    )
    goal: str | None = Field(
        default=None, min_length=1, max_length=2000, description="the run's intent"
    )
    budget_usd: Decimal | None = Field(default=None, ge=0, max_digits=18, decimal_places=10)
    budget_tokens: int | None = Field(default=None, ge=0)
    tenant: str = Field(default="default", min_length=1, max_length=64)


class CommandResult(BaseModel):
    """The coordinator's answer to a command that it carried out."""

    ok: bool
    run_id: uuid.UUID | None
    status: str | None
    by: str = Field(description="who the command was sent as (the token's subject)")


class StartedRun(CommandResult):
    """A run the coordinator started, and what it warned about."""

    warning: str | None = Field(
        default=None, description="e.g. that no live agent serves a capability a step names"
    )
    unserved: dict[str, list[str]] = Field(
        default_factory=dict, description="capabilities no live agent serves, with their steps"
    )


class RunsPage(BaseModel):
    runs: list[RunRow]
    limit: int
    offset: int
    more: bool = Field(description="whether a next page (offset + limit) has runs")


class BudgetView(BaseModel):
    """The run's budget as last set (at start or by BudgetRaised) and what it has spent."""

    usd: Decimal | None
    tokens: int | None
    on_exhausted: str
    spent_usd: Decimal
    spent_tokens: int
    remaining_usd: Decimal | None


class Approval(BaseModel):
    """A pending approval request, as the coordinator lists it."""

    model_config = ConfigDict(extra="allow")

    run_id: uuid.UUID
    workflow: str
    goal: str
    step: str
    kind: str
    group: str
    due_at: datetime
    cost_so_far_usd: Decimal


class RunDetail(BaseModel):
    run: RunRow
    steps: list[StepRow]
    timeline: list[AuditRow]
    outputs: dict[str, Any] = Field(description="each completed step's accepted output")
    budget: BudgetView | None
    approvals: list[Approval] | None = Field(
        description="this run's pending approvals; null when the coordinator cannot be asked"
    )
    approvals_error: str | None = None
    position: int = Field(description="the log position the views reflected")
    trace_id: str | None = Field(
        default=None, description="the run's OpenTelemetry trace, when it was traced"
    )


class DayCost(BaseModel):
    day: str
    amount_usd: Decimal
    charges: int


class CostsReply(BaseModel):
    by: Literal["run", "agent", "model"]
    rows: list[CostRow]
    total: Decimal
    by_day: list[DayCost]


class ProcessRestarts(BaseModel):
    """A process of `cairn up` that crashed and was started again: how many times, how it
    ended the last time, and when it was last restarted."""

    name: str
    restarts: int
    last_ended: str
    last_at: str


class AgentRow(BaseModel):
    """One capability's shared JetStream consumer (`cairn-agent-<capability>`).

    - `live`: some replica is pulling or working (one that died mid-task still counts until
      its tasks' ack deadline, `CAIRN_AGENT_ACK_WAIT`, passes), or was handed a task in the
      last minute; the rule a start's warning about unserved capabilities uses.
    - `waiting_pulls`: open pull requests (`num_waiting`); each idle pull loop of a live
      replica keeps one open, so > 0 means some replica is asking for work now. Requests expire
      and are renewed every couple of seconds, so the number flickers.
    - `in_flight`: tasks delivered and not yet acked (`num_ack_pending`): being worked on, or
      held by a replica that died until their ack deadline passes.
    - `queued`: tasks in the stream not yet delivered (`num_pending`).
    - `replicas_estimate`: ceil((waiting_pulls + in_flight) / concurrency), assuming each
      replica runs `concurrency` pull loops (`CAIRN_AGENT_CONCURRENCY`, default 4).
    - `last_delivered_at` / `last_acked_at`: the consumer's last delivery and last ack.
    - `restarts`: how often `cairn up` restarted the capability's processes after a crash.
    """

    capability: str
    consumer: str
    live: bool
    waiting_pulls: int
    in_flight: int
    queued: int
    redelivered: int
    replicas_estimate: int
    last_delivered_at: datetime | None
    last_acked_at: datetime | None
    restarts: int = Field(
        default=0, description="how often `cairn up` restarted this capability's processes"
    )


class AgentsReply(BaseModel):
    agents: list[AgentRow]
    concurrency: int = Field(description="pull loops per replica assumed for the estimate")
    restarts: list[ProcessRestarts] = Field(
        default_factory=list,
        description="every process `cairn up` restarted since it started, with why",
    )


class DeadLetterRow(BaseModel):
    """One dead letter (without its payload: `cairn dead-letters --json` shows it)."""

    seq: int = Field(description="its sequence in CAIRN_DLQ")
    source: str = Field(
        description="who refused it: coordinator, coordinator.<capability>, agent.<capability>"
    )
    stored_at: datetime
    run_id: str | None = Field(description="the run it concerns, when its subject or body says")
    subject: str | None = Field(description="where the refused message came in")
    reason: str
    service: str | None = Field(description="the process that refused it, as it says")


class ReasonRow(BaseModel):
    """How many letters one source refused for one reason (ids and numbers masked)."""

    source: str
    reason: str
    letters: int


class DeadLettersReply(BaseModel):
    """What CAIRN_DLQ holds (seven days): exact counts by source, the letters matching the
    filters counted by reason (ids and numbers masked), and the newest of them."""

    total: int
    by_source: dict[str, int]
    matched: int = Field(description="letters matching the filters")
    by_reason: list[ReasonRow] = Field(description="the matching letters read, by reason")
    letters: list[DeadLetterRow]
