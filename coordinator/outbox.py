"""The outbox relay: publishes what committed events call for, from the store's log.

Task messages go to JetStream with `Nats-Msg-Id` = the event's id, so publishing the same event
again (after a crash between commit and publish) is dropped by the stream as a duplicate.
Every committed event is also announced on the live feed `cairn.event.<run_id>.<type>`.
How far publishing got is tracked in the store; the position is saved at most once a second,
well inside the stream's duplicate window, so a restart republishes at most that second.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from cairn.coordinator import spans
from cairn.coordinator.domain.state import RunState
from cairn.events import (
    TaskDispatched,
    event_subject,
    task_subject,
)
from cairn.events.mappings import envelope_bytes, envelope_of, notice_bytes
from cairn.runtime import tracing
from cairn.runtime.eventlog.store import EventStore, LoggedEvent

log = logging.getLogger("cairn.outbox")

OUTBOX_POSITION = "cairn-outbox"
PUBLISH_TIMEOUT_S = 10.0


class Outbox:
    """Publish committed events' messages; remember how far it got."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        store: EventStore,
        *,
        save_interval_s: float = 1.0,
    ) -> None:
        self._nc = nc
        self._js = js
        self._store = store
        self._save_interval = save_interval_s
        self.position = store.position(OUTBOX_POSITION)
        self._saved_position = self.position
        self._saved_at = time.monotonic()
        # Each task goes out with a secret its result must carry back, derived from the key.
        self._keys = store.chain_key(create=True)

    async def publish(
        self, logged: Sequence[LoggedEvent], runs: Mapping[uuid.UUID, RunState] | None = None
    ) -> None:
        """Publish tasks (acks awaited together) and live notices for these committed events.

        Retries until NATS takes them: the events are committed, so their messages must go out,
        and a repeat is harmless (the stream drops a repeated Nats-Msg-Id). `runs`: the states
        of the runs they belong to, whose traces get a `publish` span (and a task sent by other
        than the decision that dispatched it joins its run's trace at the root).
        """
        if not logged:
            return
        delay = 0.1
        while True:
            try:
                with spans.run_spans("publish", runs, logged, "producer"):
                    await self._publish_once(logged, runs or {})
                break
            except Exception as exc:
                log.warning("publishing %d event(s) failed, retrying: %s", len(logged), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.position = max(self.position, logged[-1].position)
        if time.monotonic() - self._saved_at >= self._save_interval:
            self.save()

    async def _publish_once(
        self, logged: Sequence[LoggedEvent], runs: Mapping[uuid.UUID, RunState]
    ) -> None:
        acks = []
        for item in logged:
            event = item.event
            if isinstance(event, TaskDispatched):
                acks.append(await self._send_task(event, runs.get(event.run_id)))
            subject = event_subject(event.run_id, event.type_name())
            await self._nc.publish(subject, notice_bytes(item.position, item.event))
        if acks:
            await asyncio.wait_for(asyncio.gather(*acks), PUBLISH_TIMEOUT_S)

    async def _send_task(self, event: TaskDispatched, run: RunState | None) -> asyncio.Future[Any]:
        """Publish a task's envelope; the future resolves with JetStream's ack. The message id
        is the event's, so the stream drops a repeat within its duplicate window."""
        headers = {"Nats-Msg-Id": str(event.event_id)}
        if tracing.ENABLED and event.trace_id is not None:
            spans.task_headers(event, headers, run)
        return await self._js.publish_async(
            task_subject(event.capability),
            envelope_bytes(envelope_of(event, self._keys.task_key(event.task_id))),
            headers=headers,
        )

    async def republish_tasks(
        self, events: Sequence[TaskDispatched], runs: Mapping[uuid.UUID, RunState]
    ) -> None:
        """Send tasks again that another coordinator committed (it may have died before
        sending them): the stream drops each one it already has, so none runs twice."""
        if not events:
            return
        acks = [await self._send_task(event, runs.get(event.run_id)) for event in events]
        await asyncio.wait_for(asyncio.gather(*acks), PUBLISH_TIMEOUT_S)

    def save(self) -> None:
        if self.position > self._saved_position:
            self._store.save_position(OUTBOX_POSITION, self.position)
            self._saved_position = self.position
        self._saved_at = time.monotonic()

    async def catch_up(
        self,
        still_current: Callable[[TaskDispatched], bool],
        runs: Mapping[uuid.UUID, RunState],
    ) -> int:
        """Republish what was committed after the saved position (a crash before publishing).

        Tasks that are no longer current (their step moved on) are not sent again: an agent
        would only do paid work whose result is ignored. `runs`: the active runs' states.
        """
        count = 0
        while True:
            batch = self._store.read_log(self.position, limit=1000)
            if not batch:
                break
            todo = [
                item
                for item in batch
                if not isinstance(item.event, TaskDispatched) or still_current(item.event)
            ]
            touched = {i.event.run_id for i in todo}
            await self.publish(todo, {r: runs[r] for r in touched if r in runs})
            self.position = batch[-1].position
            count += len(todo)
        self.save()
        return count
