"""Folding logged events into view rows: pure, no database and no clock.

The persistence module loads the current rows of the runs a batch touches, calls `fold`, and
writes what it returns together with the tracking position in one transaction. Everything here
depends only on the events and the rows handed in, which is what makes a rebuild from the log
come out identical to the live views.

Statuses come from the shared table (`cairn.events.lifecycle`): a run's row holds its status
as is; a step's row shows the status `step_row_status` maps it to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from decimal import Context, Decimal
from operator import attrgetter
from typing import TYPE_CHECKING, Final, Literal, NamedTuple

from cairn.events import (
    EFFECTS,
    RUN_ENDED,
    AttemptOutcome,
    ContractViolated,
    CostCharged,
    Effect,
    Event,
    RetryScheduled,
    RunCompleted,
    RunFailed,
    RunStarted,
    RunStatus,
    StepSkipped,
    StepStatus,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskTimedOut,
    canonical_json,
)
from cairn.projections.details import describe
from cairn.projections.filters import time_text

if TYPE_CHECKING:
    from cairn.runtime.eventlog.store import LoggedEvent

StepRowStatus = Literal[
    "dispatched", "completed", "failed", "violated", "timed_out", "retrying", "skipped"
]

# What a step's row shows: how the step's latest attempt went, unless the step has since
# moved on to wait for a retry or was skipped. The other statuses a step passes through (held
# for an approval or the budget, failed with its run, carried over by a fork) leave its row as
# it was, so "timed_out" stays while a person decides whether to try again.
ROW_STATUS_OF_ATTEMPT: Final[Mapping[AttemptOutcome, StepRowStatus]] = {
    "pending": "dispatched",
    "completed": "completed",
    "failed": "failed",
    "violated": "violated",
    "timed_out": "timed_out",
}
ROW_STATUS_OF_STEP: Final[Mapping[StepStatus, StepRowStatus]] = {
    "retry_wait": "retrying",
    "skipped": "skipped",
}


def step_row_status(effect: Effect) -> StepRowStatus | None:
    """What a step's row shows after an event with `effect`; None leaves the row as it was."""
    shown = ROW_STATUS_OF_STEP.get(effect.step) if effect.step is not None else None
    if shown is None and effect.attempt is not None:
        shown = ROW_STATUS_OF_ATTEMPT[effect.attempt]
    return shown


# Looked up once per event: what each event type makes of its step's row and of its run's.
_ROW_STATUS: Final = {
    kind: shown for kind, effect in EFFECTS.items() if (shown := step_row_status(effect))
}
_RUN_STATUS: Final = {kind: effect.run for kind, effect in EFFECTS.items() if effect.run}

ZERO = Decimal(0)
# Sums of charges stay exact: the default context keeps 28 digits and would round a large
# amount; 200 hold any amount cairn can charge, to the fraction of a cent.
EXACT = Context(prec=200)


@dataclass(slots=True)
class StoredRun:
    """The `runs` row of one run while it is being folded (timestamps as ISO text)."""

    run_id: str
    workflow: str
    workflow_version: int
    goal: str
    status: RunStatus
    current_step: str | None
    started_at: str
    updated_at: str
    finished_at: str | None
    steps_total: int
    steps_done: int
    attempts: int
    cost_usd: Decimal
    error: str | None
    output: str | None  # RunCompleted.output as canonical JSON
    last_seq: int
    last_position: int
    tenant: str


@dataclass(slots=True)
class StoredStep:
    """The `steps` row of one step of one run while it is being folded."""

    run_id: str
    step: str
    capability: str
    status: StepRowStatus
    attempt: int
    agent_id: str | None
    dispatched_at: str | None
    finished_at: str | None
    cost_usd: Decimal
    input_tokens: int
    output_tokens: int


class CostEntry(NamedTuple):
    """One `costs` row: a CostCharged event."""

    position: int
    run_id: str
    seq: int
    at: str
    task_id: str
    step: str
    capability: str
    agent_id: str
    model: str
    input_tokens: int
    output_tokens: int
    price_table: str
    tenant: str
    day: str  # the charge's date (UTC), for costs per tenant per day
    amount_usd: Decimal


class AuditEntry(NamedTuple):
    """One `audit` row: every event, as a decision or recorded fact."""

    position: int
    run_id: str
    seq: int
    at: str
    actor: str
    action: str
    step: str | None
    reason: str
    detail: str
    trace_id: str | None  # the run's trace, when it was traced


StepKey = tuple[str, str]

# Copying a row by its field values is several times faster than copy.copy on slotted classes.
_RUN_VALUES = attrgetter(*(f.name for f in fields(StoredRun)))
_STEP_VALUES = attrgetter(*(f.name for f in fields(StoredStep)))


@dataclass
class ViewChanges:
    """What one batch changes: whole rows to upsert, and rows to append."""

    runs: dict[str, StoredRun] = field(default_factory=dict)
    steps: dict[StepKey, StoredStep] = field(default_factory=dict)
    costs: list[CostEntry] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)


def touched_runs(batch: Sequence[LoggedEvent]) -> list[str]:
    """The run ids whose rows `fold` needs for this batch (sorted, for stable queries)."""
    return sorted({str(logged.event.run_id) for logged in batch})


def fold(
    batch: Sequence[LoggedEvent],
    runs: Mapping[str, StoredRun],
    steps: Mapping[StepKey, StoredStep],
) -> ViewChanges:
    """Fold a batch of logged events into row changes.

    `runs` and `steps` hold the current rows of the runs in the batch (see `touched_runs`); a
    run or step missing from them is new. They are not modified: a row is copied the first
    time the batch touches it.
    """
    folder = _Folder(runs, steps)
    for logged in batch:
        folder.apply(logged.position, logged.event)
    return folder.changes


