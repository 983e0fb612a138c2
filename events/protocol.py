"""Subjects, streams and consumers: the NATS half of the wire contract."""

from __future__ import annotations

import uuid
from typing import Any

SUBJECT_PREFIX = "cairn"

TASKS_STREAM = "CAIRN_TASKS"
RESULTS_STREAM = "CAIRN_RESULTS"
DLQ_STREAM = "CAIRN_DLQ"

COORDINATOR_CONSUMER = "cairn-coordinator"

CMD_START = "cairn.cmd.start"
CMD_CANCEL = "cairn.cmd.cancel"
CMD_PING = "cairn.cmd.ping"
CMD_APPROVE = "cairn.cmd.approve"
CMD_DENY = "cairn.cmd.deny"
CMD_BUDGET = "cairn.cmd.budget"
CMD_APPROVALS = "cairn.cmd.approvals"
CMD_FORK = "cairn.cmd.fork"

# Largest message cairn accepts on any subject; larger payloads go to the DLQ. nats-server's own
# default `max_payload` is also 1 MiB, so bigger messages are refused before they arrive.
MAX_PAYLOAD_BYTES = 1024 * 1024
# Window in which JetStream drops a repeated Nats-Msg-Id: the outbox relay's replay after a
# crash must fall inside it.
DUPLICATE_WINDOW_S = 600.0


def task_subject(capability: str) -> str:
    return f"cairn.task.{capability}"


def result_subject(capability: str, run_id: uuid.UUID) -> str:
    """Where an agent of `capability` publishes its results for a run: only that capability's
    NATS user may publish there, so the subject says who answers."""
    return f"cairn.result.{capability}.{run_id}"


def result_capability(subject: str) -> str | None:
    """The capability a result subject names (`cairn.result.<capability>.<run_id>`), or None
    for a subject of another shape."""
    parts = _result_parts(subject)
    return parts[2] if parts else None


def result_run(subject: str) -> uuid.UUID | None:
    """The run a result subject names, or None for a subject of another shape or run id."""
    parts = _result_parts(subject)
    if parts is None:
        return None
    try:
        return uuid.UUID(parts[3])
    except ValueError:
        return None


def _result_parts(subject: str) -> list[str] | None:
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["cairn", "result"] or not parts[2]:
        return None
    return parts


def event_subject(run_id: uuid.UUID, event_type: str) -> str:
    return f"cairn.event.{run_id}.{event_type}"


def dlq_subject(source: str) -> str:
    return f"cairn.dlq.{source}"


def agent_consumer(capability: str) -> str:
    """The durable consumer all replicas of one capability share."""
    return f"cairn-agent-{capability}"


# Dead letters kept per source (`cairn.dlq.<source>`), besides the seven days.
DEAD_LETTERS_PER_SOURCE = 10_000


def stream_configs() -> list[dict[str, Any]]:
    """Stream settings, identical wherever they are declared (coordinator and agents)."""
    return [
        {
            "name": TASKS_STREAM,
            "subjects": ["cairn.task.>"],
            "retention": "workqueue",
            "duplicate_window": DUPLICATE_WINDOW_S,
        },
        {
            "name": RESULTS_STREAM,
            "subjects": ["cairn.result.>"],
            "retention": "workqueue",
            "duplicate_window": DUPLICATE_WINDOW_S,
        },
        {
            "name": DLQ_STREAM,
            "subjects": ["cairn.dlq.>"],
            "retention": "limits",
            "max_age": 7 * 24 * 3600.0,
            # Each source (a subject) keeps its newest letters only: a flood from one agent
            # evicts its own letters, never the coordinator's or another agent's.
            "max_msgs_per_subject": DEAD_LETTERS_PER_SOURCE,
            "duplicate_window": 120.0,
        },
    ]
