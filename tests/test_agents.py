"""The agent SDK and worker runtime against a real nats-server.

Workers run in-process (`run_worker`) where the test needs to reach into the agent, and as
real processes (`python -m cairn.agents.examples.planner`, a script) where the test kills or signals
them. Nothing waits by sleeping: tests wait for messages, log lines or events, with timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from cairn.agents import (
    EXAMPLE_AGENTS,
    Agent,
    NonRetryableError,
    OfflineModel,
    TaskContext,
    example_agent,
    run_agent_process,
    run_worker,
)
from cairn.agents.examples.contracts import Draft, Plan, draft_word_count
from cairn.events import (
    DLQ_STREAM,
    RESULTS_STREAM,
    TASKS_STREAM,
    DeadLetter,
    Frozen,
    Intent,
    TaskEnvelope,
    TaskResult,
    agent_consumer,
    dlq_subject,
    result_subject,
    task_subject,
)
from cairn.events.contracts import resolve_contract
from cairn.runtime.connection import NatsUnavailableError, connect
from cairn.runtime.embedded import EmbeddedNats, free_port, nats_server_binary
from cairn.runtime.streams import declare_streams

INTENT = Intent(
    goal="Explain heat pumps to homeowners",
    success_criteria=["explains how heat pumps work", "mentions running costs"],
)
PLAN_INPUT = {"goal": INTENT.goal, "topic": "heat pumps", "audience": "homeowners"}


# -- fixtures and helpers --------------------------------------------------------------------


# `nats_server` (a fresh JetStream server per test) comes from conftest.py.


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await connect(nats_server.url, "test")
    await declare_streams(client.jetstream())
    yield client
    await client.close()


def envelope(
    capability: str,
    input: dict[str, Any],
    *,
    run_id: uuid.UUID | None = None,
    step: str = "step",
    attempt: int = 1,
    timeout_s: float = 30.0,
    repair: list[str] | None = None,
) -> TaskEnvelope:
    run_id = run_id or uuid.uuid4()
    return TaskEnvelope(
        task_id=f"{run_id}:{step}:{attempt}",
        run_id=run_id,
        step=step,
        attempt=attempt,
        capability=capability,
        input=input,
        intent=INTENT,
        repair=repair or [],
        timeout_s=timeout_s,
    )


async def publish(js: JetStreamContext, task: TaskEnvelope) -> None:
    await js.publish(task_subject(task.capability), task.model_dump_json().encode())


class Inbox:
    """An ephemeral JetStream pull consumer on one subject, read message by message."""

    def __init__(self, js: JetStreamContext, subject: str, stream: str) -> None:
        self.js, self.subject, self.stream = js, subject, stream
        self.sub: JetStreamContext.PullSubscription | None = None

    async def open(self) -> Inbox:
        self.sub = await self.js.pull_subscribe(self.subject, stream=self.stream)
        return self

    async def next_raw(self, within: float = 10.0) -> bytes:
        assert self.sub is not None
        [msg] = await self.sub.fetch(1, timeout=within)
        await msg.ack()
        return msg.data

    async def result(self, within: float = 10.0) -> TaskResult:
        return TaskResult.model_validate_json(await self.next_raw(within))

    async def close(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()


@contextlib.asynccontextmanager
async def results(js: JetStreamContext, run_id: uuid.UUID) -> AsyncIterator[Inbox]:
    inbox = await Inbox(js, result_subject("*", run_id), RESULTS_STREAM).open()
    try:
        yield inbox
    finally:
        await inbox.close()


@dataclass
class RunningWorker:
    agent_id: str
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def shutdown(self, within: float = 10.0) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, within)


@contextlib.asynccontextmanager
async def worker(agent: Agent[Any, Any], url: str, **options: Any) -> AsyncIterator[RunningWorker]:
    """Run `agent` in this process until the block ends; yields once its consumer is bound."""
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_worker(
            agent,
            url,
            stop=stop,
            llm=OfflineModel(),
            on_ready=ready.set_result,
            fetch_timeout=options.pop("fetch_timeout", 0.5),
            **options,
        )
    )
    starting: set[asyncio.Future[Any]] = {task, ready}
    await asyncio.wait(starting, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises why it did not start
    running = RunningWorker(agent_id=ready.result(), stop=stop, task=task)
    try:
        yield running
    finally:
        if not task.done():
            await running.shutdown()


async def agent_consumer_info(js: JetStreamContext, capability: str) -> ConsumerInfo:
    info: ConsumerInfo = await js.consumer_info(TASKS_STREAM, agent_consumer(capability))
    return info


def assert_all_settled(info: ConsumerInfo) -> None:
    """Every task message was acked (or terminated): nothing waits, nothing is in flight."""
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


# -- test agents -----------------------------------------------------------------------------


class Job(Frozen):
    n: int = 0
    mode: str = "ok"


class Done(Frozen):
    n: int
    delivery: int
    agent_id: str


class Board:
    """Shared between test agents and the test: who started what, and a gate to hold them."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.changed = asyncio.Condition()
        self.gate = asyncio.Event()

    async def record(self, agent_id: str, n: int) -> None:
        async with self.changed:
            self.started.append((agent_id, n))
            self.changed.notify_all()

    async def wait_started(self, count: int, within: float = 10.0) -> None:
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(lambda: len(self.started) >= count)


