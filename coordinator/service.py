"""The coordinator service: a FastStream app taking commands by request/reply, plus the result
loop (a standing pull on the results stream) that drives the engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from faststream import FastStream
from faststream.nats import NatsBroker, NatsRouter, NatsSecurity, NatsUserPassword
from faststream.nats.annotations import NatsMessage
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from pydantic import BaseModel, ValidationError

from cairn.coordinator.engine import Coordinator
from cairn.coordinator.outbox import Outbox
from cairn.coordinator.policy import decision_policy
from cairn.coordinator.pricing import load_price_table
from cairn.coordinator.tenants import TenantLimits
from cairn.coordinator.unserved import UnservedWarnings, unserved_facts, waiting_capabilities
from cairn.coordinator.verdicts import Received
from cairn.coordinator.workflow import WorkflowCatalog, load_contract_modules
from cairn.events import (
    CMD_APPROVALS,
    CMD_APPROVE,
    CMD_BUDGET,
    CMD_CANCEL,
    CMD_DENY,
    CMD_FORK,
    CMD_PING,
    CMD_START,
    COORDINATOR_CONSUMER,
    MAX_PAYLOAD_BYTES,
    RESULTS_STREAM,
    ApprovalDecision,
    CancelRun,
    CommandReply,
    ForkRun,
    RaiseBudget,
    StartRun,
    TaskResult,
    result_capability,
)
from cairn.events.validation import validation_reason
from cairn.runtime import tracing
from cairn.runtime.capabilities import Liveness
from cairn.runtime.connection import connect_options, unreachable_message
from cairn.runtime.deadletters import DeadLetters, non_finite_reason
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.health import Heartbeat
from cairn.runtime.pull import StandingPull
from cairn.runtime.roles import ROLE_COORDINATOR, NatsEndpoint
from cairn.runtime.settings import Settings
from cairn.runtime.streams import declare_streams

log = logging.getLogger("cairn.coordinator")

COMMAND_QUEUE = "cairn-coordinator"
# How often dispatched tasks are checked for a capability nobody serves, and how long a task
# may wait for an agent (one just starting) before the run records that it waits.
UNSERVED_CHECK_S = 2.0
UNSERVED_GRACE_S = 3.0

C = TypeVar("C", bound=BaseModel)


class CoordinatorRuntime:
    """What lives between the app's start and stop: store, engine, result loop."""

    def __init__(self, settings: Settings, broker: NatsBroker) -> None:
        self.settings = settings
        self.broker = broker
        self.ready = asyncio.Event()
        self.coordinator: Coordinator | None = None
        self.dead_letters: DeadLetters | None = None
        self.store: EventStore | None = None
        self._pull: StandingPull | None = None
        self._loop: asyncio.Task[None] | None = None
        self._timers: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stop_timers = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.result_ack_wait = settings.result_ack_wait
        self._stopping = False
        self.start_handler: Callable[[Msg], Coroutine[Any, Any, None]] | None = None
        self._start_sub: Subscription | None = None
        self._starts: set[asyncio.Task[None]] = set()
        self.unserved: UnservedWarnings | None = None

    async def start(self) -> None:
        nc = self.broker.connection
        js = nc.jetstream()
        await declare_streams(js)
        await js.add_consumer(
            RESULTS_STREAM,
            ConsumerConfig(
                durable_name=COORDINATOR_CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                # How long a result handed to a coordinator that died stays invisible to the next.
                ack_wait=self.result_ack_wait,
                max_deliver=20,
                max_ack_pending=20000,
                filter_subject="cairn.result.>",
            ),
        )
        self.store = EventStore.from_settings(self.settings)
        load_contract_modules(self.settings.contract_modules)
        policy = decision_policy(load_price_table(self.settings.prices))
        catalog = WorkflowCatalog([self.settings.home / "workflows"])
        # Bounded by the streams' duplicate window, so a restart's republishing is deduplicated.
        save_interval = min(self.settings.outbox_save_interval, 60.0)
        outbox = Outbox(nc, js, self.store, save_interval_s=save_interval)
        self.dead_letters = DeadLetters(js, "coordinator")
        self.unserved = UnservedWarnings(Liveness(js))
        self.coordinator = Coordinator(
            self.store,
            policy,
            catalog,
            outbox,
            TenantLimits(self.settings.tenants),
        )
        active = self.coordinator.recover()
        republished = await self.coordinator.catch_up()
        self._pull = StandingPull(nc, RESULTS_STREAM, COORDINATOR_CONSUMER)
        await self._pull.start()
        self._loop = asyncio.create_task(self._results_loop(), name="results-loop")
        self._timers = asyncio.create_task(self._timers_after_catch_up(js), name="timers")
        self._follower = asyncio.create_task(self._follow_the_log(), name="follow")
        self._watcher = asyncio.create_task(self._watch_capabilities(), name="capabilities")
        self._start_sub = await nc.subscribe(CMD_START, queue=COMMAND_QUEUE, cb=self._on_start)
        await nc.flush()
        self.ready.set()
        log.info(
            "coordinator ready: %d active run(s), %d event(s) republished, store %s",
            active,
            republished,
            self.settings.store,
        )

    async def _timers_after_catch_up(self, js: JetStreamContext) -> None:
        """Run the timers once the results that arrived while no coordinator ran are decided.

        A step whose result was stored before its deadline must not time out because the
        coordinator was down: wait until the backlog is read, and until results a dead
        coordinator held unacked have come back (or their ack wait has passed).
        """
        assert self.coordinator is not None
        deadline = asyncio.get_running_loop().time() + self.result_ack_wait + 1
        while not self._stop_timers.is_set():
            try:
                info = await js.consumer_info(RESULTS_STREAM, COORDINATOR_CONSUMER)
                backlog = info.num_pending or 0
                held = info.num_ack_pending or 0
            except Exception:  # NATS away: keep waiting, the deadline still applies
                backlog, held = 1, 1
            late = asyncio.get_running_loop().time() > deadline
            if backlog == 0 and (held == 0 or late) and self._idle.is_set():
                break
            await asyncio.sleep(0.05)
        await self.coordinator.run_timers(self._stop_timers)

    async def _results_loop(self) -> None:
        assert self._pull is not None
        assert self.coordinator is not None
        while not self._stopping:
            msgs = await self._pull.next_batch()
            self._idle.clear()
            try:
                await self._take_results(msgs)
            except Exception:
                log.exception("handling %d result(s) failed; they will be redelivered", len(msgs))
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=1)
            finally:
                self._idle.set()

    async def _take_results(self, msgs: Sequence[Msg]) -> None:
        """One batch off the results stream: bytes to models (or dead letters), the engine's
        verdicts, then the acks. Nothing is acked before the engine has committed and published
        what the batch decided; a result another writer raced is handed back, not acked."""
        assert self.coordinator is not None
        assert self.dead_letters is not None
        received: list[Received] = []
        carriers: list[Msg] = []
        refused: list[tuple[Msg, str]] = []
        for msg in msgs:
            parsed = parse_result(msg.data)
            if isinstance(parsed, str):
                refused.append((msg, parsed))
            else:
                received.append(Received(parsed, msg.headers, result_capability(msg.subject)))
                carriers.append(msg)
        verdicts = await self.coordinator.handle_results(received) if received else []
        again: set[int] = set()
        for msg, verdict in zip(carriers, verdicts, strict=True):
            if verdict.outcome == "refused":
                refused.append((msg, verdict.reason))
            elif verdict.outcome == "again":
                again.add(id(msg))
                await msg.nak(delay=0.05)
        for msg, reason in refused:
            await self.dead_letters.send_message(result_letters(msg.subject), msg, reason)
        for msg in msgs:
            if id(msg) not in again:
                await msg.ack()

    async def _follow_the_log(self) -> None:
        """Take in what other coordinators on the same store commit (see `Coordinator.follow`);
        with one coordinator this is one cheap query per interval."""
        assert self.coordinator is not None
        interval = self.settings.follow_interval
        resend_after = self.settings.task_resend_after
        heartbeat = Heartbeat(self.settings.health_file)
        while not self._stop_timers.is_set():
            try:
                await self.coordinator.follow(resend_after)
                heartbeat.beat()
            except Exception:  # the store or NATS away for a moment: look again later
                log.exception("following the log failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_timers.wait(), interval)

    async def _watch_capabilities(self) -> None:
        """Record in each run whose dispatched task waits for a capability no live agent
        serves that it does (once per attempt; see `unserved.py`)."""
        assert self.coordinator is not None
        assert self.unserved is not None
        while not self._stop_timers.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_timers.wait(), UNSERVED_CHECK_S)
            waiting = waiting_capabilities(self.coordinator.runs.values())
            if self._stop_timers.is_set() or not waiting:
                continue
            try:
                missing = await self.unserved.liveness.unserved(waiting)
                if missing:
                    at = datetime.now(UTC)
                    runs = list(self.coordinator.runs.values())
                    facts = unserved_facts(runs, set(missing), at, UNSERVED_GRACE_S)
                    if facts:
                        await self.coordinator.fire(facts)
            except Exception:  # NATS or the store away for a moment: look again later
                log.exception("checking for unserved capabilities failed; trying again")

    async def warn_unserved(self, reply: CommandReply) -> CommandReply:
        """A started or forked run whose steps name capabilities no live agent serves: the
        reply says so (see `unserved.py`)."""
        if reply.run_id is None or self.coordinator is None or self.unserved is None:
            return reply
        return await self.unserved.warn(reply, self.coordinator.runs.get(reply.run_id))

    async def _on_start(self, msg: Msg) -> None:
        assert self.start_handler is not None
        task = asyncio.create_task(self.start_handler(msg))
        self._starts.add(task)
        task.add_done_callback(self._starts.discard)

    async def stop(self) -> None:
        """Answer the starts in hand, finish the batch in hand, ack nothing unfinished, save
        the outbox position."""
        if self._start_sub is not None:
            with contextlib.suppress(Exception):
                await self._start_sub.unsubscribe()
        if self._starts:
            await asyncio.gather(*self._starts, return_exceptions=True)
        self._stopping = True
        self._stop_timers.set()
        if self._timers is not None:
            await self._timers
        if self._follower is not None:
            await self._follower
        if self._watcher is not None:
            await self._watcher
        if self._pull is not None:
            await self._pull.stop()
        if self._loop is not None:
            await self._idle.wait()
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        if self.coordinator is not None:
            self.coordinator.outbox.save()
        if self.store is not None:
            self.store.close()


