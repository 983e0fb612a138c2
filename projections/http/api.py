"""The JSON API: reads from the views and the store, commands to the coordinator over NATS."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from cairn.events import (
    Budget,
    CommandReply,
    Intent,
    UnknownEventError,
    event_class,
)
from cairn.events.validation import validation_reason
from cairn.projections import AuditRow, RunRow, RunStatus, StepRow, Views
from cairn.projections.filters import BadInstantError, parse_instant
from cairn.projections.http import agents as agent_info
from cairn.projections.http.auth import Grant, Role, require
from cairn.projections.http.backend import Backend
from cairn.projections.http.costs import daily_costs
from cairn.projections.http.errors import (
    COMMAND_ERRORS,
    NATS_ERRORS,
    START_REFUSED,
    VIEWS_ERRORS,
    ApiError,
)
from cairn.projections.http.models import (
    AgentsReply,
    Approval,
    Cancel,
    CommandResult,
    CostsReply,
    DeadLetterRow,
    DeadLettersReply,
    Decide,
    RaiseBudget,
    ReasonRow,
    RunDetail,
    RunsPage,
    StartedRun,
    StartRun,
)
from cairn.projections.http.record import budget_of, step_outputs
from cairn.runtime.client import CairnClient
from cairn.runtime.deadletters import RUN_PREFIX, SOURCE

router = APIRouter(prefix="/api", tags=["api"])

Viewer = Annotated[Grant, Depends(require(Role.viewer))]
Approver = Annotated[Grant, Depends(require(Role.approver))]
Admin = Annotated[Grant, Depends(require(Role.admin))]
Sender = Callable[[CairnClient, uuid.UUID], Awaitable[CommandReply]]
RunRef = Annotated[str, Path(description="a run id or a unique prefix of one")]

# How long a read that names a log position (`position=`) waits for the views to reach it.
POSITION_WAIT_S = 5.0


def backend_of(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


# -- reads -------------------------------------------------------------------------------------


@router.get("/runs", responses=VIEWS_ERRORS)
async def list_runs(
    request: Request,
    grant: Viewer,
    status: Annotated[RunStatus | None, Query(description="only runs with this status")] = None,
    workflow: Annotated[str | None, Query(description="only runs of this workflow")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> RunsPage:
    """Runs, the most recently started first."""
    rows = await backend_of(request).read(
        lambda v: page_of_runs(v, status, workflow, limit + offset + 1)
    )
    return RunsPage(
        runs=rows[offset : offset + limit],
        limit=limit,
        offset=offset,
        more=len(rows) > offset + limit,
    )


def page_of_runs(
    views: Views, status: RunStatus | None, workflow: str | None, want: int
) -> list[RunRow]:
    """The first `want` runs with `status` and `workflow` (the views filter only by status)."""
    if workflow is None:
        return views.runs(status=status, limit=want)
    fetch = want
    while True:
        rows = views.runs(status=status, limit=fetch)
        matching = [r for r in rows if r.workflow == workflow]
        if len(matching) >= want or len(rows) < fetch:
            return matching[:want]
        fetch *= 4


@router.get("/runs/{run}", responses={**VIEWS_ERRORS, 404: COMMAND_ERRORS[404]})
async def get_run(
    request: Request,
    run: RunRef,
    grant: Viewer,
    position: Annotated[
        int | None,
        Query(
            ge=0,
            description="wait (up to 5 s) until the views reflect this log position: a client "
            "that got an event notice reads a view that includes that event",
        ),
    ] = None,
) -> RunDetail:
    """One run: state, steps, timeline, step outputs, budget and its pending approvals."""
    return await run_detail(backend_of(request), run, position)


async def run_detail(backend: Backend, ref: str, position: int | None = None) -> RunDetail:
    def read(views: Views) -> tuple[int, RunRow, list[StepRow], list[AuditRow]]:
        if position:
            # On timeout, answer with what the views hold: `position` in the reply says how far.
            with contextlib.suppress(TimeoutError):
                views.wait_for(position, POSITION_WAIT_S)
        at = views.position()
        run_id = backend.resolve(views, ref)
        row = views.run(run_id)
        if row is None:
            raise ApiError(404, f"no run {run_id} in the views yet")
        return at, row, list(views.steps(run_id)), views.timeline(run_id)

    at, row, steps, timeline = await backend.read(read)
    events = await run_in_threadpool(backend.run_events, row.run_id)
    approvals: list[Approval] | None = None
    error = None
    try:
        pending = await backend.ask(lambda c: c.approvals())
        approvals = [
            Approval.model_validate(a) for a in pending if a.get("run_id") == str(row.run_id)
        ]
    except ApiError as exc:
        error = exc.message
    return RunDetail.model_validate(
        {
            "run": row,
            "steps": steps,
            "timeline": timeline,
            "outputs": step_outputs(events) if events else {},
            "budget": budget_of(events),
            "approvals": approvals,
            "approvals_error": error,
            "position": at,
            "trace_id": events[0].trace_id if events else None,
        }
    )


@router.get("/costs", responses=VIEWS_ERRORS)
async def costs(
    request: Request,
    grant: Viewer,
    by: Annotated[Literal["run", "agent", "model"], Query()] = "run",
    run: Annotated[str | None, Query(description="only this run (id or prefix)")] = None,
    days: Annotated[int, Query(ge=1, le=366, description="days covered by `by_day`")] = 30,
) -> CostsReply:
    """Cost totals from the recorded charges, grouped by run, agent (capability) or model, and
    per UTC day over the last `days` days."""
    backend = backend_of(request)

    def read(views: Views) -> CostsReply:
        run_id = backend.resolve(views, run) if run else None
        rows = views.costs(by=by, run_id=run_id)
        return CostsReply(
            by=by,
            rows=rows,
            total=sum((r.amount_usd for r in rows), Decimal(0)),
            by_day=daily_costs(views, days, run_id=run_id),
        )

    return await backend.read(read)


@router.get("/audit", responses=VIEWS_ERRORS)
async def audit(
    request: Request,
    grant: Viewer,
    run: Annotated[str | None, Query(description="only this run (id or prefix)")] = None,
    actor: Annotated[
        str | None,
        Query(
            description="an exact actor (coordinator, human:maria), or ending in ':' or '*' "
            "a prefix (agent:, agent:researcher*)"
        ),
    ] = None,
    type: Annotated[
        list[str] | None, Query(description="event types, any of them (repeatable)")
    ] = None,
    since: Annotated[
        str | None, Query(description="from this ISO date or time (inclusive; UTC unless given)")
    ] = None,
    until: Annotated[
        str | None, Query(description="up to this ISO date or time (a date: its whole day)")
    ] = None,
    limit: Annotated[int, Query(ge=0, le=100_000, description="the latest N rows; 0: all")] = 200,
) -> list[AuditRow]:
    """Who decided what, when and why: the audit trail, oldest of the selected rows first."""
    types = [_event_type(name) for name in type or []]
    start = parse_time(since, "since", end_of_day=False) if since else None
    end = parse_time(until, "until", end_of_day=True) if until else None
    if start and end and start > end:
        raise ApiError(422, f"since {since} is after until {until}: nothing can match")
    backend = backend_of(request)

    def read(views: Views) -> list[AuditRow]:
        run_id = backend.resolve(views, run) if run else None
        return views.audit(
            run_id=run_id, limit=limit or None, actor=actor, types=types, since=start, until=end
        )

    return await backend.read(read)


def _event_type(name: str) -> str:
    try:
        return event_class(name).type_name()
    except UnknownEventError:
        raise ApiError(422, f"type {name!r} is not an event type (e.g. TaskFailed)") from None


def parse_time(text: str, name: str, *, end_of_day: bool) -> datetime:
    """An ISO date or time as an aware datetime; 422 naming the parameter otherwise."""
    try:
        return parse_instant(text, name, end_of_day=end_of_day)
    except BadInstantError as exc:
        raise ApiError(422, str(exc)) from None


@router.get("/approvals", responses=NATS_ERRORS)
async def approvals(request: Request, grant: Viewer) -> list[Approval]:
    """Pending approval requests, the earliest deadline first (asked of the coordinator)."""
    pending = await backend_of(request).ask(lambda c: c.approvals())
    return [Approval.model_validate(a) for a in pending]


@router.get("/agents", responses=NATS_ERRORS)
async def agents(request: Request, grant: Viewer) -> AgentsReply:
    """Agent capabilities and their replicas, from the JetStream consumers they pull from."""
    backend = backend_of(request)
    return await backend.ask(lambda c: agent_info.agents(c, backend.settings))


@router.get("/dead-letters", responses=NATS_ERRORS)
async def dead_letters(
    request: Request,
    grant: Viewer,
    run: Annotated[
        str | None,
        Query(
            description="only letters about this run (an id or its first characters)",
            pattern=f"^{RUN_PREFIX.pattern}$",
        ),
    ] = None,
    source: Annotated[
        str | None,
        Query(
            description="only letters from this source "
            "(coordinator, coordinator.<capability>, agent.<capability>)",
            max_length=200,
            pattern=f"^{SOURCE.pattern}$",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=0, le=1000)] = 20,
) -> DeadLettersReply:
    """Messages cairn refused, and why (CAIRN_DLQ keeps them seven days), newest first."""
    report = await backend_of(request).ask(
        lambda c: c.dead_letters(run=run, source=source, limit=limit)
    )
    data = report.summary()
    return DeadLettersReply(
        total=report.total, by_source=report.by_source, matched=report.matched,
        by_reason=[ReasonRow.model_validate(r) for r in data["by_reason"]],
        letters=[DeadLetterRow.model_validate(row) for row in data["letters"]],
    )  # fmt: skip


# -- commands ----------------------------------------------------------------------------------


async def _send(
    backend: Backend, grant: Grant, command: str, send: Sender, run: str
) -> CommandResult:
    run_id = await backend.run_id(run)
    reply: CommandReply = await backend.ask(lambda c: send(c, run_id))
    if not reply.ok:
        raise ApiError(409, reply.error or f"the coordinator refused the {command} command")
    return CommandResult(ok=True, run_id=reply.run_id, status=reply.status, by=grant.subject)


@router.post("/runs", responses={**NATS_ERRORS, 422: START_REFUSED})
async def start_run(request: Request, body: StartRun, grant: Admin) -> StartedRun:
    """Start a run (admin). Input that does not fit the workflow is refused (422) with the field
    and the reason, and no run is created; a step whose capability no live agent serves is
    named in `warning` (the run starts all the same: agents may come later)."""
    budget = None
    if body.budget_usd is not None or body.budget_tokens is not None:
        budget = Budget(usd=body.budget_usd, tokens=body.budget_tokens)
    intent = Intent(goal=body.goal) if body.goal else None

    async def send(client: CairnClient) -> CommandReply:
        return await client.start_run(
            body.workflow, body.input, intent=intent, budget=budget, tenant=body.tenant,
            requested_by=f"human:{grant.subject}",
        )  # fmt: skip

    try:
        reply = await backend_of(request).ask(send)
    except ValidationError as exc:
        raise ApiError(422, validation_reason(exc, "the run")) from None
    if not reply.ok:
        raise ApiError(422, reply.error or "the coordinator refused to start the run")
    data = reply.data if isinstance(reply.data, dict) else {}
    return StartedRun(
        ok=True, run_id=reply.run_id, status=reply.status, by=grant.subject,
        warning=data.get("warning"), unserved=data.get("unserved") or {},
    )  # fmt: skip


@router.post("/runs/{run}/approve", responses=COMMAND_ERRORS)
async def approve(request: Request, run: RunRef, body: Decide, grant: Approver) -> CommandResult:
    """Approve the step's pending request; the record names the token's subject as approver."""

    async def send(client: CairnClient, run_id: uuid.UUID) -> CommandReply:
        return await client.approve(run_id, body.step, grant.subject, body.reason)

    return await _send(backend_of(request), grant, "approve", send, run)


@router.post("/runs/{run}/deny", responses=COMMAND_ERRORS)
async def deny(request: Request, run: RunRef, body: Decide, grant: Approver) -> CommandResult:
    """Deny the step's pending request; the record names the token's subject."""

    async def send(client: CairnClient, run_id: uuid.UUID) -> CommandReply:
        return await client.approve(run_id, body.step, grant.subject, body.reason, deny=True)

    return await _send(backend_of(request), grant, "deny", send, run)


@router.post("/runs/{run}/cancel", responses=COMMAND_ERRORS)
async def cancel(
    request: Request,
    run: RunRef,
    grant: Admin,
    body: Annotated[Cancel | None, Body()] = None,
) -> CommandResult:
    """Cancel a run (admin)."""
    reason = body.reason if body is not None else ""

    async def send(client: CairnClient, run_id: uuid.UUID) -> CommandReply:
        return await client.cancel_run(run_id, reason, requested_by=f"human:{grant.subject}")

    return await _send(backend_of(request), grant, "cancel", send, run)


@router.post("/runs/{run}/budget", responses=COMMAND_ERRORS)
async def raise_budget(
    request: Request, run: RunRef, body: RaiseBudget, grant: Admin
) -> CommandResult:
    """Set the run's budget to new totals (admin); a step waiting for budget goes on."""

    async def send(client: CairnClient, run_id: uuid.UUID) -> CommandReply:
        return await client.raise_budget(run_id, grant.subject, body.usd, body.tokens, body.reason)

    return await _send(backend_of(request), grant, "budget", send, run)