class Gated(Agent[Job, Done]):
    """Records each task it starts, then waits for the board's gate."""

    capability = "gated"

    def __init__(self, board: Board) -> None:
        self.board = board

    async def handle(self, task: Job, ctx: TaskContext) -> Done:
        await self.board.record(ctx.agent_id, task.n)
        await self.board.gate.wait()
        return Done(n=task.n, delivery=ctx.delivery, agent_id=ctx.agent_id)


class Slow(Agent[Job, Done]):
    """Takes `seconds` per task, reporting each start on the board."""

    capability = "slow"

    def __init__(self, board: Board, seconds: float) -> None:
        self.board, self.seconds = board, seconds

    async def handle(self, task: Job, ctx: TaskContext) -> Done:
        await self.board.record(ctx.agent_id, task.n)
        await asyncio.sleep(self.seconds)  # simulated work, not a wait for anything
        return Done(n=task.n, delivery=ctx.delivery, agent_id=ctx.agent_id)


class Moody(Agent[Job, Done]):
    """Fails in the way its input asks for."""

    capability = "moody"

    async def handle(self, task: Job, ctx: TaskContext) -> Done:
        await ctx.llm.complete("s", "spend some tokens first")
        if task.mode == "raise":
            raise RuntimeError("the upstream service is down")
        if task.mode == "permanent":
            raise NonRetryableError("this document can never be parsed")
        if task.mode == "hang":
            await asyncio.Event().wait()
        if task.mode == "bad-output":
            return {"n": "not a number"}  # type: ignore[return-value]
        return Done(n=task.n, delivery=ctx.delivery, agent_id=ctx.agent_id)


# -- the SDK without NATS --------------------------------------------------------------------


async def test_context_reports_llm_usage_per_model() -> None:
    ctx = TaskContext(envelope("planner", PLAN_INPUT), llm=OfflineModel(), agent_id="planner-1")
    first = await ctx.llm.complete("system", "a prompt about rivers")
    second = await ctx.llm.complete("system", "another prompt about lakes")
    ctx.report_usage("embedder-1", 100, 0)
    assert [u.model_dump() for u in ctx.usage] == [
        {
            "model": "cairn-offline-1",
            "input_tokens": first.input_tokens + second.input_tokens,
            "output_tokens": first.output_tokens + second.output_tokens,
        },
        {"model": "embedder-1", "input_tokens": 100, "output_tokens": 0},
    ]
    with pytest.raises(ValueError, match="negative"):
        ctx.report_usage("m", -1, 0)