def parse_result(data: bytes) -> TaskResult | str:
    """A result message's model, or the sentence its dead letter carries."""
    if len(data) > MAX_PAYLOAD_BYTES:
        return f"result of {len(data)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
    try:
        result = TaskResult.model_validate_json(data)
    except ValidationError as exc:
        return validation_reason(exc, "result")
    return non_finite_reason(result, "result", data) or result


def _broker_options(endpoint: NatsEndpoint) -> dict[str, Any]:
    """`connect_options` as FastStream takes them: credentials and TLS go in `security`."""
    options = connect_options(endpoint)
    user, password = options.pop("user", None), options.pop("password", None)
    tls = options.pop("tls", None)
    if user is not None:
        options["security"] = NatsUserPassword(user, password or "", ssl_context=tls)
    elif tls is not None:
        options["security"] = NatsSecurity(ssl_context=tls)
    return options


def create_app(settings: Settings) -> FastStream:
    """Build the coordinator's broker, command handlers and lifecycle (no global state)."""
    endpoint = settings.nats_endpoint(ROLE_COORDINATOR)
    url = endpoint.url
    if not url:
        raise RuntimeError(unreachable_message(None))

    async def on_error(exc: Exception) -> None:
        log.warning("NATS: %s", exc)

    broker = NatsBroker(
        url,
        name="cairn-coordinator",
        error_cb=on_error,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=2,
        logger=None,
        **_broker_options(endpoint),
    )
    runtime = CoordinatorRuntime(settings, broker)
    router = NatsRouter()

    async def engine() -> Coordinator:
        await runtime.ready.wait()
        assert runtime.coordinator is not None
        return runtime.coordinator

    async def rejected(
        subject: str, body: bytes, reason: str, reply: CommandReply | None = None
    ) -> CommandReply:
        """Dead-letter a command that will not be carried out, and answer with the reason."""
        await engine()
        assert runtime.dead_letters is not None
        await runtime.dead_letters.send("coordinator", subject, body, reason)
        return reply or CommandReply(ok=False, error=reason)

    async def carry_out(
        subject: str,
        body: bytes,
        what: str,
        model: type[C],
        action: Callable[[Coordinator, C], Awaitable[CommandReply]],
    ) -> CommandReply:
        """Validate a command and carry it out; whatever goes wrong, answer with one sentence."""
        size = len(body)
        if size > MAX_PAYLOAD_BYTES:
            return await rejected(
                subject,
                body,
                f"{what} command of {size} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit",
            )
        try:
            parsed = model.model_validate_json(body)
        except ValidationError as exc:
            return await rejected(subject, body, validation_reason(exc, f"{what} command"))
        not_finite = non_finite_reason(parsed, f"{what} command", body)
        if not_finite is not None:
            return await rejected(subject, body, not_finite)
        try:
            reply = await action(await engine(), parsed)
        except Exception as exc:
            # Without an answer the requester would only see a timeout.
            log.exception("the %s command failed", what)
            return await rejected(
                subject,
                body,
                f"the coordinator failed while carrying out this {what} command "
                f"({type(exc).__name__}: {exc}); see the coordinator's log",
            )
        if not reply.ok:
            # Refused (an unknown run or workflow, a run already finished): bad input as well.
            return await rejected(subject, body, reply.error or f"{what} command refused", reply)
        return reply

    async def command(
        msg: NatsMessage,
        what: str,
        model: type[C],
        action: Callable[[Coordinator, C], Awaitable[CommandReply]],
    ) -> dict[str, Any]:
        subject = msg.raw_message.subject
        with tracing.command_span(what, subject, msg.raw_message.headers) as span:
            reply = await carry_out(subject, msg.body, what, model, action)
            tracing.record_reply(span, reply.ok, reply.error)
        return reply.model_dump(mode="json")

    async def start_run(msg: Msg) -> None:
        """Run starts are the hot command (one per run): taken on the connection directly,
        each in its own task, so those that arrive together are committed together."""
        with tracing.command_span("start", msg.subject, msg.headers) as span:
            reply = await carry_out(msg.subject, msg.data, "start", StartRun, Coordinator.start_run)
            reply = await runtime.warn_unserved(reply)
            tracing.record_reply(span, reply.ok, reply.error)
        if msg.reply:
            await msg.respond(reply.model_dump_json().encode())

    runtime.start_handler = start_run

    @router.subscriber(CMD_CANCEL, queue=COMMAND_QUEUE)
    async def cancel_run(msg: NatsMessage) -> dict[str, Any]:
        return await command(msg, "cancel", CancelRun, Coordinator.cancel_run)

    async def approve(coordinator: Coordinator, command: ApprovalDecision) -> CommandReply:
        return await coordinator.decide_approval(command, approve=True)

    async def deny(coordinator: Coordinator, command: ApprovalDecision) -> CommandReply:
        return await coordinator.decide_approval(command, approve=False)

    async def fork(coordinator: Coordinator, command: ForkRun) -> CommandReply:
        return await runtime.warn_unserved(await coordinator.fork_run(command))

    @router.subscriber(CMD_FORK, queue=COMMAND_QUEUE)
    async def fork_run(msg: NatsMessage) -> dict[str, Any]:
        return await command(msg, "fork", ForkRun, fork)

    @router.subscriber(CMD_APPROVE, queue=COMMAND_QUEUE)
    async def approve_step(msg: NatsMessage) -> dict[str, Any]:
        return await command(msg, "approve", ApprovalDecision, approve)

    @router.subscriber(CMD_DENY, queue=COMMAND_QUEUE)
    async def deny_step(msg: NatsMessage) -> dict[str, Any]:
        return await command(msg, "deny", ApprovalDecision, deny)

    @router.subscriber(CMD_BUDGET, queue=COMMAND_QUEUE)
    async def raise_budget(msg: NatsMessage) -> dict[str, Any]:
        return await command(msg, "budget", RaiseBudget, Coordinator.raise_budget)

    @router.subscriber(CMD_APPROVALS, queue=COMMAND_QUEUE)
    async def approvals(msg: NatsMessage) -> dict[str, Any]:
        coordinator = await engine()
        return CommandReply(ok=True, data=coordinator.pending_approvals()).model_dump(mode="json")

    @router.subscriber(CMD_PING, queue=COMMAND_QUEUE)
    async def ping(msg: NatsMessage) -> dict[str, Any]:
        coordinator = await engine()
        stats = coordinator.stats
        return {
            "ok": True,
            "active_runs": len(coordinator.runs),
            "results": stats.results,
            "events": stats.events,
            # Every dead letter: bad commands as well as bad results.
            "dead_letters": sum(runtime.dead_letters.counts.values())
            if runtime.dead_letters
            else 0,
            "store": json.dumps(settings.store)[1:-1],
            # Which coordinator answered: several may share the store and take commands.
            "coordinator": f"{socket.gethostname()}:{os.getpid()}",
            "batches": stats.batches,
        }

    broker.include_router(router)
    app = FastStream(broker, logger=None)
    app.after_startup(runtime.start)
    app.on_shutdown(runtime.stop)
    return app


def result_letters(subject: str) -> str:
    """The dead-letter source of a refused result: `coordinator.<capability>` for one that came
    on a capability's subject, so each capability's refused results are kept apart (a flood of
    one agent's forgeries evicts only letters about that capability, see
    DEAD_LETTERS_PER_SOURCE)."""
    capability = result_capability(subject)
    return f"coordinator.{capability}" if capability else "coordinator"
