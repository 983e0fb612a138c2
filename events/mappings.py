"""Every translation between what crosses NATS and what is stored, in one place: the task
envelope sent for a dispatch, the received fact recorded for an agent's result (and the result
rebuilt from it, for replay), and the live-feed notice of a committed event.

The wire may change shape without rewriting history: only this module knows both sides.
"""

from __future__ import annotations

from typing import Any

from cairn.events.base import Event
from cairn.events.codec import event_json
from cairn.events.run import ReportedError, ResultReceived, TaskDispatched
from cairn.events.wire import EventNotice, TaskEnvelope, TaskError, TaskResult


def envelope_of(event: TaskDispatched, task_key: str = "") -> TaskEnvelope:
    """The task envelope a stored dispatch is sent as, with the task's secret (`task_key`,
    never stored: the coordinator derives it again when the result comes back)."""
    return TaskEnvelope(
        task_id=event.task_id,
        run_id=event.run_id,
        step=event.step,
        attempt=event.attempt,
        capability=event.capability,
        input=event.input,
        intent=event.intent,
        lineage=event.lineage,
        contract=event.contract,
        repair=event.repair,
        timeout_s=event.timeout_s,
        model=event.model,
        task_key=task_key,
    )


def envelope_bytes(envelope: TaskEnvelope) -> bytes:
    """The envelope as published: `model` only when the step names one, so agents that know
    nothing of it keep taking the tasks that do not need it."""
    return envelope.model_dump_json(exclude=None if envelope.model else {"model"}).encode()


def received_fields(result: TaskResult) -> dict[str, Any]:
    """The fields a `ResultReceived` records of an agent's result (all but who and why)."""
    return {
        "task_id": result.task_id,
        "step": result.step,
        "attempt": result.attempt,
        "agent_id": result.agent_id,
        "output": result.output,
        "error": (
            ReportedError(message=result.error.message, retryable=result.error.retryable)
            if result.error
            else None
        ),
        "usage": result.usage,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "review": result.review,
        "proposals": result.proposals,
    }


def result_of(event: ResultReceived) -> TaskResult:
    """The agent's result a `ResultReceived` recorded, as it came off the wire. Built without
    validating again: every field comes from a validated event."""
    error = event.error
    return TaskResult.model_construct(
        task_id=event.task_id,
        run_id=event.run_id,
        step=event.step,
        attempt=event.attempt,
        agent_id=event.agent_id,
        output=event.output,
        error=(
            TaskError.model_construct(message=error.message, retryable=error.retryable)
            if error
            else None
        ),
        usage=list(event.usage),
        started_at=event.started_at,
        finished_at=event.finished_at,
        review=event.review,
        proposals=list(event.proposals),
    )


def notice_of(position: int, event: Event) -> EventNotice:
    """The live-feed notice of a committed event at its log position."""
    return EventNotice(
        position=position,
        event_id=event.event_id,
        type=event.type_name(),
        event=event.model_dump(mode="json"),
    )


def notice_bytes(position: int, event: Event) -> bytes:
    """`notice_of(position, event)` as JSON, written directly around the event's canonical
    JSON, which storing it has already produced (an event is encoded once for all its uses)."""
    return b'{"position":%d,"event_id":"%s","type":"%s","event":%s}' % (
        position,
        str(event.event_id).encode(),
        event.type_name().encode(),
        event_json(event),
    )