def test_agent_models_come_from_the_type_arguments() -> None:
    assert (Gated.input_model, Gated.output_model) == (Job, Done)
    planner = example_agent("planner")
    assert planner.output_model is Plan
    assert sorted(EXAMPLE_AGENTS) == ["planner", "researcher", "reviewer", "writer"]


async def test_a_bad_capability_is_refused_before_connecting() -> None:
    class Dotted(Moody):
        capability = "has.dots"

    with pytest.raises(TypeError, match="capability"):
        await run_worker(Dotted(), "nats://127.0.0.1:1")


async def test_example_agents_chain_into_a_reviewed_report() -> None:
    """The research-report workflow's data flow, with each output checked by its contract."""

    async def run(name: str, input: dict[str, Any], repair: list[str] | None = None) -> Any:
        agent = example_agent(name)
        task = envelope(name, input, repair=repair)
        ctx = TaskContext(task, llm=OfflineModel(), agent_id=f"{name}-test")
        output = await agent.handle(agent.input_model.model_validate(input), ctx)
        [usage] = ctx.usage
        assert usage.input_tokens > 0
        assert usage.output_tokens > 0
        return output.model_dump(mode="json")

    async def pipeline() -> list[Any]:
        plan = await run("planner", {**PLAN_INPUT, "audience": None})
        research = await run("researcher", {"topic": "heat pumps", "questions": plan["questions"]})
        draft = await run(
            "writer",
            {
                "title": plan["title"],
                "audience": plan["audience"],
                "findings": research["findings"],
            },
        )
        review = await run(
            "reviewer", {"draft": draft, "success_criteria": INTENT.success_criteria}
        )
        return [plan, research, draft, review]

    outputs = await pipeline()
    for contract, output in zip(
        ["Plan@1", "Research@1", "Draft@1", "Review@1"], outputs, strict=True
    ):
        resolve_contract(contract).model_validate(output)
    plan, research, draft, review = outputs
    assert 3 <= len(plan["questions"]) <= 5
    assert plan["audience"] == "general readers"
    assert [f["question"] for f in research["findings"]] == plan["questions"]
    assert len(draft["sections"]) == len(research["findings"])
    assert draft["word_count"] == draft_word_count(Draft.model_validate(draft).sections)
    assert 0 <= review["score"] <= 1
    assert outputs == await pipeline()  # offline, the whole chain is deterministic

    repaired = await run(
        "planner", PLAN_INPUT, repair=["questions: List should have at least 1 item"]
    )
    Plan.model_validate(repaired)


# -- the worker on NATS ----------------------------------------------------------------------


async def test_planner_answers_a_task_and_acks_it(nats_server: EmbeddedNats, nc: Client) -> None:
    js = nc.jetstream()
    task = envelope("planner", PLAN_INPUT, step="plan")
    async with (
        worker(example_agent("planner"), nats_server.url) as running,
        results(js, task.run_id) as inbox,
    ):
        await publish(js, task)
        result = await inbox.result()
        await running.shutdown()  # in-flight work, the ack included, ends before it returns

    assert result.error is None
    plan = Plan.model_validate(result.output)
    assert plan.audience == "homeowners"
    assert (result.task_id, result.run_id, result.step, result.attempt) == (
        task.task_id,
        task.run_id,
        "plan",
        1,
    )
    assert result.agent_id == running.agent_id
    assert re.fullmatch(r"planner-[0-9a-f]{6}", result.agent_id)
    [usage] = result.usage
    assert usage.model == "cairn-offline-1"
    assert usage.input_tokens > 0
    assert usage.output_tokens > 0
    assert result.started_at.tzinfo is not None
    assert result.started_at <= result.finished_at
    info = await agent_consumer_info(js, "planner")
    assert_all_settled(info)
    assert info.num_redelivered == 0
    assert (info.config.ack_wait, info.config.max_deliver) == (30, 5)
    assert info.config.filter_subject == "cairn.task.planner"
    assert (await js.stream_info(TASKS_STREAM)).state.messages == 0


