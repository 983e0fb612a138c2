"""The statuses of a run, its steps, their attempts and approvals, and what each event does to
them: the one vocabulary every fold of a run uses, and the one table they read it from.

The coordinator's state (`coordinator/domain/state.py`), the views, `cairn why`, the live
progress table and the tenant ledger all take a status from `EFFECTS`. What the views and the
progress table show is derived from these statuses by a mapping of their own, named where they
keep it (`projections/projection.py`, `cli/progress.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, Literal, NamedTuple, get_args

from cairn.events.base import Event
from cairn.events.run import (
    ApprovalDenied,
    ApprovalEscalated,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRequested,
    ApprovalWarned,
    BudgetExhausted,
    BudgetRaised,
    BudgetReserved,
    BudgetSettled,
    CapabilityUnserved,
    ContractViolated,
    CostCharged,
    OutputCarried,
    ResultIgnored,
    ResultReceived,
    RetryScheduled,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepAdmitted,
    StepRefused,
    StepSkipped,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskTimedOut,
)

RunStatus = Literal["running", "completed", "failed", "cancelled"]
StepStatus = Literal[
    "pending",  # declared, not dispatched yet
    "awaiting_approval",  # a gate is open before dispatch, or after an output / failure
    "blocked",  # the budget cannot cover the next attempt
    "dispatched",  # an attempt is out (or has just ended: what follows says what next)
    "retry_wait",
    "completed",
    "skipped",
    "failed",  # the run failed at this step
]
# How one attempt (one dispatch of a step) went; "pending" until an outcome is recorded.
AttemptOutcome = Literal["pending", "completed", "failed", "violated", "timed_out"]
ApprovalStatus = Literal["pending", "granted", "denied", "expired"]

RUN_STATUSES: Final[tuple[RunStatus, ...]] = get_args(RunStatus)
# A run in one of these has ended: no event changes its status again.
RUN_ENDED: Final[frozenset[RunStatus]] = frozenset({"completed", "failed", "cancelled"})
# Statuses after which a step no longer holds up the steps that need it.
STEP_DONE: Final[frozenset[StepStatus]] = frozenset({"completed", "skipped"})


class Effect(NamedTuple):
    """What one event does to the statuses of its run; None leaves a status as it was.

    `step` applies to the step the event names (`event.step`), `attempt` to that step's latest
    attempt, `approval` to the request the event names (`event.request_id`).
    """

    step: StepStatus | None = None
    attempt: AttemptOutcome | None = None
    run: RunStatus | None = None
    approval: ApprovalStatus | None = None


NO_EFFECT: Final = Effect()

# Every event type, in the order of a run's life.
EFFECTS: Final[Mapping[type[Event], Effect]] = {
    RunStarted: Effect(step="pending", run="running"),  # every declared step is pending
    StepAdmitted: Effect(step="pending"),  # the step an agent proposed (`spec.name`)
    StepRefused: NO_EFFECT,
    CapabilityUnserved: NO_EFFECT,  # the task stays dispatched, waiting
    OutputCarried: Effect(step="completed"),  # a fork takes over an output: no attempt
    BudgetReserved: NO_EFFECT,
    BudgetExhausted: Effect(step="blocked"),
    BudgetRaised: NO_EFFECT,
    ApprovalRequested: Effect(step="awaiting_approval", approval="pending"),
    ApprovalWarned: NO_EFFECT,
    ApprovalEscalated: NO_EFFECT,
    # A decision on a request leaves the step where it is: the events decided with it move it.
    ApprovalGranted: Effect(approval="granted"),
    ApprovalDenied: Effect(approval="denied"),
    ApprovalExpired: Effect(approval="expired"),
    TaskDispatched: Effect(step="dispatched", attempt="pending"),
    ResultReceived: NO_EFFECT,  # the output waits to be judged
    ResultIgnored: NO_EFFECT,
    CostCharged: NO_EFFECT,
    BudgetSettled: NO_EFFECT,
    TaskCompleted: Effect(step="completed", attempt="completed"),
    # An attempt that went wrong ends it; the retry, skip, request or failure decided with it
    # says what becomes of the step.
    TaskFailed: Effect(attempt="failed"),
    ContractViolated: Effect(attempt="violated"),
    TaskTimedOut: Effect(attempt="timed_out"),
    RetryScheduled: Effect(step="retry_wait"),
    StepSkipped: Effect(step="skipped"),
    RunCompleted: Effect(run="completed"),
    RunFailed: Effect(step="failed", run="failed"),  # the step it names, when it names one
    RunCancelled: Effect(run="cancelled"),
}

_EFFECTS_BY_NAME: Final = {kind.type_name(): effect for kind, effect in EFFECTS.items()}

# The events that end a run.
TERMINAL_EVENTS: Final[tuple[type[Event], ...]] = tuple(
    kind for kind, effect in EFFECTS.items() if effect.run in RUN_ENDED
)


def effect_of(event: Event) -> Effect:
    """What `event` does to the statuses of its run (nothing, for a type this table lacks)."""
    return EFFECTS.get(type(event), NO_EFFECT)


def effect_named(type_name: str) -> Effect:
    """The effect of events of the type named `type_name` (as the live feed names them)."""
    return _EFFECTS_BY_NAME.get(type_name, NO_EFFECT)


def step_status(events: Iterable[Event], step: str) -> StepStatus:
    """The status of `step` after a run's `events` (in order): the table applied to each event
    that names the step, as the coordinator's state folds it ("pending" until one does)."""
    status: StepStatus = "pending"
    for event in events:
        changed = EFFECTS.get(type(event), NO_EFFECT).step
        if changed is not None and getattr(event, "step", None) == step:
            status = changed
    return status
