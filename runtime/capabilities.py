"""Which capabilities live agents serve, read from their shared JetStream consumers.

Agents register nowhere: each capability's replicas pull from one durable consumer
`cairn-agent-<capability>` on CAIRN_TASKS. A capability is served when that consumer exists
and a replica is asking for work (open pull requests), working (tasks delivered, not acked) or
was handed a task recently. Used by the coordinator (the warning a start answers with), the HTTP
API (`/api/agents`) and anyone else holding a NATS connection allowed consumer info.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cairn.events import TASKS_STREAM, agent_consumer

log = logging.getLogger("cairn.capabilities")

CONSUMER_PREFIX = agent_consumer("")
# A delivery this recent counts a capability as served even between two pull requests.
RECENT_S = 60.0


@dataclass(frozen=True)
class CapabilityConsumer:
    """One capability's consumer as JetStream reports it (see the HTTP API's `AgentRow`)."""

    capability: str
    consumer: str
    waiting_pulls: int
    in_flight: int
    queued: int
    redelivered: int
    last_delivered_at: datetime | None
    last_acked_at: datetime | None

    def live(self, now: datetime, recent_s: float = RECENT_S) -> bool:
        """Some replica is pulling or working, or was handed a task within `recent_s`."""
        if self.waiting_pulls > 0 or self.in_flight > 0:
            return True
        last = self.last_delivered_at
        return last is not None and now - last <= timedelta(seconds=recent_s)


async def capability_consumers(js: JetStreamContext) -> list[CapabilityConsumer]:
    """Every capability's consumer, by capability name; none before the streams exist."""
    try:
        infos: list[Any] = await js.consumers_info(TASKS_STREAM)
    except NotFoundError:  # no coordinator or agent has declared the streams yet
        return []
    found = [_consumer(info) for info in infos if info.name.startswith(CONSUMER_PREFIX)]
    return sorted(found, key=lambda c: c.capability)


def _consumer(info: Any) -> CapabilityConsumer:
    return CapabilityConsumer(
        capability=info.name.removeprefix(CONSUMER_PREFIX),
        consumer=info.name,
        waiting_pulls=int(info.num_waiting or 0),
        in_flight=int(info.num_ack_pending or 0),
        queued=int(info.num_pending or 0),
        redelivered=int(info.num_redelivered or 0),
        last_delivered_at=_active(info.delivered),
        last_acked_at=_active(info.ack_floor),
    )


def _active(seq: Any) -> datetime | None:
    return getattr(seq, "last_active", None) if seq is not None else None


def unserved(
    wanted: Iterable[str], consumers: Iterable[CapabilityConsumer], now: datetime
) -> list[str]:
    """The capabilities in `wanted` no live agent serves, in the order first wanted."""
    live = {c.capability for c in consumers if c.live(now)}
    return [c for c in dict.fromkeys(wanted) if c not in live]


def unserved_warning(steps: Mapping[str, list[str]]) -> str:
    """One sentence for capabilities nobody serves (`{capability: [steps]}`): what waits, and
    how to serve it."""
    parts = [
        f"{capability!r} (step{'s' if len(names) > 1 else ''} {', '.join(names)})"
        for capability, names in steps.items()
    ]
    return (
        f"no live agent serves {'; '.join(parts)}: the run waits for one until the step times "
        "out; check the capability's spelling, or start an agent that serves it"
    )


class Liveness:
    """What `capability_consumers` said, kept for `max_age_s` so that many starts in a second
    cost one request; concurrent callers share it. When NATS does not answer within
    `timeout_s`, it says nothing (None) until the next look."""

    def __init__(
        self, js: JetStreamContext, *, max_age_s: float = 1.0, timeout_s: float = 0.5
    ) -> None:
        self._js = js
        self._max_age_s = max_age_s
        self._timeout_s = timeout_s
        self._seen: list[CapabilityConsumer] | None = None
        self._seen_at = -max_age_s
        self._lock = asyncio.Lock()

    async def unserved(self, wanted: Iterable[str]) -> list[str] | None:
        """The capabilities in `wanted` no live agent serves; None when NATS cannot say."""
        consumers = await self.consumers()
        return None if consumers is None else unserved(wanted, consumers, datetime.now(UTC))

    async def consumers(self) -> list[CapabilityConsumer] | None:
        async with self._lock:
            if time.monotonic() - self._seen_at > self._max_age_s:
                self._seen = None
                try:
                    self._seen = await asyncio.wait_for(
                        capability_consumers(self._js), self._timeout_s
                    )
                except Exception as exc:  # NATS away: better nothing than a wrong warning
                    log.debug("could not read the agents' consumers: %s", exc)
                self._seen_at = time.monotonic()
            return self._seen