async def test_two_replicas_share_the_work(nats_server: EmbeddedNats, nc: Client) -> None:
    js = nc.jetstream()
    board = Board()
    run_id = uuid.uuid4()
    tasks = [envelope("gated", {"n": n}, run_id=run_id, step=f"s{n}") for n in range(6)]
    async with (
        worker(Gated(board), nats_server.url, concurrency=1) as first,
        worker(Gated(board), nats_server.url, concurrency=1) as second,
        results(js, run_id) as inbox,
    ):
        for task in tasks:
            await publish(js, task)
        # Each replica holds one task at a time and none can finish before the gate opens:
        # two tasks started means both replicas are working.
        await board.wait_started(2)
        assert {agent for agent, _ in board.started} == {first.agent_id, second.agent_id}
        board.gate.set()
        done = [await inbox.result() for _ in tasks]

    assert sorted(Done.model_validate(r.output).n for r in done) == list(range(6))
    assert {r.agent_id for r in done} == {first.agent_id, second.agent_id}
    assert_all_settled(await agent_consumer_info(js, "gated"))


async def test_a_bad_envelope_is_dead_lettered_and_the_worker_goes_on(
    nats_server: EmbeddedNats, nc: Client
) -> None:
    js = nc.jetstream()
    good = envelope("planner", PLAN_INPUT)
    elsewhere = envelope("researcher", {"topic": "x", "questions": ["why?"]})
    bad = {
        b"{not json": "malformed JSON",
        b"[1, 2]": "expected a JSON object (a TaskEnvelope), got a JSON array",
        good.model_dump_json().replace('"v":1', '"v":2').encode(): "unknown protocol version v=2",
        b'{"task_id": "t-1"}': "not a valid TaskEnvelope: run_id: Field required",
        elsewhere.model_dump_json().encode(): "envelope is for capability 'researcher'",
    }
    dlq = await Inbox(js, dlq_subject("agent.planner"), DLQ_STREAM).open()
    async with (
        worker(example_agent("planner"), nats_server.url) as running,
        results(js, good.run_id) as inbox,
    ):
        for payload in bad:
            await js.publish(task_subject("planner"), payload)
        await publish(js, good)
        letters = [DeadLetter.model_validate_json(await dlq.next_raw()) for _ in bad]
        result = await inbox.result()
        await running.shutdown()
    await dlq.close()

    assert result.error is None
    Plan.model_validate(result.output)
    by_payload = {letter.payload.encode(): letter for letter in letters}
    assert set(by_payload) == set(bad)
    for payload, reason in bad.items():
        letter = by_payload[payload]
        assert letter.reason.startswith(reason), letter.reason
        assert letter.subject == "cairn.task.planner"
        assert letter.service == f"agent:{running.agent_id}"
    # Terminated, not left to be redelivered.
    assert_all_settled(await agent_consumer_info(js, "planner"))


async def test_invalid_input_gets_a_non_retryable_error(
    nats_server: EmbeddedNats, nc: Client
) -> None:
    js = nc.jetstream()
    task = envelope("planner", {"topic": 42, "audience": "anyone"})
    async with (
        worker(example_agent("planner"), nats_server.url) as running,
        results(js, task.run_id) as inbox,
    ):
        await publish(js, task)
        result = await inbox.result()
        await running.shutdown()

    assert result.output is None
    assert result.error is not None
    assert result.error.retryable is False
    assert result.error.message.startswith("input does not match PlanRequest:")
    assert "goal: Field required" in result.error.message
    assert "topic: Input should be a valid string" in result.error.message
    assert result.usage == []
    assert_all_settled(await agent_consumer_info(js, "planner"))


