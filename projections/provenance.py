"""Where a step's output came from, folded from its run's events: pure, no database.

`cairn why RUN STEP` loads the run's stream from the event store (the truth, and complete:
the views keep neither inputs nor outputs) and hands it to `step_provenance`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from cairn.events import (
    AttemptOutcome,
    ContractViolated,
    CostCharged,
    Event,
    Frozen,
    Intent,
    ResultIgnored,
    ResultReceived,
    RunStarted,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskTimedOut,
    content_hash,
    effect_of,
    step_status,
)
from cairn.projections.details import describe

# What `cairn why` says of a step: how its latest attempt went, unless the step was skipped
# since; "not dispatched" before its first attempt.
StepProgress = Literal["not dispatched", AttemptOutcome, "skipped"]


class StepNotFoundError(LookupError):
    """The run has no step of that name (neither declared nor ever dispatched)."""


class LineageRow(Frozen):
    """One earlier output the step was built from, as its dispatch named it."""

    step: str
    attempt: int
    agent_id: str
    output_hash: str
    # A TaskCompleted of that step and attempt with this very hash is in the run's log.
    confirmed: bool


class ChargeRow(Frozen):
    """One CostCharged of an attempt."""

    seq: int
    at: datetime
    model: str
    input_tokens: int
    output_tokens: int
    price_table: str
    amount_usd: Decimal


class ResultRow(Frozen):
    """One ResultReceived of an attempt; `ignored` says why it changed nothing, if it didn't."""

    seq: int
    at: datetime
    agent_id: str
    output_hash: str | None
    error: str | None
    models: list[str]
    ignored: str | None


class AttemptRow(Frozen):
    """One dispatch of the step and what became of it."""

    attempt: int
    task_id: str
    dispatched_at: datetime
    reason: str
    repair: list[str]
    outcome: AttemptOutcome
    outcome_at: datetime | None
    agent_id: str | None
    errors: list[str]
    results: list[ResultRow]
    charges: list[ChargeRow]
    cost_usd: Decimal


class StepEventRow(Frozen):
    """An event about the step: who decided what, when and why."""

    seq: int
    at: datetime
    # The attempt its task id names, else the step's latest dispatched before it (None before
    # the first dispatch).
    attempt: int | None
    actor: str
    action: str
    reason: str
    detail: str


class Producer(Frozen):
    """The agent and models whose result became the step's output."""

    attempt: int
    agent_id: str
    models: list[str]


class Provenance(Frozen):
    """Why a step's output is what it is: intent, input, lineage, every attempt, the output.

    `input`, `lineage` and `capability` are those of the step's latest dispatch. `output` is
    the output of the ResultReceived that led to the step's latest TaskCompleted, and
    `output_verified` says whether its content hash equals the hash TaskCompleted recorded.
    """

    run_id: uuid.UUID
    step: str
    status: StepProgress
    capability: str | None
    contract: str | None
    intent: Intent | None
    input: dict[str, Any] | None
    lineage: list[LineageRow]
    produced_by: Producer | None
    attempts: list[AttemptRow]
    approvals: list[StepEventRow]
    cost_usd: Decimal
    output: Any
    output_hash: str | None
    output_verified: bool | None
    timeline: list[StepEventRow]


def step_provenance(events: Sequence[Event], step: str) -> Provenance:
    """The provenance of `step` from all events of its run, in order.

    Raises StepNotFoundError if the run neither declares nor ever dispatched such a step.
    """
    if not events:
        raise ValueError("a provenance needs the run's events")
    run_id = events[0].run_id
    started = next((e for e in events if isinstance(e, RunStarted)), None)
    dispatches = [e for e in events if isinstance(e, TaskDispatched) and e.step == step]
    declared = (started is not None and any(s.name == step for s in started.workflow.steps)) or any(
        getattr(getattr(e, "spec", None), "name", None) == step for e in events
    )  # a step an agent proposed and the coordinator admitted (StepAdmitted.spec)
    if not dispatches and not declared:
        known = _step_names(events, started)
        raise StepNotFoundError(
            f"run {run_id} has no step {step!r}"
            + (f": its steps are {', '.join(known)}" if known else "")
        )
    attempt_of = {d.task_id: d.attempt for d in dispatches}
    timeline = _timeline(events, step, attempt_of)
    attempts = _attempts(events, dispatches, attempt_of)
    latest = dispatches[-1] if dispatches else None

    completed = [e for e in events if isinstance(e, TaskCompleted) and e.step == step]
    final = completed[-1] if completed else None
    accepted = _accepted_result(events, final) if final is not None else None
    output = accepted.output if accepted is not None else None
    verified = None
    if final is not None:
        verified = accepted is not None and content_hash(output) == final.output_hash
    producer = None
    if final is not None:
        producer = Producer(
            attempt=final.attempt,
            agent_id=final.agent_id,
            models=_models(accepted) if accepted is not None else [],
        )

    return Provenance(
        run_id=run_id,
        step=step,
        status=_progress(events, step, latest, attempts),
        capability=latest.capability if latest else _declared_capability(started, step),
        contract=latest.contract if latest else None,
        intent=started.intent if started else (latest.intent if latest else None),
        input=latest.input if latest else None,
        lineage=_lineage(events, latest),
        produced_by=producer,
        attempts=attempts,
        approvals=[row for row in timeline if row.action.startswith("Approval")],
        cost_usd=sum((a.cost_usd for a in attempts), Decimal(0)),
        output=output,
        output_hash=final.output_hash if final else None,
        output_verified=verified,
        timeline=timeline,
    )


