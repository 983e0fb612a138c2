"""The short human sentence each audit row carries (the `detail` column)."""

from __future__ import annotations

from decimal import Decimal

from cairn.events import (
    CapabilityUnserved,
    ContractViolated,
    CostCharged,
    Event,
    ResultIgnored,
    ResultReceived,
    RetryScheduled,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepSkipped,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskTimedOut,
)

# Long goals and error messages are cut so a timeline stays one line per event; the full
# text is in the event itself.
MAX_TEXT = 160


def money(amount: Decimal) -> str:
    """A dollar amount in plain notation, exactly as charged (never `1E-7`)."""
    return f"${amount:f}"


def describe(event: Event) -> str:
    """One line saying what an event records, e.g. "dispatched plan to planner (attempt 1)"."""
    match event:
        case TaskDispatched():
            return f"dispatched {event.step} to {event.capability} (attempt {event.attempt})"
        case TaskCompleted():
            return (
                f"{event.agent_id} completed {event.step} (attempt {event.attempt}) "
                f"in {event.duration_ms:.0f} ms"
            )
        case CostCharged():
            return (
                f"charged {money(event.amount_usd)} for {event.input_tokens}+"
                f"{event.output_tokens} tokens of {event.model}"
            )
        case TaskFailed():
            retry = "retryable" if event.retryable else "not retryable"
            return (
                f"{event.agent_id} failed {event.step} (attempt {event.attempt}, {retry}): "
                f"{_short(event.error)}"
            )
        case ContractViolated():
            first = f": {_short(event.errors[0])}" if event.errors else ""
            more = f" (+{len(event.errors) - 1} more)" if len(event.errors) > 1 else ""
            return (
                f"output of {event.step} (attempt {event.attempt}) from {event.agent_id} "
                f"violates {event.contract}{first}{more}"
            )
        case ResultReceived():
            what = f"error: {_short(event.error.message)}" if event.error else "output"
            tokens = sum(u.input_tokens + u.output_tokens for u in event.usage)
            return (
                f"{event.agent_id} reported {what} for {event.step} (attempt {event.attempt}), "
                f"{tokens} tokens"
            )
        case TaskTimedOut():
            return f"{event.step} (attempt {event.attempt}) timed out after {event.timeout_s:g}s"
        case RetryScheduled():
            return f"retry {event.step} as attempt {event.attempt} in {event.delay_s:.2f}s"
        case StepSkipped():
            return f"skipped {event.step}: {_short(event.error)}"
        case ResultIgnored():
            return f"ignored result of task {event.task_id} from {event.agent_id}"
        case RunStarted():
            workflow = event.workflow
            steps = len(workflow.steps)
            return (
                f"started {workflow.name} v{workflow.version} ({steps} steps): "
                f"{_short(event.intent.goal)}"
            )
        case RunCompleted():
            return "run completed"
        case RunFailed():
            where = f" at {event.step}" if event.step else ""
            return f"run failed{where}: {_short(event.error)}"
        case RunCancelled():
            return "run cancelled"
        case CapabilityUnserved():
            return f"{event.step} (attempt {event.attempt}) waits: no live {event.capability} agent"
        case _:
            # An event type added after this code was written still gets an audit row.
            return event.type_name()


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_TEXT else line[: MAX_TEXT - 1] + "…"
