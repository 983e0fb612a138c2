"""Task handling: what a worker does with one task message, from its bytes to the ack.

Validate the envelope (or dead-letter it), validate the input (or answer with a non-retryable
error), run the agent's `handle` while a heartbeat keeps the message ours, publish the
`TaskResult` and wait for JetStream to store it, and only then ack the message. A worker that
dies before the ack leaves the task to be redelivered to another replica; a result published
twice is dropped by JetStream (`Nats-Msg-Id` is the task id).
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import BaseModel, ValidationError

from cairn.agents import spans
from cairn.agents.base import Agent, TaskContext
from cairn.agents.errors import NonRetryableError
from cairn.agents.llm import LLMClient, llm_provider
from cairn.events import (
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    StepSpec,
    TaskEnvelope,
    TaskError,
    TaskResult,
    Usage,
    error_lines,
    result_subject,
)
from cairn.runtime import tracing
from cairn.runtime.deadletters import DeadLetters

if TYPE_CHECKING:
    from opentelemetry.trace import Span

# The worker runtime logs under one name, whichever of its modules speaks.
log = logging.getLogger("cairn.agents.worker")


class TaskHandler:
    """Handles the task messages of one running worker (any number at once)."""

    def __init__(
        self,
        agent: Agent[Any, Any],
        nc: Client,
        js: JetStreamContext,
        llm: LLMClient,
        agent_id: str,
        ack_wait: float,
    ) -> None:
        self.agent = agent
        self.nc = nc
        self.js = js
        self.llm = llm
        self.agent_id = agent_id
        self.ack_wait = ack_wait
        self.capability = agent.capability
        self.dead_letters = DeadLetters(js, f"agent:{agent_id}")
        self.dlq_source = f"agent.{agent.capability}"
        self.provider = llm_provider(llm)

    async def process(self, msg: Msg) -> None:
        """Handle one task message: dead-letter, or run, publish the result, then ack."""
        started = _now()
        envelope = await self._accept(msg)
        if envelope is None:
            return
        with spans.agent_span(msg.headers, envelope, self.agent_id, self.provider) as span:
            await self._run(msg, envelope, started, span)

    async def _run(
        self, msg: Msg, envelope: TaskEnvelope, started: datetime, span: Span | None
    ) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        try:
            result = await self._execute(envelope, msg, started)
            spans.record_result(span, result)
            data = self._encode(result)
            subject = result_subject(self.capability, result.run_id)
            published = await self._publish(result.task_id, subject, data)
            heartbeat.cancel()
            if published:
                await self._ack(msg, result)
            else:
                await quietly(msg.nak())
        except asyncio.CancelledError:
            heartbeat.cancel()
            # Shut down before the task finished: hand it back now rather than after ack_wait.
            await quietly(msg.nak())
            raise
        finally:
            heartbeat.cancel()

    async def _accept(self, msg: Msg) -> TaskEnvelope | None:
        size = len(msg.data)
        if size > MAX_PAYLOAD_BYTES:
            await self._dead_letter(
                msg, f"payload of {size} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
            )
            return None
        try:
            envelope = TaskEnvelope.model_validate_json(msg.data)
        except ValidationError as exc:
            await self._dead_letter(msg, _envelope_problem(msg.data, exc))
            return None
        if envelope.capability != self.capability:
            await self._dead_letter(
                msg,
                f"envelope is for capability {envelope.capability!r} but arrived on "
                f"{msg.subject}, which agent {self.capability!r} serves",
            )
            return None
        return envelope

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        if not await self.dead_letters.send_message(self.dlq_source, msg, reason):
            return  # not recorded: left unacked, it comes back after ack_wait and is tried again
        await quietly(msg.term())

    async def _execute(self, envelope: TaskEnvelope, msg: Msg, started: datetime) -> TaskResult:
        agent = self.agent
        try:
            task = agent.input_model.model_validate(envelope.input)
        except ValidationError as exc:
            return self._result(
                envelope,
                started,
                error=TaskError(
                    message=f"input does not match {agent.input_model.__name__}: "
                    f"{format_errors(exc)}",
                    retryable=False,
                ),
            )
        ctx = TaskContext(envelope, llm=self.llm, agent_id=self.agent_id, delivery=_delivery(msg))
        # The coordinator gives up on the attempt after timeout_s; working on would only cost.
        deadline = asyncio.timeout(envelope.timeout_s)
        try:
            async with deadline:
                out = await agent.handle(task, ctx)
            output = _dump_output(agent.output_model, out)
        except NonRetryableError as exc:
            log.info("task %s failed for good: %s", envelope.task_id, _describe(exc))
            error = TaskError(message=_describe(exc), retryable=False)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                message = (
                    f"{self.capability} did not finish within the task's "
                    f"timeout_s={envelope.timeout_s:g}s"
                )
                log.warning("task %s: %s", envelope.task_id, message)
            else:
                message = _describe(exc)
                log.warning("task %s failed: %s", envelope.task_id, message, exc_info=exc)
            error = TaskError(message=message, retryable=True)
        else:
            return self._result(
                envelope,
                started,
                output=output,
                usage=ctx.usage,
                review=ctx.review,
                proposals=ctx.proposals,
            )
        return self._result(envelope, started, error=error, usage=ctx.usage)

    def _result(
        self,
        envelope: TaskEnvelope,
        started: datetime,
        *,
        output: dict[str, Any] | None = None,
        error: TaskError | None = None,
        usage: list[Usage] | None = None,
        review: str | None = None,
        proposals: list[StepSpec] | None = None,
    ) -> TaskResult:
        return TaskResult(
            task_id=envelope.task_id,
            run_id=envelope.run_id,
            step=envelope.step,
            attempt=envelope.attempt,
            agent_id=self.agent_id,
            output=output,
            error=error,
            usage=usage or [],
            started_at=started,
            finished_at=_now(),
            review=review,
            proposals=proposals or [],
            task_key=envelope.task_key,
        )

    def _encode(self, result: TaskResult) -> bytes:
        data = result.model_dump_json().encode()
        if len(data) <= MAX_PAYLOAD_BYTES:
            return data
        log.warning("task %s: result of %d bytes is too large", result.task_id, len(data))
        # Usage is kept: the tokens were spent even though the output cannot be delivered.
        error = TaskError(
            message=f"the output is {len(data)} bytes; results are limited to "
            f"{MAX_PAYLOAD_BYTES} bytes",
            retryable=False,
        )
        return result.model_copy(update={"output": None, "error": error}).model_dump_json().encode()

    async def _publish(self, task_id: str, subject: str, data: bytes) -> bool:
        """Publish a result until JetStream confirms it, or give the task back (False)."""
        loop = asyncio.get_running_loop()
        # Long enough to ride out a NATS restart; the heartbeat keeps the task ours meanwhile.
        deadline = loop.time() + max(self.ack_wait, 10.0)
        failures = 0
        headers = {"Nats-Msg-Id": task_id}
        if tracing.ENABLED:
            tracing.inject(headers)  # the agent's span: the coordinator's handling is its child
        while True:
            try:
                await self.js.publish(subject, data, headers=headers)
            except Exception as exc:
                failures += 1
                delay = min(0.1 * 2 ** (failures - 1), 2.0)
                if self.nc.is_closed or loop.time() + delay > deadline:
                    log.error(
                        "could not publish the result of task %s (%s); handing the task back",
                        task_id,
                        exc or type(exc).__name__,
                    )
                    return False
                (log.warning if failures == 1 else log.debug)(
                    "publishing the result of task %s failed (%s); retrying",
                    task_id,
                    exc or type(exc).__name__,
                )
                await asyncio.sleep(delay)
            else:
                return True

    async def _ack(self, msg: Msg, result: TaskResult) -> None:
        try:
            # Confirmed ack: cheap next to a model call, and a lost ack is visible in the log.
            await msg.ack_sync(timeout=5)
        except Exception as exc:
            log.warning(
                "ack of task %s not confirmed (%s): it may be redelivered, and the repeated "
                "result will be dropped as a duplicate",
                result.task_id,
                exc or type(exc).__name__,
            )
        log.debug(
            "task %s done (%s) in %.1f ms",
            result.task_id,
            "error" if result.error else "ok",
            (result.finished_at - result.started_at).total_seconds() * 1000,
        )

    async def _heartbeat(self, msg: Msg) -> None:
        """Tell JetStream the task is still being worked on, so it is not redelivered."""
        interval = self.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception as exc:  # disconnected: the next beat may get through
                log.debug("heartbeat failed: %s", exc)


def format_errors(exc: ValidationError, limit: int = 10) -> str:
    """Pydantic's errors as one line: `field.path: message; ...`."""
    parts = error_lines(exc, limit=limit)
    if exc.error_count() > limit:
        parts.append(f"and {exc.error_count() - limit} more")
    return "; ".join(parts)


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number"}