@pytest.mark.parametrize(
    ("mode", "retryable", "message"),
    [
        ("raise", True, "the upstream service is down"),
        ("permanent", False, "this document can never be parsed"),
        ("hang", True, "moody did not finish within the task's timeout_s=0.3s"),
        ("bad-output", True, "output does not match Done: n: Input should be a valid integer"),
    ],
)
async def test_a_failing_handler_becomes_an_error_result(
    nats_server: EmbeddedNats, nc: Client, mode: str, retryable: bool, message: str
) -> None:
    js = nc.jetstream()
    task = envelope("moody", {"mode": mode}, timeout_s=0.3)
    async with worker(Moody(), nats_server.url) as running, results(js, task.run_id) as inbox:
        await publish(js, task)
        result = await inbox.result()
        await running.shutdown()

    assert result.output is None
    assert result.error is not None
    assert result.error.retryable is retryable
    assert result.error.message.startswith(message)
    # The tokens were spent even though the task failed.
    assert [u.model for u in result.usage] == ["cairn-offline-1"]
    assert_all_settled(await agent_consumer_info(js, "moody"))


async def test_a_slow_task_is_kept_alive_by_heartbeats(
    nats_server: EmbeddedNats, nc: Client
) -> None:
    js = nc.jetstream()
    board = Board()
    task = envelope("slow", {"n": 1})
    # Twice the ack deadline: without heartbeats JetStream would hand it to the idle replica.
    async with (
        worker(Slow(board, seconds=2.0), nats_server.url, concurrency=1, ack_wait=1) as busy,
        worker(Slow(board, seconds=2.0), nats_server.url, concurrency=1, ack_wait=1) as idle,
        results(js, task.run_id) as inbox,
    ):
        await publish(js, task)
        result = await inbox.result()
        await busy.shutdown()
        await idle.shutdown()

    done = Done.model_validate(result.output)
    assert done.delivery == 1
    assert len(board.started) == 1
    info = await agent_consumer_info(js, "slow")
    assert info.num_redelivered == 0
    assert_all_settled(info)


async def test_stop_lets_in_flight_tasks_finish(nats_server: EmbeddedNats, nc: Client) -> None:
    js = nc.jetstream()
    board = Board()
    task = envelope("gated", {"n": 7})
    async with worker(Gated(board), nats_server.url) as running, results(js, task.run_id) as inbox:
        await publish(js, task)
        await board.wait_started(1)
        running.stop.set()
        board.gate.set()
        await asyncio.wait_for(running.task, 10)
        result = await inbox.result()
    assert Done.model_validate(result.output).n == 7
    assert_all_settled(await agent_consumer_info(js, "gated"))


async def test_a_task_unfinished_at_shutdown_is_handed_back_at_once(
    nats_server: EmbeddedNats, nc: Client
) -> None:
    js = nc.jetstream()
    board = Board()
    task = envelope("gated", {"n": 3})
    async with worker(Gated(board), nats_server.url, shutdown_grace=0.1) as first:
        await publish(js, task)
        await board.wait_started(1)
        await first.shutdown()  # the handler never finishes: it is cancelled after the grace
    assert not board.gate.is_set()

    # ack_wait is 30 s: a result within seconds means the task was handed back, not timed out.
    board.gate.set()
    async with worker(Gated(board), nats_server.url) as second, results(js, task.run_id) as inbox:
        result = await inbox.result(within=5)
        await second.shutdown()
    assert result.agent_id == second.agent_id
    assert Done.model_validate(result.output).delivery == 2
    assert_all_settled(await agent_consumer_info(js, "gated"))


async def test_worker_updates_the_consumer_settings(nats_server: EmbeddedNats, nc: Client) -> None:
    js = nc.jetstream()
    async with worker(Moody(), nats_server.url):
        pass
    async with worker(Moody(), nats_server.url, ack_wait=2, max_deliver=3):
        info = await agent_consumer_info(js, "moody")
    assert (info.config.ack_wait, info.config.max_deliver) == (2, 3)


