"""A small Python client for cairn's command subjects and live event feed."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from decimal import Decimal
from types import TracebackType
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cairn.events import (
    CMD_APPROVALS,
    CMD_APPROVE,
    CMD_BUDGET,
    CMD_CANCEL,
    CMD_DENY,
    CMD_FORK,
    CMD_PING,
    CMD_START,
    ApprovalDecision,
    Budget,
    CancelRun,
    CommandReply,
    EventNotice,
    ForkRun,
    Intent,
    RaiseBudget,
    StartRun,
    UnknownEventError,
    WorkflowSpec,
    event_class,
    event_subject,
)
from cairn.runtime.connection import connect
from cairn.runtime.deadletters import DeadLetterReport, read_dead_letters
from cairn.runtime.roles import NatsEndpoint

log = logging.getLogger("cairn.client")

TERMINAL_TYPES = frozenset({"RunCompleted", "RunFailed", "RunCancelled"})
_PROPAGATOR = TraceContextTextMapPropagator()


class CoordinatorUnavailableError(RuntimeError):
    """NATS answered but no coordinator did."""


class CairnClient:
    """Send commands to the coordinator and follow runs' committed events."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc

    @classmethod
    async def connect(
        cls, target: NatsEndpoint | str | None, name: str = "cairn-client"
    ) -> CairnClient:
        """Connect to an endpoint (`Settings.nats_endpoint()`: URL and credentials) or a URL."""
        return cls(await connect(target, name))

    async def close(self) -> None:
        await self.nc.close()

    async def __aenter__(self) -> CairnClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _request(self, subject: str, payload: bytes, timeout: float) -> dict[str, Any]:
        # A caller that is being traced passes its span on (W3C `traceparent`): a run it
        # starts joins its trace. Without a current span nothing is added.
        headers: dict[str, str] = {}
        _PROPAGATOR.inject(headers)
        try:
            reply = await self.nc.request(
                subject, payload, timeout=timeout, headers=headers or None
            )
        except (NoRespondersError, NatsTimeoutError):
            raise CoordinatorUnavailableError(
                "no coordinator answered on NATS: start one with `cairn up` or `cairn coordinator`"
            ) from None
        data: dict[str, Any] = json.loads(reply.data)
        return data

    async def ping(self, timeout: float = 2.0) -> dict[str, Any]:
        return await self._request(CMD_PING, b"{}", timeout)

    async def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Ping until a coordinator answers."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                return await self.ping(timeout=1.0)
            except CoordinatorUnavailableError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def start_run(
        self,
        workflow: str | WorkflowSpec,
        input: dict[str, Any],
        *,
        intent: Intent | None = None,
        run_id: uuid.UUID | None = None,
        requested_by: str = "client:cli",
        timeout: float = 10.0,
        budget: Budget | None = None,
        tenant: str = "default",
    ) -> CommandReply:
        command = StartRun(
            run_id=run_id or uuid.uuid4(),
            workflow=workflow,
            input=input,
            intent=intent,
            requested_by=requested_by,
            budget=budget,
            tenant=tenant,
        )
        data = await self._request(CMD_START, command.model_dump_json().encode(), timeout)
        return CommandReply.model_validate(data)

    async def cancel_run(
        self, run_id: uuid.UUID, reason: str = "", requested_by: str = "client:cli"
    ) -> CommandReply:
        command = CancelRun(run_id=run_id, reason=reason, requested_by=requested_by)
        data = await self._request(CMD_CANCEL, command.model_dump_json().encode(), 10.0)
        return CommandReply.model_validate(data)

    async def fork_run(
        self,
        parent: uuid.UUID,
        at_seq: int,
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        models: dict[str, str] | None = None,
        run_id: uuid.UUID | None = None,
        requested_by: str = "client:cli",
    ) -> CommandReply:
        command = ForkRun(
            parent_run_id=parent, at_seq=at_seq, overrides=overrides or {}, models=models or {},
            run_id=run_id or uuid.uuid4(), requested_by=requested_by,
        )  # fmt: skip
        data = await self._request(CMD_FORK, command.model_dump_json().encode(), 10.0)
        return CommandReply.model_validate(data)

    async def approve(
        self, run_id: uuid.UUID, step: str, by: str, reason: str = "", *, deny: bool = False
    ) -> CommandReply:
        command = ApprovalDecision(run_id=run_id, step=step, by=by, reason=reason)
        subject = CMD_DENY if deny else CMD_APPROVE
        data = await self._request(subject, command.model_dump_json().encode(), 10.0)
        return CommandReply.model_validate(data)

    async def raise_budget(
        self,
        run_id: uuid.UUID,
        by: str,
        usd: Decimal | None = None,
        tokens: int | None = None,
        reason: str = "",
    ) -> CommandReply:
        command = RaiseBudget(run_id=run_id, usd=usd, tokens=tokens, by=by, reason=reason)
        data = await self._request(CMD_BUDGET, command.model_dump_json().encode(), 10.0)
        return CommandReply.model_validate(data)

    async def approvals(self) -> list[dict[str, Any]]:
        """Pending approval requests, oldest deadline first."""
        data = await self._request(CMD_APPROVALS, b"{}", 10.0)
        reply = CommandReply.model_validate(data)
        return list(reply.data or [])

    async def dead_letters(
        self, *, run: str | None = None, source: str | None = None, limit: int = 20
    ) -> DeadLetterReport:
        """What `CAIRN_DLQ` holds: counts by source and reason, the newest letters first (see
        `read_dead_letters`). Needs the admin or observer role (or none, without auth)."""
        return await read_dead_letters(self.nc.jetstream(), run=run, source=source, limit=limit)

    async def follow(self, run_id: uuid.UUID | None = None) -> EventFeed:
        """Subscribe now to committed events (of one run, or all); iterate the feed later."""
        subject = event_subject(run_id, "*") if run_id else "cairn.event.>"
        return EventFeed(await self.nc.subscribe(subject))


class EventFeed:
    """Live notices of committed events from a subscription made before the command was sent.

    Notices are untrusted input: anyone allowed a JetStream API request can have the server
    publish its answer on any subject, `cairn.event.>` included. What is not a committed event
    of the run and type its subject names is skipped (counted in `skipped`, logged), never
    handed on."""

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub
        self.skipped: list[str] = []

    def __aiter__(self) -> EventFeed:
        return self

    async def __anext__(self) -> EventNotice:
        while True:
            notice = self._parse(await self._sub.next_msg(timeout=None))
            if notice is not None:
                return notice

    async def next(self, timeout: float) -> EventNotice:
        """The next notice within `timeout` seconds (nats' TimeoutError otherwise); what is
        skipped does not restart the clock."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise NatsTimeoutError
            notice = self._parse(await self._sub.next_msg(timeout=left))
            if notice is not None:
                return notice

    def _parse(self, msg: Msg) -> EventNotice | None:
        try:
            notice = EventNotice.model_validate_json(msg.data)
            event = event_class(notice.type).model_validate(notice.event)
            if msg.subject != event_subject(event.run_id, notice.type):
                raise ValueError(f"it names run {event.run_id} and type {notice.type}")
        except (ValueError, UnknownEventError) as exc:
            reason = f"a message on {msg.subject} is not a committed event: {_first_line(exc)}"
            self.skipped.append(reason)
            log.warning("skipped %s", reason)
            return None
        return notice

    async def close(self) -> None:
        await self._sub.unsubscribe()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
