"""The dashboard: server-rendered pages over the same reads and commands as the JSON API.

Pages need a login too: `/login` takes a token and keeps it in an HttpOnly, SameSite=Strict
cookie that the API accepts as well as the Authorization header, so the pages' scripts call
the API with it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from cairn.events import RUN_STATUSES
from cairn.projections import RunStatus, Views
from cairn.projections.http.api import backend_of, page_of_runs, run_detail
from cairn.projections.http.auth import COOKIE_NAME, Grant, Role, Tokens, page_viewer
from cairn.projections.http.backend import Backend
from cairn.projections.http.charts import bar_chart, column_chart
from cairn.projections.http.costs import daily_costs
from cairn.projections.http.errors import ApiError
from cairn.projections.http.models import AgentsReply, Approval
from cairn.runtime.deadletters import DeadLetterReport

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))

Viewer = Annotated[Grant, Depends(page_viewer)]
COOKIE_MAX_AGE = 7 * 24 * 3600
# The newest dead letters the agents page lists (`cairn dead-letters` shows more).
DEAD_LETTERS_SHOWN = 10


def _age(at: datetime | None) -> str:
    if at is None:
        return ""
    seconds = max(0, int((datetime.now(UTC) - at.astimezone(UTC)).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _usd(amount: Decimal | None) -> str:
    return "" if amount is None else f"${amount:f}"


templates.env.filters["age"] = _age
templates.env.filters["pretty"] = _pretty
templates.env.filters["usd"] = _usd
templates.env.globals["Role"] = Role


def _page(
    request: Request, name: str, grant: Grant | None, code: int = 200, **data: Any
) -> Response:
    return templates.TemplateResponse(
        request, name, {"grant": grant, "path": request.url.path, **data}, status_code=code
    )


async def _pending(backend: Backend) -> tuple[list[Approval] | None, str | None]:
    """The coordinator's pending approvals, or None and why not (a page still renders)."""
    try:
        pending = await backend.ask(lambda c: c.approvals())
    except ApiError as exc:
        return None, exc.message
    return [Approval.model_validate(a) for a in pending], None


# -- login -------------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never `//host` or a full URL (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/runs"
    return target


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str | None = None) -> Response:
    return _page(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    # An urlencoded form, parsed here: no multipart dependency for one field.
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    target = _safe_next((form.get("next") or [""])[0])
    tokens: Tokens = request.app.state.tokens
    grant = tokens.lookup(token) if token else None
    if grant is None:
        return _page(
            request,
            "login.html",
            None,
            code=401,
            next=target,
            error="That token is not configured on this server.",
        )
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=COOKIE_MAX_AGE,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/logout")
async def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


@router.get("/")
async def home() -> Response:
    return RedirectResponse("/runs", status_code=303)


# -- pages -------------------------------------------------------------------------------------


@router.get("/runs", response_class=HTMLResponse)
async def runs_page(
    request: Request,
    grant: Viewer,
    status: Annotated[RunStatus | None, Query()] = None,
    workflow: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    backend = backend_of(request)
    workflow = workflow or None
    rows = await backend.read(lambda v: page_of_runs(v, status, workflow, offset + limit + 1))
    pending, pending_error = await _pending(backend)
    waiting: dict[str, list[str]] = {}
    for a in pending or []:
        waiting.setdefault(str(a.run_id), []).append(a.step)

    def link(new_offset: int) -> str:
        query = {"status": status or "", "workflow": workflow or "", "limit": limit}
        return "/runs?" + urlencode({**query, "offset": new_offset})

    return _page(
        request,
        "runs.html",
        grant,
        runs=rows[offset : offset + limit],
        waiting=waiting,
        pending_error=pending_error,
        status=status,
        workflow=workflow or "",
        statuses=RUN_STATUSES,
        prev_link=link(max(0, offset - limit)) if offset > 0 else None,
        next_link=link(offset + limit) if len(rows) > offset + limit else None,
    )


@router.get("/runs/{run}", response_class=HTMLResponse)
async def run_page(request: Request, run: str, grant: Viewer) -> Response:
    detail = await run_detail(backend_of(request), run)
    return _page(request, "run.html", grant, d=detail)


@router.get("/runs/{run}/live", response_class=HTMLResponse)
async def run_fragment(
    request: Request,
    run: str,
    grant: Viewer,
    position: Annotated[int | None, Query(ge=0)] = None,
) -> Response:
    """The live part of a run's page, re-read by its script on each event notice."""
    detail = await run_detail(backend_of(request), run, position)
    return _page(request, "_run_live.html", grant, d=detail)


@router.get("/costs", response_class=HTMLResponse)
async def costs_page(
    request: Request,
    grant: Viewer,
    by: Annotated[Literal["model", "agent", "run"], Query()] = "model",
    days: Annotated[int, Query(ge=1, le=366)] = 30,
) -> Response:
    def read(views: Views) -> dict[str, Any]:
        rows = views.costs(by=by)
        daily = daily_costs(views, days)
        return {
            "rows": rows,
            "total": sum((r.amount_usd for r in rows), Decimal(0)),
            "daily": daily,
            "day_chart": column_chart(
                [(d.day, d.amount_usd) for d in daily], f"cost per day, last {days} days (UTC)"
            ),
            "key_chart": bar_chart(
                [(r.key[:8] if by == "run" else r.key, r.amount_usd) for r in rows[:20]],
                f"cost by {by}",
            ),
        }

    data = await backend_of(request).read(read)
    return _page(request, "costs.html", grant, by=by, days=days, **data)


@router.get("/approvals", response_class=HTMLResponse)
async def approvals_page(request: Request, grant: Viewer) -> Response:
    pending, error = await _pending(backend_of(request))
    return _page(request, "approvals.html", grant, pending=pending, error=error)


@router.get("/agents", response_class=HTMLResponse)
async def agents_page(request: Request, grant: Viewer) -> Response:
    from cairn.projections.http.agents import agents

    backend = backend_of(request)
    dead, dead_error = await _dead_letters(backend)
    reply: AgentsReply | None = None
    error: str | None = None
    try:
        reply = await backend.ask(lambda c: agents(c, backend.settings))
    except ApiError as exc:
        error = exc.message
    return _page(
        request, "agents.html", grant, reply=reply, error=error, dead=dead, dead_error=dead_error
    )


async def _dead_letters(backend: Backend) -> tuple[DeadLetterReport | None, str | None]:
    """The newest dead letters for the agents page, or why they could not be read."""
    try:
        return await backend.ask(lambda c: c.dead_letters(limit=DEAD_LETTERS_SHOWN)), None
    except ApiError as exc:
        return None, exc.message


def error_page(request: Request, status: int, message: str) -> Response:
    """A dashboard page's error, as a page (the API's are JSON)."""
    return _page(request, "error.html", None, code=status, status_code=status, message=message)
