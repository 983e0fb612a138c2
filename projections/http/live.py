"""Server-sent events: the live feed of committed events (`cairn.event.<run>.<Type>`) over HTTP."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError

from cairn.projections.http.api import Viewer, backend_of
from cairn.projections.http.errors import NATS_ERRORS, ApiError
from cairn.runtime.client import EventFeed

router = APIRouter(tags=["live"])

# A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0


@router.get(
    "/api/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "one `data:` line of JSON (an EventNotice: position, event_id, "
            "type, event) per committed event, `id:` the event's log position",
        },
        **NATS_ERRORS,
    },
)
async def events(
    request: Request,
    grant: Viewer,
    run: Annotated[str | None, Query(description="only this run (id or prefix); else all")] = None,
) -> StreamingResponse:
    """Committed events as they happen, as server-sent events.

    Events committed before the stream opened are not replayed: read the run (`GET
    /api/runs/{run}`) once the stream is open, then apply what arrives.
    """
    backend = backend_of(request)
    run_id = await backend.run_id(run) if run else None
    client = await backend.client()
    try:
        feed = await client.follow(run_id)
    except NatsError as exc:
        raise ApiError(503, f"cannot subscribe to the event feed on NATS: {exc}") from None
    return StreamingResponse(
        _stream(feed),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(feed: EventFeed) -> AsyncIterator[str]:
    try:
        # Sent at once so the browser's EventSource opens (and re-reads the run) right away.
        yield "retry: 2000\n: subscribed\n\n"
        while True:
            try:
                notice = await feed.next(timeout=KEEPALIVE_S)
            except NatsTimeoutError:
                yield ": keep-alive\n\n"
                continue
            except NatsError:
                return  # the connection is gone; the browser reconnects after `retry`
            yield f"id: {notice.position}\ndata: {notice.model_dump_json()}\n\n"
    finally:
        # The client went away (this generator is cancelled) or NATS did: unsubscribe anyway.
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(NatsError):
                await feed.close()
