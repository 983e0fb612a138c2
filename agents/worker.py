"""The worker runtime: serve one agent on its capability's shared JetStream consumer.

Per task message: validate the envelope (or dead-letter it), validate the input (or answer
with a non-retryable error), run `handle` while a heartbeat keeps the message ours, publish
the `TaskResult` and wait for JetStream to store it, and only then ack the message. A worker
that dies before the ack leaves the task to be redelivered to another replica; a result
published twice is dropped by JetStream (`Nats-Msg-Id` is the task id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError
from pydantic import BaseModel, ValidationError

from cairn.agents import spans
from cairn.agents.base import Agent, TaskContext, check_agent
from cairn.agents.errors import AgentConfigError, NonRetryableError
from cairn.agents.llm import (
    ClosableLLMClient,
    LLMClient,
    LLMConfigError,
    llm_from_env,
    llm_from_settings,
    llm_provider,
)
from cairn.events import (
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    TASKS_STREAM,
    StepSpec,
    TaskEnvelope,
    TaskError,
    TaskResult,
    Usage,
    agent_consumer,
    error_lines,
    result_subject,
    task_subject,
)
from cairn.runtime import tracing
from cairn.runtime.connection import (
    NatsUnavailableError,
    connect,
    declare_streams,
    display_url,
)
from cairn.runtime.deadletters import DeadLetters
from cairn.runtime.health import Heartbeat
from cairn.runtime.roles import NatsEndpoint, agent_role
from cairn.runtime.settings import (
    DEFAULT_AGENT_ACK_WAIT,
    DEFAULT_AGENT_CONCURRENCY,
    DEFAULT_AGENT_MAX_DELIVER,
    DEFAULT_AGENT_SHUTDOWN_GRACE,
    Settings,
    SettingsError,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("cairn.agents.worker")

DEFAULT_CONCURRENCY = DEFAULT_AGENT_CONCURRENCY
DEFAULT_ACK_WAIT = DEFAULT_AGENT_ACK_WAIT
DEFAULT_MAX_DELIVER = DEFAULT_AGENT_MAX_DELIVER
# How long one pull request waits on an idle stream. An expired request is renewed at once;
# the value only bounds how long a request lost in a NATS restart goes unnoticed.
DEFAULT_FETCH_TIMEOUT = 2.0
DEFAULT_SHUTDOWN_GRACE = DEFAULT_AGENT_SHUTDOWN_GRACE


def new_agent_id(capability: str) -> str:
    """A fresh worker id, `<capability>-<6 hex digits>`; it names the agent in every result."""
    return f"{capability}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker consumes: parallel pull loops, ack deadline and delivery limit.

    From `Settings` (`from_settings`): `CAIRN_AGENT_CONCURRENCY`, `CAIRN_AGENT_ACK_WAIT`
    (seconds), `CAIRN_AGENT_MAX_DELIVER`, `CAIRN_AGENT_SHUTDOWN_GRACE` (seconds in-flight tasks
    get to finish after SIGTERM).
    """

    concurrency: int = DEFAULT_CONCURRENCY
    ack_wait: float = DEFAULT_ACK_WAIT
    max_deliver: int = DEFAULT_MAX_DELIVER
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise AgentConfigError(f"concurrency must be at least 1, not {self.concurrency}")
        if self.ack_wait <= 0:
            raise AgentConfigError(
                f"ack_wait must be a positive number of seconds, not {self.ack_wait}"
            )
        if self.max_deliver < 1:
            raise AgentConfigError(f"max_deliver must be at least 1, not {self.max_deliver}")
        if self.shutdown_grace < 0:
            raise AgentConfigError(f"shutdown_grace cannot be negative, not {self.shutdown_grace}")

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerOptions:
        """The options the settings give; AgentConfigError for one out of range."""
        return cls(
            concurrency=settings.agent_concurrency,
            ack_wait=settings.agent_ack_wait,
            max_deliver=settings.agent_max_deliver,
            shutdown_grace=settings.agent_shutdown_grace,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerOptions:
        """The options `environ` (default: this process's environment) gives, as
        `Settings.from_env` reads it."""
        try:
            settings = Settings.from_env(environ=environ)
        except SettingsError as exc:
            raise AgentConfigError(str(exc)) from None
        return cls.from_settings(settings)


async def declare_agent_consumer(
    js: JetStreamContext, capability: str, *, ack_wait: float, max_deliver: int
) -> None:
    """Create the capability's durable pull consumer, or bring its settings up to date.

    Replicas starting together all call this: the server accepts an identical consumer
    twice and updates the editable settings (ack_wait, max_deliver) of an existing one.
    """
    name = agent_consumer(capability)
    config = ConsumerConfig(
        name=name,
        durable_name=name,
        filter_subject=task_subject(capability),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
    )
    try:
        current = (await js.consumer_info(TASKS_STREAM, name)).config
    except NotFoundError:
        current = None
    if current is not None and (current.ack_wait, current.max_deliver) != (ack_wait, max_deliver):
        log.info(
            "updating consumer %s: ack_wait %gs → %gs, max_deliver %s → %s",
            name,
            current.ack_wait or 0,
            ack_wait,
            current.max_deliver,
            max_deliver,
        )
    try:
        await js.add_consumer(TASKS_STREAM, config)
    except BadRequestError as exc:
        raise AgentConfigError(
            f"consumer {name} on stream {TASKS_STREAM} exists with settings that cannot be "
            f"changed ({exc.description}); delete it and start the agent again"
        ) from None


async def run_worker(
    agent: Agent[Any, Any],
    settings_or_url: Settings | NatsEndpoint | str | None,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    ack_wait: float = DEFAULT_ACK_WAIT,
    max_deliver: int = DEFAULT_MAX_DELIVER,
    stop: asyncio.Event | None = None,
    llm: LLMClient | None = None,
    agent_id: str | None = None,
    on_ready: Callable[[str], object] | None = None,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
) -> None:
    """Serve `agent` until `stop` is set (or the task running this is cancelled).

    Connects to NATS (`NatsUnavailableError` if it cannot; with `Settings`, as the
    capability's role `agent-<capability>`), declares cairn's streams and the capability's
    consumer, then runs `concurrency` independent pull loops. `on_ready(agent_id)`
    is called once the consumer is bound. On stop: no new fetches, in-flight tasks get
    `shutdown_grace` seconds to finish (unfinished ones are handed back, never acked), then
    the connection is drained. `llm` defaults to the settings' (`llm_from_settings`; given
    only a URL, `llm_from_env()`), closed on exit; a client passed in is left to its owner.
    With `Settings`, the loops touch `settings.health_file` as they turn.
    """
    check_agent(agent)
    options = WorkerOptions(
        concurrency=concurrency,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        shutdown_grace=shutdown_grace,
    )
    capability = agent.capability
    settings: Settings | None = None
    endpoint: NatsEndpoint | str | None
    if isinstance(settings_or_url, Settings):
        settings = settings_or_url
        endpoint = settings.nats_endpoint(agent_role(capability))
    else:
        endpoint = settings_or_url
    agent_id = agent_id or new_agent_id(capability)
    owned_llm = llm is None
    if llm is not None:
        client = llm
    else:
        client = llm_from_settings(settings) if settings is not None else llm_from_env()
    nc: Client | None = None
    subs: list[JetStreamContext.PullSubscription] = []
    try:
        nc = await connect(endpoint, name=f"cairn-agent-{agent_id}")
        js = nc.jetstream()
        url = endpoint.url if isinstance(endpoint, NatsEndpoint) else endpoint
        await _declare(js, capability, options, display_url(url))
        consumer = agent_consumer(capability)
        # One subscription (inbox) per loop, so no loop ever reads another's pull responses.
        for _ in range(options.concurrency):
            subs.append(await js.pull_subscribe_bind(durable=consumer, stream=TASKS_STREAM))
        log.info(
            "agent %s ready: consumer %s on %s, %d pull loops",
            agent_id,
            consumer,
            TASKS_STREAM,
            options.concurrency,
        )
        if on_ready is not None:
            on_ready(agent_id)
        health_file = settings.health_file if settings is not None else None
        worker = _Worker(agent, nc, js, client, agent_id, options.ack_wait, health_file)
        await worker.serve(subs, stop or asyncio.Event(), options.shutdown_grace, fetch_timeout)
    finally:
        for sub in subs:
            await _quietly(sub.unsubscribe())
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout=5)
            except Exception as exc:  # a drain cut short must not hide why we are exiting
                log.debug("drain did not finish (%s); closing", exc)
                await _quietly(nc.close())
        if owned_llm and isinstance(client, ClosableLLMClient):
            await client.aclose()


