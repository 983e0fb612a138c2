"""An agent's spans: handling one task (a child of the decision that dispatched it) and each
model call made through `ctx.llm`, with the GenAI semantic conventions' attributes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.status import Status, StatusCode

from cairn.events import TaskEnvelope, TaskResult, Usage
from cairn.runtime import tracing

_NOOP: contextlib.nullcontext[None] = contextlib.nullcontext()


# -- tasks -------------------------------------------------------------------------------------


def agent_span(
    headers: Mapping[str, str] | None,
    envelope: TaskEnvelope,
    agent_id: str,
    provider: str | None,
) -> Any:
    """An agent's span over handling one task (`with`, yields the span): a child of the
    decision that dispatched it (the task message's `traceparent`), else a new trace."""
    if not tracing.ENABLED:
        return _NOOP
    remote = tracing.remote_context(headers)
    subject = f"cairn.task.{envelope.capability}"
    attributes: dict[str, Any] = {
        **tracing.messaging_attributes(subject, "process"),
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
    return tracing.tracer().start_as_current_span(
        f"invoke_agent {envelope.capability}",
        context=tracing.context_of(remote) if remote is not None else Context(),
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
    if not tracing.ENABLED:
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
    return tracing.tracer().start_as_current_span(
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
