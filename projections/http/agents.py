"""Which agent capabilities are live, read from their shared JetStream consumers.

Agents register nowhere: each capability's replicas pull from one durable consumer
`cairn-agent-<capability>` on the CAIRN_TASKS stream. The consumer's counters say what is
going on (see `AgentRow` for what each number means).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from nats.js.errors import NotFoundError

from cairn.events import TASKS_STREAM
from cairn.projections.http.models import AgentRow, AgentsReply
from cairn.runtime.client import CairnClient
from cairn.runtime.settings import Settings

CONSUMER_PREFIX = "cairn-agent-"


async def agents(client: CairnClient, settings: Settings) -> AgentsReply:
    """One row per capability consumer, by capability name; replicas are estimated assuming
    each runs the settings' `agent_concurrency` pull loops."""
    concurrency = max(1, settings.agent_concurrency)
    js = client.nc.jetstream()
    try:
        infos: list[Any] = await js.consumers_info(TASKS_STREAM)
    except NotFoundError:  # no coordinator or agent has declared the streams yet
        infos = []
    rows = [_row(info, concurrency) for info in infos if info.name.startswith(CONSUMER_PREFIX)]
    rows.sort(key=lambda r: r.capability)
    return AgentsReply(agents=rows, concurrency=concurrency)


def _row(info: Any, concurrency: int) -> AgentRow:
    waiting = int(info.num_waiting or 0)
    in_flight = int(info.num_ack_pending or 0)
    return AgentRow(
        capability=info.name.removeprefix(CONSUMER_PREFIX),
        consumer=info.name,
        live=waiting > 0 or in_flight > 0,
        waiting_pulls=waiting,
        in_flight=in_flight,
        queued=int(info.num_pending or 0),
        redelivered=int(info.num_redelivered or 0),
        replicas_estimate=math.ceil((waiting + in_flight) / concurrency),
        last_delivered_at=_active(info.delivered),
        last_acked_at=_active(info.ack_floor),
    )


def _active(seq: Any) -> datetime | None:
    return getattr(seq, "last_active", None) if seq is not None else None
