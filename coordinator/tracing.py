"""OpenTelemetry tracing: off unless the standard `OTEL_*` variables turn it on.

One trace per run. Its root is the span of the command that started the run (a child of the
client's span when the start request carries a W3C `traceparent` header). The root's trace id
and span id are recorded in RunStarted, and every event of the run carries the trace id, so an
audit row leads to its trace and replay re-decides the same events: the ids come from the
record, never from a live span.

Within the trace: the coordinator's span for each decision (a child of the span of the message
that caused it when that span is in the run's trace, else of the run's root), one `append` and
one `publish` span per run per committed batch, the agents' handling of each task (a child of
the decision that dispatched it, through the task message's `traceparent` header) with its
model calls, and the coordinator's handling of each result (a child of the agent's span, through
the result message's header).

When tracing is off, `ENABLED` is False and every helper returns at once: no span objects.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.status import Status, StatusCode

from cairn.events import Event, TaskDispatched

if TYPE_CHECKING:
    # The SDK is imported only when tracing is turned on: a process with it off never loads it.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from cairn.events import TaskEnvelope, TaskResult, Usage

    from .decisions import Fact
    from .state import RunState
    from .store import LoggedEvent

log = logging.getLogger("cairn.tracing")

# Checked on the hot path before anything else: False means no span is ever made.
ENABLED = False
_tracer: trace.Tracer = trace.NoOpTracer()
_provider: TracerProvider | None = None
_owned = False  # the provider was made here from the environment, so it is shut down here
_PROPAGATOR = TraceContextTextMapPropagator()
_NOOP: contextlib.nullcontext[None] = contextlib.nullcontext()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
EXPORTERS = ("otlp", "console")


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something cairn cannot do; the message names the fix."""


# -- setup ------------------------------------------------------------------------------------


