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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.status import Status, StatusCode

if TYPE_CHECKING:
    # The SDK is imported only when tracing is turned on: a process with it off never loads it.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter


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


def remote_context(headers: Mapping[str, str] | None) -> SpanContext | None:
    """The span context a message's `traceparent` header names, if any."""
    if not headers or "traceparent" not in headers:
        return None
    ctx = trace.get_current_span(_PROPAGATOR.extract(headers)).get_span_context()
    return ctx if ctx.is_valid else None


def context_of(ctx: SpanContext) -> Context:
    return trace.set_span_in_context(NonRecordingSpan(ctx), Context())


def parent_in_run(root: SpanContext, cause: SpanContext | None) -> tuple[Context, list[Link]]:
    """Parent within the run's trace: the span that caused this one when it is in that trace,
    else the run's root, linked to the cause (a command from another trace)."""
    if cause is not None and cause.trace_id == root.trace_id:
        return context_of(cause), []
    return context_of(root), [Link(cause)] if cause is not None else []


def inject(headers: dict[str, str]) -> None:
    """Add the current span's `traceparent` (and `tracestate`) to a message's headers."""
    _PROPAGATOR.inject(headers)


def inject_context(headers: dict[str, str], context: Context) -> None:
    """Add the `traceparent` of the span `context` holds to a message's headers."""
    _PROPAGATOR.inject(headers, context=context)


def messaging_attributes(subject: str, operation: str) -> dict[str, Any]:
    return {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": operation,
    }


# -- commands --------------------------------------------------------------------------------


def command_span(what: str, subject: str, headers: Mapping[str, str] | None) -> Any:
    """A span over carrying out one command (`with`): a child of the requester's span when
    the request carries `traceparent`, else a new trace. A run started under it takes it as
    its root (see `current_ids`)."""
    if not ENABLED:
        return _NOOP
    remote = remote_context(headers)
    return _tracer.start_as_current_span(
        f"process {subject}",
        context=context_of(remote) if remote is not None else Context(),
        kind=SpanKind.SERVER,
        attributes={**messaging_attributes(subject, "process"), "cairn.command": what},
    )


def record_reply(span: Span | None, ok: bool, error: str | None) -> None:
    """Mark a command's span as failed when the command was refused."""
    if span is not None and not ok:
        span.set_status(Status(StatusCode.ERROR, error or "refused"))


def tracer() -> trace.Tracer:
    """The tracer spans are made with (a no-op one while tracing is off)."""
    return _tracer
