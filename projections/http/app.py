"""`create_app(settings, tokens)`: the HTTP API and dashboard as one FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from cairn.projections.http import api, errors, live, pages
from cairn.projections.http.auth import Tokens
from cairn.projections.http.backend import Backend
from cairn.projections.http.guard import RequestGuard
from cairn.runtime.settings import Settings

DESCRIPTION = """\
Read cairn's views (runs, steps, timelines, costs, the audit trail), follow committed events
live, and send commands (approve, deny, cancel, raise a budget) to the coordinator over NATS.

**Auth**: every endpoint needs a bearer token (`Authorization: Bearer TOKEN`) or the dashboard's
login cookie. Roles: `viewer` reads, `approver` also approves and denies, `admin` also cancels
and raises budgets. Who decided, as the record shows it, is the token's subject.

**Errors** are JSON `{"error": "..."}`: 401 without a valid token (answered before a body is
read), 403 for a role that may not, 404 for an unknown run, 409 when the coordinator refuses a
command, 413 for a body over the server's limit, 422 for invalid input, 503 when the views, NATS
or the coordinator cannot be reached (the message says which and what to start).
"""


def create_app(settings: Settings, tokens: Tokens) -> FastAPI:
    """A fresh application: its own connections, opened on first use and closed on shutdown.
    Tokens and body sizes are checked before a body is read (`guard.py`)."""
    backend = Backend(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await backend.close()

    app = FastAPI(
        title="cairn",
        summary="HTTP API and dashboard of cairn, the event-sourced coordinator for AI agents",
        description=DESCRIPTION,
        version="1",
        lifespan=lifespan,
    )
    app.state.backend = backend
    app.state.tokens = tokens
    app.state.settings = settings
    errors.install(app, pages.error_page)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        """For container health checks: the server answers (no token needed, nothing shown)."""
        return {"ok": True}

    app.include_router(api.router)
    app.include_router(live.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    app.add_middleware(RequestGuard, tokens=tokens, max_body=settings.http_max_body)
    return app