async def test_worker_survives_a_nats_restart(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    server = EmbeddedNats(store).start()
    try:
        await streams_made(server.url)
        async with worker(example_agent("planner"), server.url) as running:
            server.stop()
            server = EmbeddedNats(store, port=server.port).start()
            client = await connect(server.url, "test-after-restart")
            try:
                js = client.jetstream()
                task = envelope("planner", PLAN_INPUT)
                async with results(js, task.run_id) as inbox:
                    await publish(js, task)
                    result = await inbox.result(within=15)
                await running.shutdown()
                assert result.error is None
                assert result.agent_id == running.agent_id
                assert_all_settled(await agent_consumer_info(js, "planner"))
            finally:
                await client.close()
    finally:
        server.stop()


async def streams_made(url: str) -> None:
    """What the coordinator does first: cairn's streams exist."""
    client = await connect(url, "test-coordinator")
    try:
        await declare_streams(client.jetstream())
    finally:
        await client.close()


async def test_a_worker_started_before_the_coordinator_waits_for_its_streams(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cairn.agents.worker")
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_worker(example_agent("planner"), nats_server.url, stop=stop, llm=OfflineModel(),
                   on_ready=ready.set_result, fetch_timeout=0.5)
    )  # fmt: skip
    try:
        await wait_until(lambda: "waiting for cairn's streams" in caplog.text, 10, "the notice")
        assert not ready.done()
        assert not task.done()  # it waits, it does not exit
        await streams_made(nats_server.url)
        await asyncio.wait_for(asyncio.shield(ready), 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_run_worker_says_when_nats_cannot_be_reached() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(NatsUnavailableError, match=f"cannot reach NATS at {url}"):
        await run_worker(example_agent("planner"), url, llm=OfflineModel())


@pytest.fixture
def nats_without_jetstream() -> Iterator[str]:
    port, monitor = free_port(), free_port()
    args = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor)]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(monitor)
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(5)


async def test_run_worker_says_when_nats_has_no_jetstream(nats_without_jetstream: str) -> None:
    with pytest.raises(NatsUnavailableError, match=r"does not answer JetStream.*\(-js\)"):
        await run_worker(example_agent("planner"), nats_without_jetstream, llm=OfflineModel())