class _Folder:
    def __init__(self, runs: Mapping[str, StoredRun], steps: Mapping[StepKey, StoredStep]) -> None:
        self._runs = runs
        self._steps = steps
        self.changes = ViewChanges()

    def apply(self, position: int, event: Event) -> None:
        run_id = str(event.run_id)
        at = time_text(event.at)
        run = self._run(run_id, at)
        kind = type(event)
        step: str | None = None
        row: StoredStep | None = None  # the step's row, when the event changes more than its status
        match event:
            case TaskDispatched():
                step = event.step
                row = self._step(run_id, step, event.capability)
                row.capability = event.capability
                row.attempt = event.attempt
                row.agent_id = None
                row.dispatched_at = at
                row.finished_at = None
                run.current_step = step
                run.attempts += 1
            case CostCharged():
                step = event.step
                amount = event.amount_usd
                run.cost_usd = EXACT.add(run.cost_usd, amount)
                row = self._step(run_id, step, event.capability)
                row.cost_usd = EXACT.add(row.cost_usd, amount)
                row.input_tokens += event.input_tokens
                row.output_tokens += event.output_tokens
                self.changes.costs.append(
                    CostEntry(
                        position,
                        run_id,
                        event.seq,
                        at,
                        event.task_id,
                        step,
                        event.capability,
                        event.agent_id,
                        event.model,
                        event.input_tokens,
                        event.output_tokens,
                        event.price_table,
                        run.tenant,
                        at[:10],
                        amount,
                    )
                )
            case TaskCompleted() | TaskFailed() | ContractViolated():
                step = event.step
                row = self._step(run_id, step)
                self._finish(row, event.agent_id, event.attempt, at)
            case TaskTimedOut():
                step = event.step
                row = self._step(run_id, step)
                self._finish(row, row.agent_id or "", event.attempt, at)
            case RetryScheduled() | StepSkipped():
                step = event.step
            case RunStarted():
                workflow = event.workflow
                run.workflow = workflow.name
                run.workflow_version = workflow.version
                run.tenant = event.tenant
                run.goal = event.intent.goal
                run.started_at = at
                run.steps_total = len(workflow.steps)
            case RunCompleted():
                run.output = canonical_json(event.output).decode()
            case RunFailed():
                step = event.step
                run.error = event.error
                if step is not None:
                    run.current_step = step
            case _:
                # Events without a view of their own (ResultIgnored, types added later) still
                # move the run's position and get an audit row.
                named = getattr(event, "step", None)
                step = named if isinstance(named, str) else None
        shown = _ROW_STATUS.get(kind)
        if shown is not None and step is not None:
            self._show(run, row or self._step(run_id, step), shown)
        status = _RUN_STATUS.get(kind)
        if status is not None:
            run.status = status
            if status in RUN_ENDED:
                run.finished_at = at
        run.updated_at = at
        run.last_seq = event.seq
        run.last_position = position
        self.changes.audit.append(
            AuditEntry(
                position,
                run_id,
                event.seq,
                at,
                event.actor,
                event.type_name(),
                step,
                event.reason,
                describe(event),
                event.trace_id,
            )
        )

    def _run(self, run_id: str, at: str) -> StoredRun:
        run = self.changes.runs.get(run_id)
        if run is None:
            loaded = self._runs.get(run_id)
            # A run whose RunStarted the log does not hold still gets a row, so its later
            # events are visible rather than dropped.
            run = StoredRun(*_RUN_VALUES(loaded)) if loaded is not None else _new_run(run_id, at)
            self.changes.runs[run_id] = run
        return run

    def _step(self, run_id: str, step: str, capability: str = "") -> StoredStep:
        key = (run_id, step)
        row = self.changes.steps.get(key)
        if row is None:
            loaded = self._steps.get(key)
            if loaded is not None:
                row = StoredStep(*_STEP_VALUES(loaded))
            else:
                row = _new_step(run_id, step, capability)
            self.changes.steps[key] = row
        return row

    @staticmethod
    def _finish(row: StoredStep, agent_id: str, attempt: int, at: str) -> None:
        row.agent_id = agent_id
        row.attempt = max(row.attempt, attempt)
        row.finished_at = at

    @staticmethod
    def _show(run: StoredRun, row: StoredStep, status: StepRowStatus) -> None:
        # steps_done always equals the number of this run's steps whose row says "completed".
        if row.status == "completed" and status != "completed":
            run.steps_done -= 1
        elif row.status != "completed" and status == "completed":
            run.steps_done += 1
        row.status = status


def _new_run(run_id: str, at: str) -> StoredRun:
    return StoredRun(
        run_id=run_id,
        workflow="",
        workflow_version=0,
        goal="",
        status="running",
        current_step=None,
        started_at=at,
        updated_at=at,
        finished_at=None,
        steps_total=0,
        steps_done=0,
        attempts=0,
        cost_usd=ZERO,
        error=None,
        output=None,
        last_seq=0,
        last_position=0,
        tenant="default",
    )


def _new_step(run_id: str, step: str, capability: str) -> StoredStep:
    return StoredStep(
        run_id=run_id,
        step=step,
        capability=capability,
        status="dispatched",
        attempt=0,
        agent_id=None,
        dispatched_at=None,
        finished_at=None,
        cost_usd=ZERO,
        input_tokens=0,
        output_tokens=0,
    )