def _belongs(event: Event, step: str, task_ids: dict[str, int]) -> bool:
    # Approval, budget and later event types are matched by their fields, not their classes:
    # whatever names this step (or one of its tasks) is part of its story.
    if getattr(event, "step", None) == step:
        return True
    task = getattr(event, "task_id", None)
    return isinstance(task, str) and task in task_ids


def _timeline(events: Sequence[Event], step: str, attempt_of: dict[str, int]) -> list[StepEventRow]:
    rows: list[StepEventRow] = []
    current: int | None = None
    for event in events:
        if isinstance(event, TaskDispatched) and event.step == step:
            current = event.attempt
        if not _belongs(event, step, attempt_of):
            continue
        task = getattr(event, "task_id", None)
        attempt = attempt_of.get(task, current) if isinstance(task, str) else current
        rows.append(
            StepEventRow(
                seq=event.seq,
                at=event.at,
                attempt=attempt,
                actor=event.actor,
                action=event.type_name(),
                reason=event.reason,
                detail=describe(event),
            )
        )
    return rows


def _attempts(
    events: Sequence[Event], dispatches: list[TaskDispatched], attempt_of: dict[str, int]
) -> list[AttemptRow]:
    rows: dict[str, dict[str, Any]] = {
        d.task_id: {
            "attempt": d.attempt,
            "task_id": d.task_id,
            "dispatched_at": d.at,
            "reason": d.reason,
            "repair": list(d.repair),
            "outcome": effect_of(d).attempt,
            "outcome_at": None,
            "agent_id": None,
            "errors": [],
            "results": [],
            "charges": [],
            "cost_usd": Decimal(0),
        }
        for d in dispatches
    }
    last_result: dict[str, dict[str, Any]] = {}
    for event in events:
        task = getattr(event, "task_id", None)
        if not isinstance(task, str) or task not in attempt_of:
            continue
        row = rows[task]
        match event:
            case ResultReceived():
                result = {
                    "seq": event.seq,
                    "at": event.at,
                    "agent_id": event.agent_id,
                    "output_hash": (
                        content_hash(event.output) if event.output is not None else None
                    ),
                    "error": event.error.message if event.error else None,
                    "models": _models(event),
                    "ignored": None,
                }
                row["results"].append(result)
                last_result[task] = result
            case ResultIgnored():
                # Decided together with the result it ignores: the latest one of that task.
                if task in last_result:
                    last_result[task]["ignored"] = event.reason or "ignored"
            case CostCharged():
                row["charges"].append(
                    ChargeRow(
                        seq=event.seq,
                        at=event.at,
                        model=event.model,
                        input_tokens=event.input_tokens,
                        output_tokens=event.output_tokens,
                        price_table=event.price_table,
                        amount_usd=event.amount_usd,
                    )
                )
                row["cost_usd"] += event.amount_usd
            case TaskCompleted():
                _outcome(row, event, event.agent_id, [])
            case TaskFailed():
                _outcome(row, event, event.agent_id, [event.error])
            case ContractViolated():
                errors = [f"{event.contract}: {error}" for error in event.errors]
                _outcome(row, event, event.agent_id, errors)
            case TaskTimedOut():
                error = f"no result within {event.timeout_s:g} s"
                _outcome(row, event, row["agent_id"], [error])
    return [AttemptRow.model_validate(row) for row in rows.values()]


def _outcome(row: dict[str, Any], event: Event, agent_id: str | None, errors: list[str]) -> None:
    """The attempt ended with `event`: its outcome is the one the event gives an attempt."""
    row["outcome"] = effect_of(event).attempt
    row["outcome_at"] = event.at
    row["agent_id"] = agent_id
    row["errors"] = row["errors"] + errors


def _accepted_result(events: Sequence[Event], final: TaskCompleted) -> ResultReceived | None:
    """The ResultReceived whose output TaskCompleted accepted: the task's latest one before
    it that was not ignored."""
    accepted: ResultReceived | None = None
    for event in events:
        if event.seq >= final.seq:
            break
        if isinstance(event, ResultReceived) and event.task_id == final.task_id:
            accepted = event
        elif isinstance(event, ResultIgnored) and event.task_id == final.task_id:
            accepted = None
    return accepted


def _lineage(events: Sequence[Event], dispatch: TaskDispatched | None) -> list[LineageRow]:
    if dispatch is None:
        return []
    recorded = {
        (e.step, e.attempt, e.output_hash)
        for e in events
        if isinstance(e, TaskCompleted) and e.seq < dispatch.seq
    }
    return [
        LineageRow(
            step=entry.step,
            attempt=entry.attempt,
            agent_id=entry.agent_id,
            output_hash=entry.output_hash,
            confirmed=(entry.step, entry.attempt, entry.output_hash) in recorded,
        )
        for entry in dispatch.lineage
    ]


def _progress(
    events: Sequence[Event],
    step: str,
    latest: TaskDispatched | None,
    attempts: list[AttemptRow],
) -> StepProgress:
    if latest is None:
        return "not dispatched"
    return "skipped" if step_status(events, step) == "skipped" else attempts[-1].outcome


def _models(result: ResultReceived) -> list[str]:
    return list(dict.fromkeys(u.model for u in result.usage))


def _declared_capability(started: RunStarted | None, step: str) -> str | None:
    if started is None:
        return None
    return next((s.capability for s in started.workflow.steps if s.name == step), None)


def _step_names(events: Sequence[Event], started: RunStarted | None) -> list[str]:
    names = [s.name for s in started.workflow.steps] if started else []
    names += [e.step for e in events if isinstance(e, TaskDispatched)]
    return list(dict.fromkeys(names))