def wait_healthy(monitor_port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/healthz", timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # the server's readiness, polled as EmbeddedNats does


def test_run_agent_process_names_the_known_agents(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run_agent_process("poet")
    assert exited.value.code == 2
    assert "unknown agent 'poet' (known: planner, researcher, reviewer, writer)" in (
        capsys.readouterr().err
    )


# -- agents as processes ---------------------------------------------------------------------


class AgentProcess:
    """An agent running as a child process, its stderr read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.changed = asyncio.Condition()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str, env: dict[str, str]) -> AgentProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            async with self.changed:
                self.lines.append(raw.decode().rstrip())
                self.changed.notify_all()

    async def wait_for(self, pattern: str, within: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            return next((m for line in self.lines if (m := regex.search(line))), None)

        try:
            async with asyncio.timeout(within), self.changed:
                await self.changed.wait_for(lambda: found() is not None or self.reader.done())
        except TimeoutError:
            pass
        match = found()
        assert match, f"no line matching {pattern!r} in:\n" + "\n".join(self.lines)
        return match

    async def ready(self) -> str:
        return (await self.wait_for(r"agent (\S+) ready"))[1]

    async def exit_code(self, within: float = 10.0) -> int:
        code = await asyncio.wait_for(self.proc.wait(), within)
        await self.reader
        return code

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
def agent_env(tmp_path: Path, nats_server: EmbeddedNats) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAIRN_", "NATS_"))}
    env["CAIRN_CHAIN_KEY"] = os.environ["CAIRN_CHAIN_KEY"]  # the tests' one key (conftest)
    return env | {
        "NATS_URL": nats_server.url,
        "CAIRN_HOME": str(tmp_path / "home"),
        "CAIRN_LLM": "offline",
    }


@contextlib.asynccontextmanager
async def agent_process(*args: str, env: dict[str, str]) -> AsyncIterator[AgentProcess]:
    process = await AgentProcess.start(*args, env=env)
    try:
        yield process
    finally:
        process.kill()
        await process.exit_code()


async def test_planner_module_runs_as_a_process_and_stops_on_sigterm(
    nc: Client, agent_env: dict[str, str]
) -> None:
    js = nc.jetstream()
    task = envelope("planner", PLAN_INPUT)
    async with agent_process("-m", "cairn.agents.examples.planner", env=agent_env) as planner:
        agent_id = await planner.ready()
        async with results(js, task.run_id) as inbox:
            await publish(js, task)
            result = await inbox.result()
        planner.proc.send_signal(signal.SIGTERM)
        assert await planner.exit_code() == 0

    assert result.agent_id == agent_id
    Plan.model_validate(result.output)
    assert_all_settled(await agent_consumer_info(js, "planner"))
    assert "starting agent planner" in planner.lines[0]
    assert not [line for line in planner.lines if "Warning" in line or "Traceback" in line]


async def test_agent_process_exits_2_when_nats_is_unreachable(agent_env: dict[str, str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    # It waits for NATS first (tests/test_waiting.py): a short limit, then the same sentence.
    env = agent_env | {"NATS_URL": url, "CAIRN_START_TIMEOUT": "0.5"}
    async with agent_process("-m", "cairn.agents.examples.reviewer", env=env) as reviewer:
        assert await reviewer.exit_code() == 2
    assert reviewer.lines[-1] == (
        f"cairn agent reviewer: cannot reach NATS at {url}: start it (`cairn up` runs an "
        "embedded server) or point NATS_URL at a running server with JetStream enabled"
    )
    assert not [line for line in reviewer.lines if "Traceback" in line]


async def test_agent_process_rejects_bad_settings(agent_env: dict[str, str]) -> None:
    env = agent_env | {"CAIRN_AGENT_ACK_WAIT": "soon"}
    async with agent_process("-m", "cairn.agents.examples.writer", env=env) as writer:
        assert await writer.exit_code() == 2
    assert writer.lines == ["cairn agent: CAIRN_AGENT_ACK_WAIT must be a number, not 'soon'"]


SLOW_AGENT = """
    import asyncio
    import sys

    from cairn.agents import Agent, TaskContext, main
    from cairn.events import Frozen


    class Job(Frozen):
        n: int


    class Done(Frozen):
        n: int
        delivery: int
        agent_id: str


    class Sleepy(Agent[Job, Done]):
        capability = "sleepy"

        async def handle(self, task: Job, ctx: TaskContext) -> Done:
            print(f"started {ctx.task_id} delivery {ctx.delivery}", file=sys.stderr, flush=True)
            if ctx.delivery == 1:
                await asyncio.sleep(60)  # the test kills this process meanwhile
            return Done(n=task.n, delivery=ctx.delivery, agent_id=ctx.agent_id)


    if __name__ == "__main__":
        main(Sleepy)
"""


async def test_a_task_held_by_a_killed_agent_goes_to_another_replica(
    nc: Client, agent_env: dict[str, str], tmp_path: Path
) -> None:
    script = tmp_path / "sleepy_agent.py"
    script.write_text(textwrap.dedent(SLOW_AGENT))
    env = agent_env | {"CAIRN_AGENT_ACK_WAIT": "2", "CAIRN_AGENT_CONCURRENCY": "1"}
    js = nc.jetstream()
    task = envelope("sleepy", {"n": 5})
    async with (
        agent_process(str(script), env=env) as doomed,
        results(js, task.run_id) as inbox,
    ):
        await doomed.ready()
        await publish(js, task)
        await doomed.wait_for(f"started {re.escape(task.task_id)} delivery 1")
        async with agent_process(str(script), env=env) as survivor:
            survivor_id = await survivor.ready()
            doomed.kill()  # SIGKILL while the task is in hand: it was never acked
            result = await inbox.result(within=10)
            survivor.proc.send_signal(signal.SIGTERM)
            assert await survivor.exit_code() == 0

    assert result.error is None
    assert result.agent_id == survivor_id
    assert Done.model_validate(result.output) == Done(n=5, delivery=2, agent_id=survivor_id)
    assert_all_settled(await agent_consumer_info(js, "sleepy"))
