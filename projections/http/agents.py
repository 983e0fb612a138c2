"""The dashboard's and API's view of the agents: one row per capability consumer, from the
consumers `runtime/capabilities.py` reads (see `AgentRow` for what each number means)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from cairn.projections.http.models import AgentRow, AgentsReply, ProcessRestarts
from cairn.runtime.capabilities import CapabilityConsumer, capability_consumers
from cairn.runtime.client import CairnClient
from cairn.runtime.restarts import read_restarts
from cairn.runtime.settings import Settings


async def agents(client: CairnClient, settings: Settings) -> AgentsReply:
    """One row per capability consumer, by capability name; replicas are estimated assuming
    each runs the settings' `agent_concurrency` pull loops."""
    concurrency = max(1, settings.agent_concurrency)
    now = datetime.now(UTC)
    consumers = await capability_consumers(client.nc.jetstream())
    return agents_reply(consumers, concurrency, now, read_restarts(settings.home))


def agents_reply(
    consumers: list[CapabilityConsumer],
    concurrency: int,
    now: datetime,
    restarts: dict[str, dict[str, Any]],
) -> AgentsReply:
    """The rows, with the restarts `cairn up` recorded (an agent's processes are named
    `agent-<capability>`, replicas `agent-<capability>-<n>`)."""
    rows = []
    for consumer in consumers:
        row = _row(consumer, concurrency, now)
        prefix = f"agent-{consumer.capability}"
        row.restarts = sum(
            int(r.get("restarts", 0))
            for name, r in restarts.items()
            if name == prefix
            or (name.startswith(f"{prefix}-") and name[len(prefix) + 1 :].isdigit())
        )
        rows.append(row)
    listed = [
        ProcessRestarts(
            name=name,
            restarts=int(r.get("restarts", 0)),
            last_ended=str(r.get("last_ended", "")),
            last_at=str(r.get("last_at", "")),
        )
        for name, r in sorted(restarts.items())
    ]
    return AgentsReply(agents=rows, concurrency=concurrency, restarts=listed)


def _row(consumer: CapabilityConsumer, concurrency: int, now: datetime) -> AgentRow:
    return AgentRow(
        capability=consumer.capability,
        consumer=consumer.consumer,
        live=consumer.live(now),
        waiting_pulls=consumer.waiting_pulls,
        in_flight=consumer.in_flight,
        queued=consumer.queued,
        redelivered=consumer.redelivered,
        replicas_estimate=math.ceil((consumer.waiting_pulls + consumer.in_flight) / concurrency),
        last_delivered_at=consumer.last_delivered_at,
        last_acked_at=consumer.last_acked_at,
    )


def _replica_of(name: str, prefix: str) -> bool:
    """`agent-researcher-2` is a replica of `agent-researcher`."""
    head, _, number = name.rpartition("-")
    return head == prefix and number.isdigit()
