"""The dashboard's and API's view of the agents: one row per capability consumer, from the
consumers `runtime/capabilities.py` reads (see `AgentRow` for what each number means)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from cairn.projections.http.models import AgentRow, AgentsReply
from cairn.runtime.capabilities import CapabilityConsumer, capability_consumers
from cairn.runtime.client import CairnClient
from cairn.runtime.settings import Settings


async def agents(client: CairnClient, settings: Settings) -> AgentsReply:
    """One row per capability consumer, by capability name; replicas are estimated assuming
    each runs the settings' `agent_concurrency` pull loops."""
    concurrency = max(1, settings.agent_concurrency)
    now = datetime.now(UTC)
    consumers = await capability_consumers(client.nc.jetstream())
    rows = [_row(c, concurrency, now) for c in consumers]
    return AgentsReply(agents=rows, concurrency=concurrency)


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
