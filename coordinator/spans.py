"""The coordinator's spans in a run's trace: deciding a fact, deciding a result, and the
`append` and `publish` work of each committed batch, one span per traced run (see
`cairn.runtime.tracing` for how tracing is turned on and what a run's trace holds)."""

from __future__ import annotations

import contextlib
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, SpanKind
from opentelemetry.trace.status import Status, StatusCode

from cairn.events import Event, TaskDispatched
from cairn.runtime import tracing

if TYPE_CHECKING:
    from cairn.coordinator.domain.facts import Fact
    from cairn.coordinator.domain.state import RunState
    from cairn.events import TaskResult
    from cairn.runtime.eventlog.store import LoggedEvent

_NOOP: contextlib.nullcontext[None] = contextlib.nullcontext()


def _state_of(state: RunState | None) -> SpanContext | None:
    return None if state is None else tracing.root_context(state.trace_id, state.trace_span_id)


def result_span(
    headers: Mapping[str, str] | None, result: TaskResult, state: RunState | None
) -> Any:
    """A span over deciding one agent result (`with`): a child of the agent's span named by
    the message's `traceparent`, else of the run's root."""
    if not tracing.ENABLED:
        return _NOOP
    root = _state_of(state)
    if root is None:
        return _NOOP
    context, links = tracing.parent_in_run(root, tracing.remote_context(headers))
    return tracing.tracer().start_as_current_span(
        "process cairn.result",
        context=context,
        links=links,
        kind=SpanKind.CONSUMER,
        attributes={
            **tracing.messaging_attributes(f"cairn.result.{result.run_id}", "process"),
            "cairn.run_id": str(result.run_id),
            "cairn.task_id": result.task_id,
            "cairn.step": result.step,
            "cairn.attempt": result.attempt,
            "cairn.agent_id": result.agent_id,
        },
    )


class Decision:
    """The span of one decision (`with`); `decided(events)` records what it decided."""

    __slots__ = ("span",)

    def __init__(self, span: Span | None) -> None:
        self.span = span

    def __enter__(self) -> Decision:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self.span
        if span is None:
            return
        if exc is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()

    def decided(self, events: Sequence[Event]) -> None:
        span = self.span
        if span is None:
            return
        span.set_attribute("cairn.events", len(events))
        span.set_attribute("cairn.event_types", [e.type_name() for e in events])
        ctx = span.get_span_context()
        for event in events:
            if isinstance(event, TaskDispatched):
                _remember_parent(event, ctx)


_NO_DECISION = Decision(None)


def deciding(state: RunState | None, fact: Fact) -> Decision:
    """The span of deciding `fact` in its run's trace; a no-op when the run is not traced."""
    if not tracing.ENABLED:
        return _NO_DECISION
    trace_id = getattr(fact, "trace_id", None) if state is None else state.trace_id
    span_id = getattr(fact, "trace_span_id", None) if state is None else state.trace_span_id
    root = tracing.root_context(trace_id, span_id)
    if root is None:
        return _NO_DECISION
    current = trace.get_current_span().get_span_context()
    context, links = tracing.parent_in_run(root, current if current.is_valid else None)
    kind = _FACTS.get(type(fact).__name__, "fact")
    attributes: dict[str, Any] = {"cairn.fact": kind}
    run_id = state.run_id if state is not None else getattr(fact, "run_id", None)
    if run_id is not None:
        attributes["cairn.run_id"] = str(run_id)
    timer = getattr(fact, "kind", None)
    if isinstance(timer, str):
        attributes["cairn.timer"] = timer
    span = tracing.tracer().start_span(
        f"decide {kind}", context=context, links=links, attributes=attributes
    )
    return Decision(span)


_FACTS = {
    "StartRunFact": "start",
    "ResultFact": "result",
    "CancelFact": "cancel",
    "ApprovalFact": "approval",
    "BudgetFact": "budget",
    "TimerFact": "timer",
    "UnservedFact": "unserved",
}


def run_spans(
    name: str,
    runs: Mapping[uuid.UUID, RunState] | None,
    events: Sequence[Event | LoggedEvent],
    kind: Literal["internal", "producer"] = "internal",
) -> Any:
    """One span named `name` per traced run over a batch's work (`with`): a batch commits or
    publishes for many runs at once, and each run's trace should show the step it was part
    of, so each run gets its own span (a child of its root) with the batch's times and size.
    One batch span linked to the runs instead would leave every run's trace without it."""
    if not tracing.ENABLED or not runs:
        return _NOOP
    return _run_spans(
        name, runs, events, SpanKind.PRODUCER if kind == "producer" else SpanKind.INTERNAL
    )


@contextlib.contextmanager
def _run_spans(
    name: str,
    runs: Mapping[uuid.UUID, RunState],
    events: Sequence[Event | LoggedEvent],
    kind: SpanKind,
) -> Iterator[None]:
    started = time.time_ns()
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        ended = time.time_ns()
        counts: dict[uuid.UUID, int] = {}
        for item in events:
            run_id = item.run_id if isinstance(item, Event) else item.event.run_id
            counts[run_id] = counts.get(run_id, 0) + 1
        for run_id, state in runs.items():
            root = _state_of(state)
            if root is None:
                continue
            span = tracing.tracer().start_span(
                name,
                context=tracing.context_of(root),
                kind=kind,
                start_time=started,
                attributes={
                    "cairn.run_id": str(run_id),
                    "cairn.events": counts.get(run_id, 0),
                    "cairn.batch.events": len(events),
                    "cairn.batch.runs": len(runs),
                },
            )
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            span.end(end_time=ended)


# Which decision dispatched a task, until the outbox publishes it: keyed by the event object,
# leaving with it (a weak reference), so a batch that never commits leaves nothing behind.
class _ParentRef(weakref.ref):  # type: ignore[type-arg]
    __slots__ = ("context", "key")
    context: SpanContext
    key: int


_parents: dict[int, _ParentRef] = {}


def _forget(ref: _ParentRef) -> None:
    if _parents.get(ref.key) is ref:
        del _parents[ref.key]


def _remember_parent(event: Event, ctx: SpanContext) -> None:
    ref = _ParentRef(event, _forget)
    ref.context, ref.key = ctx, id(event)
    _parents[ref.key] = ref


def task_headers(event: TaskDispatched, headers: dict[str, str], state: RunState | None) -> None:
    """Add the trace context a task message carries: the decision that dispatched it when
    this process made it, else (republished after a restart) the run's root."""
    ref = _parents.get(id(event))
    ctx = ref.context if ref is not None and ref() is event else _state_of(state)
    if ctx is not None and event.trace_id is not None:
        tracing.inject_context(headers, tracing.context_of(ctx))