def exporters_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The span exporters the environment asks for; empty when tracing is off.

    Off unless `OTEL_TRACES_EXPORTER` names `otlp` or `console`, or an OTLP endpoint is set
    (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`) with no exporter
    named. `OTEL_TRACES_EXPORTER=none` and `OTEL_SDK_DISABLED=true` turn it off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = list(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    if "none" in names:
        return []
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={raw!r} names {', '.join(unknown)}: cairn exports spans "
            "with otlp or console (or none, to turn tracing off)"
        )
    return names


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        module = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
        try:
            exporter: SpanExporter = importlib.import_module(module).OTLPSpanExporter()
        except ImportError:
            raise TracingConfigError(
                "OTLP over gRPC needs the package opentelemetry-exporter-otlp-proto-grpc: "
                "install it, or set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"
            ) from None
        return exporter
    if protocol != "http/protobuf":
        raise TracingConfigError(
            f"OTLP protocol {protocol!r} is not supported: use http/protobuf (the default) or grpc"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout... from OTEL_EXPORTER_OTLP_*


def setup(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Trace this process if the environment asks for it (see `exporters_from_env`); True
    when tracing is on. `service` is the service name unless `OTEL_SERVICE_NAME` (or
    `service.name` in `OTEL_RESOURCE_ATTRIBUTES`) gives one. Call `shutdown` before exiting."""
    env = os.environ if environ is None else environ
    names = exporters_from_env(env)
    if not names:
        return False
    if _provider is not None:
        return True
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    _enable(provider, owned=True)
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        # Also the process's provider, so spans an agent's own code makes join the trace.
        trace.set_tracer_provider(provider)
    log.info("tracing on: service %s, exporter %s", resource.attributes.get(SERVICE_NAME), names)
    return True


def enable(provider: TracerProvider) -> None:
    """Trace with a provider set up elsewhere (an application embedding cairn, a test)."""
    _enable(provider, owned=False)


def _enable(provider: TracerProvider, *, owned: bool) -> None:
    global ENABLED, _tracer, _provider, _owned
    _provider, _owned = provider, owned
    _tracer = provider.get_tracer("cairn")
    ENABLED = True


def shutdown() -> None:
    """Export what is still buffered and stop tracing (a provider given to `enable` is only
    flushed: its owner shuts it down)."""
    global ENABLED, _tracer, _provider
    provider, owned = _provider, _owned
    ENABLED = False
    _tracer = trace.NoOpTracer()
    _provider = None
    if provider is None:
        return
    try:
        if owned:
            provider.shutdown()
        else:
            provider.force_flush()
    except Exception as exc:  # a collector away at exit must not turn a clean stop into a crash
        log.warning("flushing spans failed: %s", exc)


# -- trace context ----------------------------------------------------------------------------


def current_ids() -> tuple[str | None, str | None]:
    """The trace id and span id (hex) of the current span, to record for a run started under
    it; (None, None) when tracing is off or the span is not sampled."""
    if not ENABLED:
        return None, None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def root_context(trace_id: str | None, span_id: str | None) -> SpanContext | None:
    """The run's root span, as recorded, to make its later spans children of."""
    if not trace_id or not span_id:
        return None
    try:
        ctx = SpanContext(int(trace_id, 16), int(span_id, 16), True, _SAMPLED)
    except ValueError:
        return None
    return ctx if ctx.is_valid else None


def _remote(headers: Mapping[str, str] | None) -> SpanContext | None:
    """The span context a message's `traceparent` header names, if any."""
    if not headers or "traceparent" not in headers:
        return None
    ctx = trace.get_current_span(_PROPAGATOR.extract(headers)).get_span_context()
    return ctx if ctx.is_valid else None


def _in(ctx: SpanContext) -> Context:
    return trace.set_span_in_context(NonRecordingSpan(ctx), Context())


def _parent(root: SpanContext, cause: SpanContext | None) -> tuple[Context, list[Link]]:
    """Parent within the run's trace: the span that caused this one when it is in that trace,
    else the run's root, linked to the cause (a command from another trace)."""
    if cause is not None and cause.trace_id == root.trace_id:
        return _in(cause), []
    return _in(root), [Link(cause)] if cause is not None else []


def inject(headers: dict[str, str]) -> None:
    """Add the current span's `traceparent` (and `tracestate`) to a message's headers."""
    _PROPAGATOR.inject(headers)


def _messaging(subject: str, operation: str) -> dict[str, Any]:
    return {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": operation,
    }


def _state_of(state: RunState | None) -> SpanContext | None:
    return None if state is None else root_context(state.trace_id, state.trace_span_id)


# -- coordinator ------------------------------------------------------------------------------


def command_span(what: str, subject: str, headers: Mapping[str, str] | None) -> Any:
    """A span over carrying out one command (`with`): a child of the requester's span when
    the request carries `traceparent`, else a new trace. A run started under it takes it as
    its root (see `current_ids`)."""
    if not ENABLED:
        return _NOOP
    remote = _remote(headers)
    return _tracer.start_as_current_span(
        f"process {subject}",
        context=_in(remote) if remote is not None else Context(),
        kind=SpanKind.SERVER,
        attributes={**_messaging(subject, "process"), "cairn.command": what},
    )


def record_reply(span: Span | None, ok: bool, error: str | None) -> None:
    """Mark a command's span as failed when the command was refused."""
    if span is not None and not ok:
        span.set_status(Status(StatusCode.ERROR, error or "refused"))


def result_span(
    headers: Mapping[str, str] | None, result: TaskResult, state: RunState | None
) -> Any:
    """A span over deciding one agent result (`with`): a child of the agent's span named by
    the message's `traceparent`, else of the run's root."""
    if not ENABLED:
        return _NOOP
    root = _state_of(state)
    if root is None:
        return _NOOP
    context, links = _parent(root, _remote(headers))
    return _tracer.start_as_current_span(
        "process cairn.result",
        context=context,
        links=links,
        kind=SpanKind.CONSUMER,
        attributes={
            **_messaging(f"cairn.result.{result.run_id}", "process"),
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
    if not ENABLED:
        return _NO_DECISION
    trace_id = getattr(fact, "trace_id", None) if state is None else state.trace_id
    span_id = getattr(fact, "trace_span_id", None) if state is None else state.trace_span_id
    root = root_context(trace_id, span_id)
    if root is None:
        return _NO_DECISION
    current = trace.get_current_span().get_span_context()
    context, links = _parent(root, current if current.is_valid else None)
    kind = _FACTS.get(type(fact).__name__, "fact")
    attributes: dict[str, Any] = {"cairn.fact": kind}
    run_id = state.run_id if state is not None else getattr(fact, "run_id", None)
    if run_id is not None:
        attributes["cairn.run_id"] = str(run_id)
    timer = getattr(fact, "kind", None)
    if isinstance(timer, str):
        attributes["cairn.timer"] = timer
    span = _tracer.start_span(f"decide {kind}", context=context, links=links, attributes=attributes)
    return Decision(span)


_FACTS = {
    "StartRunFact": "start",
    "ResultFact": "result",
    "CancelFact": "cancel",
    "ApprovalFact": "approval",
    "BudgetFact": "budget",
    "TimerFact": "timer",
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
    if not ENABLED or not runs:
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
            span = _tracer.start_span(
                name,
                context=_in(root),
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
        _PROPAGATOR.inject(headers, context=_in(ctx))


# -- agents -----------------------------------------------------------------------------------


def agent_span(
    headers: Mapping[str, str] | None,
    envelope: TaskEnvelope,
    agent_id: str,
    provider: str | None,
) -> Any:
    """An agent's span over handling one task (`with`, yields the span): a child of the
    decision that dispatched it (the task message's `traceparent`), else a new trace."""
    if not ENABLED:
        return _NOOP
    remote = _remote(headers)
    subject = f"cairn.task.{envelope.capability}"
    attributes: dict[str, Any] = {
        **_messaging(subject, "process"),
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": envelope.capability,
        "gen_ai.agent.id": agent_id,
        "cairn.run_id": str(envelope.run_id),
        "cairn.task_id": envelope.task_id,
        "cairn.step": envelope.step,
        "cairn.attempt": envelope.attempt,
    }
    if envelope.model:
        attributes["gen_ai.request.model"] = envelope.model
    if provider:
        attributes["gen_ai.provider.name"] = provider
        attributes["gen_ai.system"] = provider  # the attribute's older name, still read widely
    return _tracer.start_as_current_span(
        f"invoke_agent {envelope.capability}",
        context=_in(remote) if remote is not None else Context(),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    )


def record_result(span: Span | None, result: TaskResult) -> None:
    """Put a task's outcome and reported usage on the agent's span (GenAI conventions)."""
    if span is None or not span.is_recording():
        return
    _record_usage(span, result.usage)
    if result.error is not None:
        span.set_status(Status(StatusCode.ERROR, result.error.message))
        span.set_attribute("error.type", "retryable" if result.error.retryable else "permanent")


def _record_usage(span: Span, usage: Iterable[Usage]) -> None:
    entries = list(usage)
    if not entries:
        return
    models = [u.model for u in entries]
    span.set_attribute("gen_ai.usage.input_tokens", sum(u.input_tokens for u in entries))
    span.set_attribute("gen_ai.usage.output_tokens", sum(u.output_tokens for u in entries))
    span.set_attribute("gen_ai.response.model", models[0])
    if "gen_ai.request.model" not in (getattr(span, "attributes", None) or {}):
        span.set_attribute("gen_ai.request.model", models[0])
    if len(models) > 1:
        span.set_attribute("cairn.models", models)


def llm_span(model: str | None, provider: str | None, max_tokens: int) -> Any:
    """A span over one model call made through `ctx.llm` (`with`, yields the span)."""
    if not ENABLED:
        return _NOOP
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.max_tokens": max_tokens,
    }
    if model:
        attributes["gen_ai.request.model"] = model
    if provider:
        attributes["gen_ai.provider.name"] = provider
        attributes["gen_ai.system"] = provider
    return _tracer.start_as_current_span(
        f"chat {model}" if model else "chat", kind=SpanKind.CLIENT, attributes=attributes
    )


def record_completion(span: Span | None, model: str, input_tokens: int, output_tokens: int) -> None:
    """Put what a model call used on its span."""
    if span is None or not span.is_recording():
        return
    span.update_name(f"chat {model}")
    span.set_attribute("gen_ai.response.model", model)
    if "gen_ai.request.model" not in (getattr(span, "attributes", None) or {}):
        span.set_attribute("gen_ai.request.model", model)
    span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
