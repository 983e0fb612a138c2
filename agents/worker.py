"""The worker runtime: serve one agent on its capability's shared JetStream consumer.

Its options (`WorkerOptions`), the capability's durable consumer, and `run_worker`: connect,
declare, then run independent pull loops until stopped, handing each task message to
`tasks.TaskHandler` (validate, run, publish the result, then ack). `process.main` runs an agent
as a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError

from cairn.agents.base import Agent, check_agent
from cairn.agents.errors import AgentConfigError
from cairn.agents.llm import ClosableLLMClient, LLMClient, llm_from_env, llm_from_settings
from cairn.agents.tasks import TaskHandler, quietly
from cairn.events import TASKS_STREAM, agent_consumer, task_subject
from cairn.runtime.connection import NatsUnavailableError, connect, display_url
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
from cairn.runtime.streams import wait_for_streams
from cairn.runtime.waiting import connect_when_up

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
    start_timeout: float | None = None,
) -> None:
    """Serve `agent` until `stop` is set (or the task running this is cancelled).

    Connects to NATS (with `Settings`, as the capability's role `agent-<capability>`),
    waiting up to `start_timeout` seconds (0: no limit; None: the settings' `start_timeout`,
    or no wait when given only a URL) while it cannot be reached, with one line saying so;
    then `NatsUnavailableError`. Refused credentials raise at once. It declares cairn's
    streams and the capability's consumer, then runs `concurrency` independent pull loops.
    `on_ready(agent_id)` is called once the consumer is bound. On stop: no new fetches,
    in-flight tasks get `shutdown_grace` seconds to finish (unfinished ones are handed back,
    never acked), then the connection is drained. `llm` defaults to the settings'
    (`llm_from_settings`; given only a URL, `llm_from_env()`), closed on exit; a client
    passed in is left to its owner. With `Settings`, the loops touch `settings.health_file`
    as they turn.
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
    if start_timeout is None and settings is not None:
        start_timeout = settings.start_timeout
    try:
        name = f"cairn-agent-{agent_id}"
        if start_timeout is None:
            nc = await connect(endpoint, name=name)
        else:
            waiting = connect_when_up(
                _endpoint_of(settings, capability, endpoint), name, start_timeout, log.warning
            )
            nc = await _unless_stopped(waiting, stop)
            if nc is None:
                return  # stopped while waiting for NATS
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
        tasks = TaskHandler(agent, nc, js, client, agent_id, options.ack_wait)
        health_file = settings.health_file if settings is not None else None
        worker = _Worker(nc, tasks, health_file)
        await worker.serve(subs, stop or asyncio.Event(), options.shutdown_grace, fetch_timeout)
    finally:
        for sub in subs:
            await quietly(sub.unsubscribe())
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout=5)
            except Exception as exc:  # a drain cut short must not hide why we are exiting
                log.debug("drain did not finish (%s); closing", exc)
                await quietly(nc.close())
        if owned_llm and isinstance(client, ClosableLLMClient):
            await client.aclose()


async def _unless_stopped(
    connecting: Coroutine[Any, Any, Client], stop: asyncio.Event | None
) -> Client | None:
    """The connection, or None when `stop` is set first (SIGTERM while waiting for NATS)."""
    if stop is None:
        return await connecting
    task = asyncio.ensure_future(connecting)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def _endpoint_of(
    settings: Settings | None, capability: str, given: NatsEndpoint | str | None
) -> Callable[[], NatsEndpoint]:
    """Where to connect, asked again before each attempt: with settings, the embedded
    server's URL file may appear while the agent waits."""
    if settings is not None:
        return lambda: settings.nats_endpoint(agent_role(capability))
    fixed = given if isinstance(given, NatsEndpoint) else NatsEndpoint(url=given)
    return lambda: fixed


async def _declare(
    js: JetStreamContext, capability: str, options: WorkerOptions, url: str | None
) -> None:
    try:
        await wait_for_streams(
            js,
            on_wait=lambda missing: log.info(
                "waiting for cairn's streams (%s): the coordinator creates them", ", ".join(missing)
            ),
        )
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
    """The pull loops of one running worker; `tasks` handles what they fetch."""

    def __init__(self, nc: Client, tasks: TaskHandler, health_file: Path | None) -> None:
        self.nc = nc
        self.tasks = tasks
        self.in_flight = 0
        self.heartbeat = Heartbeat(health_file)  # for a container's health check

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
            await quietly(sub.unsubscribe())

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
            await self.tasks.process(msg)
        except Exception:
            log.exception("unexpected error on a task message; it stays unacked for redelivery")
        finally:
            self.in_flight -= 1