def _envelope_problem(data: bytes, exc: ValidationError) -> str:
    try:
        decoded = json.loads(data)
    except ValueError as err:  # includes undecodable UTF-8
        return f"malformed JSON: {err}"
    if not isinstance(decoded, dict):
        kind = "null" if decoded is None else _JSON_TYPES.get(type(decoded), "boolean")
        return f"expected a JSON object (a TaskEnvelope), got a JSON {kind}"
    if "v" in decoded and decoded["v"] != PROTOCOL_VERSION:
        return (
            f"unknown protocol version v={decoded['v']!r}; this agent speaks v={PROTOCOL_VERSION}"
        )
    return f"not a valid TaskEnvelope: {format_errors(exc)}"


def _dump_output(model: type[BaseModel], out: object) -> dict[str, Any]:
    if isinstance(out, BaseModel) and not isinstance(out, model):
        out = out.model_dump()
    try:
        value = out if isinstance(out, model) else model.model_validate(out)
    except ValidationError as exc:
        raise ValueError(f"output does not match {model.__name__}: {format_errors(exc)}") from None
    return value.model_dump(mode="json")


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _delivery(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # not a JetStream message (a test calling process directly)
        return 1


def _now() -> datetime:
    return datetime.now(UTC)


async def quietly(awaitable: Any) -> None:
    """Await a best-effort NATS call (nak, term, unsubscribe) whose failure changes nothing."""
    try:
        await awaitable
    except Exception as exc:
        log.debug("ignored: %s", exc)