async def _declare(
    js: JetStreamContext, capability: str, options: WorkerOptions, url: str | None
) -> None:
    try:
        await declare_streams(js, update=False)
        await declare_agent_consumer(
            js, capability, ack_wait=options.ack_wait, max_deliver=options.max_deliver
        )
    except (ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError):
        raise NatsUnavailableError(
            f"NATS at {url} does not answer JetStream requests: start nats-server with "
            "JetStream enabled (-js), or use `cairn up` (a permissions violation logged "
            f"above means the credentials are not those of {agent_role(capability)})"
        ) from None
    except APIError as exc:
        raise AgentConfigError(
            f"NATS at {url} refused cairn's streams or the {capability} consumer "
            f"({exc.description or exc}); check for conflicting streams on cairn.> subjects"
        ) from None


class _Worker:
    """The pull loops and per-message handling of one running worker."""

    def __init__(
        self,
        agent: Agent[Any, Any],
        nc: Client,
        js: JetStreamContext,
        llm: LLMClient,
        agent_id: str,
        ack_wait: float,
        health_file: Path | None,
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
        self.in_flight = 0
        self.heartbeat = Heartbeat(health_file)  # for a container's health check
        self.provider = llm_provider(llm)

    async def serve(
        self,
        subs: list[JetStreamContext.PullSubscription],
        stop: asyncio.Event,
        grace: float,
        fetch_timeout: float,
    ) -> None:
        self.heartbeat.beat()  # bound to its consumer: NATS answered, the loop starts now
        stopped = asyncio.ensure_future(stop.wait())
        loops = [
            asyncio.create_task(self._pull_loop(sub, stopped, fetch_timeout), name=f"pull-{i}")
            for i, sub in enumerate(subs)
        ]
        try:
            running = set(loops)
            while running and not stopped.done():
                done, _ = await asyncio.wait(
                    {stopped, *running}, return_when=asyncio.FIRST_COMPLETED
                )
                running -= done
            if running:
                if self.in_flight:
                    log.info(
                        "stopping: waiting up to %gs for %d task(s) in flight",
                        grace,
                        self.in_flight,
                    )
                _, late = await asyncio.wait(running, timeout=grace)
                if late:
                    log.warning(
                        "%d task(s) did not finish within %gs; handing them back unacked",
                        self.in_flight,
                        grace,
                    )
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.wait(loops)
            stopped.cancel()
            for loop in loops:
                if not loop.cancelled() and loop.exception() is not None:
                    log.error("pull loop %s failed", loop.get_name(), exc_info=loop.exception())

    async def _pull_loop(
        self,
        sub: JetStreamContext.PullSubscription,
        stopped: asyncio.Future[Any],
        fetch_timeout: float,
    ) -> None:
        try:
            await self._pull(sub, stopped, fetch_timeout)
        finally:
            # At once, not when the worker exits: a task handed back (nak) by a busy loop
            # must not be redelivered to a pull request this worker left open.
            await _quietly(sub.unsubscribe())

    async def _pull(
        self,
        sub: JetStreamContext.PullSubscription,
        stopped: asyncio.Future[Any],
        fetch_timeout: float,
    ) -> None:
        failures = 0
        while not stopped.done():
            fetch = asyncio.ensure_future(sub.fetch(1, timeout=fetch_timeout))
            try:
                await asyncio.wait((fetch, stopped), return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                fetch.cancel()
                raise
            if not fetch.done():
                fetch.cancel()
                await asyncio.wait((fetch,))
            if fetch.cancelled():
                return
            error = fetch.exception()
            if error is None or isinstance(error, asyncio.TimeoutError):
                self.heartbeat.beat()  # NATS answered: a task, or nothing to do
            if error is None:
                failures = 0
                for msg in fetch.result():
                    # A message fetched as the stop came in is in flight: finish it.
                    await self._process_safely(msg)
                continue
            if isinstance(error, asyncio.TimeoutError):
                continue  # an idle stream, or a request lost while reconnecting
            if self.nc.is_closed:
                log.error("NATS connection closed; pull loop ends")
                return
            failures += 1
            # Disconnected or the server is restarting: retry soon, without flooding the log.
            (log.warning if failures == 1 else log.debug)("fetching a task failed: %s", error)
            await asyncio.wait((stopped,), timeout=min(0.05 * 2 ** (failures - 1), 2.0))

    async def _process_safely(self, msg: Msg) -> None:
        self.in_flight += 1
        try:
            await self.process(msg)
        except Exception:
            log.exception("unexpected error on a task message; it stays unacked for redelivery")
        finally:
            self.in_flight -= 1

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
            published = await self._publish(result.task_id, result_subject(result.run_id), data)
            heartbeat.cancel()
            if published:
                await self._ack(msg, result)
            else:
                await _quietly(msg.nak())
        except asyncio.CancelledError:
            heartbeat.cancel()
            # Shut down before the task finished: hand it back now rather than after ack_wait.
            await _quietly(msg.nak())
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
        await _quietly(msg.term())

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


async def _quietly(awaitable: Any) -> None:
    """Await a best-effort NATS call (nak, term, unsubscribe) whose failure changes nothing."""
    try:
        await awaitable
    except Exception as exc:
        log.debug("ignored: %s", exc)


def main(
    agent_factory: Callable[[], Agent[Any, Any]], *, settings: Settings | None = None
) -> NoReturn:
    """Run one agent as a process: the body of an agent module's `__main__`.

    Settings default to `Settings.from_env()`: NATS from `NATS_URL` (or the embedded server
    that `cairn up` started), connecting as the user `agent-<capability>`; worker options from
    `CAIRN_AGENT_*`, the model from `CAIRN_LLM*`, the log level from `CAIRN_LOG_LEVEL`.
    SIGTERM and SIGINT stop it gracefully (exit 0). A NATS server that cannot be reached, or
    wrong configuration, is one line on stderr and exit status 2.
    """
    try:
        settings = settings or Settings.from_env()
        _configure_logging(settings.log_level)
        agent = agent_factory()
        check_agent(agent)
        options = WorkerOptions.from_settings(settings)
        llm = llm_from_settings(settings)
        tracing.setup(f"cairn-agent-{agent.capability}")
    except (
        SettingsError,
        AgentConfigError,
        LLMConfigError,
        TypeError,
        tracing.TracingConfigError,
    ) as exc:
        sys.stderr.write(f"cairn agent: {exc}\n")
        raise SystemExit(2) from None
    try:
        code = asyncio.run(_serve(agent, settings, llm, options))
    finally:
        tracing.shutdown()  # what is still buffered goes out before the process ends
    raise SystemExit(code)


async def _serve(
    agent: Agent[Any, Any], settings: Settings, llm: LLMClient, options: WorkerOptions
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    url = display_url(settings.resolved_nats_url())
    agent_id = new_agent_id(agent.capability)
    log.info(
        "starting agent %s (%s): NATS %s, LLM %s, concurrency %d, ack_wait %gs, max_deliver %d",
        agent.capability,
        agent_id,
        url or "(not configured)",
        getattr(llm, "model", type(llm).__name__),
        options.concurrency,
        options.ack_wait,
        options.max_deliver,
    )
    try:
        await run_worker(
            agent,
            settings,
            concurrency=options.concurrency,
            ack_wait=options.ack_wait,
            max_deliver=options.max_deliver,
            shutdown_grace=options.shutdown_grace,
            stop=stop,
            llm=llm,
            agent_id=agent_id,
        )
    except (NatsUnavailableError, AgentConfigError) as exc:
        sys.stderr.write(f"cairn agent {agent.capability}: {exc}\n")
        return 2
    finally:
        if isinstance(llm, ClosableLLMClient):
            await llm.aclose()
    if not stop.is_set():
        log.error("agent %s stopped: the NATS connection was closed", agent_id)
        return 1
    log.info("agent %s stopped", agent_id)
    return 0


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
