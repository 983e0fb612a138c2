"""Bad input on every subject the coordinator listens to, against real processes (issue 3).

Commands (`cairn.cmd.*`, request/reply) and results (`cairn.result.<capability>.<run_id>`,
JetStream):
malformed JSON, JSON of the wrong shape, an unknown protocol version, unknown runs and tasks,
oversized payloads, then hypothesis fuzzing. Every bad message gets one clear error (the reply,
for a command), a `DeadLetter` with that reason on `cairn.dlq.coordinator` (a result's on
`cairn.dlq.coordinator.<capability>`), and one more in the
count `cairn.cmd.ping` reports; none crashes the coordinator, leaves a result unacked or changes
a run. One nats-server and one coordinator process serve the whole module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from cairn.events import (
    CMD_CANCEL,
    CMD_PING,
    CMD_START,
    COORDINATOR_CONSUMER,
    DLQ_STREAM,
    MAX_PAYLOAD_BYTES,
    RESULTS_STREAM,
    CommandReply,
    DeadLetter,
    Event,
    TaskDispatched,
    TaskResult,
    WorkflowSpec,
    dlq_subject,
    result_capability,
    result_subject,
)
from cairn.runtime.client import CairnClient
from cairn.runtime.embedded import EmbeddedNats, free_port, nats_server_binary
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import EXAMPLE_AGENTS, Supervisor

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

COORDINATOR_DLQ = dlq_subject("coordinator")
# DeadLetters keeps this much of a bad payload.
EXCERPT = 64 * 1024
# A run that waits at its first step for as long as the tests last: no agent serves "nobody".
IDLE_WORKFLOW: dict[str, Any] = {
    "name": "idle",
    "steps": [{"name": "wait", "capability": "nobody", "timeout_s": 3600}],
}
IDLE_RUN = uuid.uuid4()
NEVER_STARTED = uuid.uuid4()


def excerpt(payload: bytes) -> str:
    """What a dead letter keeps of a payload."""
    return payload[:EXCERPT].decode("utf-8", errors="replace")


class DeadLetterReader:
    """An ordered push consumer on CAIRN_DLQ (`cairn.dlq.>`) that keeps what it was not asked
    for yet, so letters can be claimed in any order."""

    def __init__(self) -> None:
        self._arrived: asyncio.Queue[tuple[str, DeadLetter]] = asyncio.Queue()
        self._unclaimed: list[tuple[str, DeadLetter]] = []
        self._sub: Subscription | None = None

    async def open(self, js: JetStreamContext) -> DeadLetterReader:
        async def on_letter(msg: Msg) -> None:
            self._arrived.put_nowait((msg.subject, DeadLetter.model_validate_json(msg.data)))

        self._sub = await js.subscribe(
            "cairn.dlq.>",
            stream=DLQ_STREAM,
            cb=on_letter,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
        )
        return self

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def claim(self, subject: str, payload: bytes, timeout: float = 5.0) -> DeadLetter:
        """The dead letter about `payload` received on `subject`, published on the coordinator's
        DLQ subject."""

        def matches(item: tuple[str, DeadLetter]) -> bool:
            _, letter = item
            return letter.subject == subject and letter.payload == excerpt(payload)

        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for item in self._unclaimed:
                if matches(item):
                    self._unclaimed.remove(item)
                    dlq, letter = item
                    capability = result_capability(subject)
                    expected = dlq_subject(f"coordinator.{capability}") if capability else None
                    assert dlq == (expected or COORDINATOR_DLQ), dlq
                    return letter
            left = deadline - asyncio.get_running_loop().time()
            try:
                self._unclaimed.append(await asyncio.wait_for(self._arrived.get(), left))
            except TimeoutError:
                others = [(letter.subject, letter.reason) for _, letter in self._unclaimed]
                raise AssertionError(
                    f"no dead letter within {timeout}s for {payload[:80]!r} on {subject}; "
                    f"unclaimed: {others}"
                ) from None


@dataclass
class Cairn:
    """The system under test and the ways to look at it."""

    settings: Settings
    supervisor: Supervisor
    client: CairnClient
    js: JetStreamContext
    dlq: DeadLetterReader
    store: EventStore

    async def request(self, subject: str, payload: bytes, timeout: float = 5.0) -> CommandReply:
        msg = await self.client.nc.request(subject, payload, timeout=timeout)
        return CommandReply.model_validate_json(msg.data)

    async def dead_letters(self) -> int:
        count: int = (await self.client.ping())["dead_letters"]
        return count

    def events(self, run_id: uuid.UUID) -> list[Event]:
        return self.store.load(run_id)

    def assert_alive(self) -> None:
        exited = self.supervisor.exited()
        assert not exited, (exited, self.supervisor.log_tail("coordinator", 30))

    async def results_settled(self) -> None:
        """Wait until the coordinator has acked every result (the stream is a work queue)."""
        await eventually(self._results_settled, what="every result acked")

    async def _results_settled(self) -> bool:
        info = await self.js.consumer_info(RESULTS_STREAM, COORDINATOR_CONSUMER)
        return info.num_pending == 0 and info.num_ack_pending == 0


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll a cheap async condition until it holds; fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def coordinator_on(url: str, home: Path) -> AsyncIterator[Cairn]:
    settings = Settings(home=home, nats_url=url)
    supervisor = Supervisor(settings)
    supervisor.start("coordinator", "cairn.coordinator")
    client: CairnClient | None = None
    dlq = DeadLetterReader()
    store: EventStore | None = None
    try:
        client = await CairnClient.connect(url, "cairn-bad-input")
        await client.wait_ready(timeout=30)
        js = client.nc.jetstream()
        await dlq.open(js)
        store = EventStore(settings.store)
        yield Cairn(settings, supervisor, client, js, dlq, store)
    finally:
        await dlq.close()
        if client is not None:
            await client.close()
        supervisor.stop_all(timeout=5)
        if store is not None:
            store.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cairn(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cairn]:
    root = tmp_path_factory.mktemp("bad-input")
    with EmbeddedNats(root / "nats") as server:
        async with coordinator_on(server.url, root / "home") as system:
            yield system


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def idle_run(cairn: Cairn) -> list[Event]:
    """A run waiting at its first step; bad input must never change its events."""
    reply = await cairn.client.start_run(
        WorkflowSpec.model_validate(IDLE_WORKFLOW), {"topic": "x"}, run_id=IDLE_RUN
    )
    assert reply.ok, reply.error

    # Nobody serves "nobody": a few seconds on, the run records that it waits, and then
    # nothing more (once per attempt), so its events stand still for the rest of the module.
    async def waits_recorded() -> bool:
        return len(cairn.events(IDLE_RUN)) >= 3

    await eventually(waits_recorded, timeout=30, what="CapabilityUnserved")
    events = cairn.events(IDLE_RUN)
    names = [e.type_name() for e in events]
    assert names == ["RunStarted", "TaskDispatched", "CapabilityUnserved"]
    return events


def start(**changes: Any) -> bytes:
    """A start command for the idle workflow, with some fields changed."""
    command = {"v": 1, "run_id": str(uuid.uuid4()), "workflow": IDLE_WORKFLOW, "input": {}}
    return json.dumps({**command, **changes}).encode()


def cancel(**changes: Any) -> bytes:
    """A cancel command for the idle run, with some fields changed."""
    return json.dumps({"v": 1, "run_id": str(IDLE_RUN), **changes}).encode()


BAD_COMMANDS = [
    pytest.param(CMD_START, b'{"workflow": "research-report",',
                 "start command is not valid JSON: EOF while parsing", id="start-malformed"),
    pytest.param(CMD_START, b"\xff\xfe{}",
                 "start command is not valid JSON: ", id="start-not-utf8"),
    pytest.param(CMD_START, b"",
                 "start command is not valid JSON: EOF while parsing a value", id="start-empty"),
    pytest.param(CMD_START, start(input={"topic": float("nan")}),
                 "start command is not valid JSON: input.topic is NaN, Infinity or out of range",
                 id="start-nan"),
    pytest.param(CMD_START, b'{"workflow": "idle", "input": {"n": 1e999}}',
                 "start command is not valid JSON: input.n is NaN, Infinity or out of range",
                 id="start-overflowing-number"),
    pytest.param(CMD_START, b"[1, 2]",
                 "start command has the wrong shape: (root): Input should be an object",
                 id="start-array"),
    pytest.param(CMD_START, b'{"input": {}}',
                 "start command has the wrong shape: workflow: Field required",
                 id="start-no-workflow"),
    pytest.param(CMD_START, start(input="volcanoes"),
                 "start command has the wrong shape: input: Input should be an object",
                 id="start-input-not-object"),
    pytest.param(CMD_START, start(colour="red"),
                 "start command has the wrong shape: colour: Extra inputs are not permitted",
                 id="start-extra-field"),
    pytest.param(CMD_START, start(workflow={"name": "w", "steps": []}),
                 "workflow.WorkflowSpec.steps: List should have at least 1 item",
                 id="start-workflow-without-steps"),
    pytest.param(CMD_START, start(v=2),
                 "start command has an unsupported protocol version v=2 "
                 "(this coordinator speaks v=1)", id="start-v2"),
    pytest.param(CMD_START, start(workflow="no-such-workflow"),
                 "unknown workflow 'no-such-workflow'", id="start-unknown-workflow"),
    pytest.param(CMD_START, start(workflow={"name": "w", "steps": [
                     {"name": "a", "capability": "c", "input": {"x": "$steps.b.output"}}]}),
                 "refers to step 'b', which is not declared before it",
                 id="start-unknown-step-reference"),
    pytest.param(CMD_CANCEL, b"{run_id: 1}",
                 "cancel command is not valid JSON: key must be a string",
                 id="cancel-malformed"),
    pytest.param(CMD_CANCEL, cancel(run_id="run-1"),
                 "cancel command has the wrong shape: run_id: Input should be a valid UUID",
                 id="cancel-not-a-uuid"),
    pytest.param(CMD_CANCEL, cancel(reason=42),
                 "cancel command has the wrong shape: reason: Input should be a valid string",
                 id="cancel-reason-number"),
    pytest.param(CMD_CANCEL, cancel(force=True),
                 "cancel command has the wrong shape: force: Extra inputs are not permitted",
                 id="cancel-extra-field"),
    pytest.param(CMD_CANCEL, cancel(v=2),
                 "cancel command has an unsupported protocol version v=2", id="cancel-v2"),
    pytest.param(CMD_CANCEL, cancel(run_id=str(NEVER_STARTED)),
                 f"unknown run {NEVER_STARTED}", id="cancel-unknown-run"),
]  # fmt: skip


@pytest.mark.parametrize(("subject", "payload", "reason"), BAD_COMMANDS)
async def test_a_bad_command_gets_one_clear_error_a_dead_letter_and_a_count(
    cairn: Cairn, idle_run: list[Event], subject: str, payload: bytes, reason: str
) -> None:
    before = await cairn.dead_letters()
    reply = await cairn.request(subject, payload)
    assert not reply.ok
    assert reply.error is not None
    assert reason in reply.error, reply.error

    letter = await cairn.dlq.claim(subject, payload)
    assert letter.reason == reply.error
    assert letter.service == "coordinator"
    assert await cairn.dead_letters() == before + 1
    # Several of these name the idle run: none may touch it.
    assert cairn.events(IDLE_RUN) == idle_run
    cairn.assert_alive()


async def test_the_largest_payload_nats_delivers_is_answered(cairn: Cairn) -> None:
    """nats-server's default max_payload is cairn's MAX_PAYLOAD_BYTES, so the biggest command
    that can arrive is exactly at the limit: it is answered, and its dead letter keeps 64 KiB."""
    assert cairn.client.nc.max_payload == MAX_PAYLOAD_BYTES  # what the server announced
    payload = b"x" * MAX_PAYLOAD_BYTES
    before = await cairn.dead_letters()
    reply = await cairn.request(CMD_START, payload)
    assert reply.error is not None
    assert reply.error.startswith("start command is not valid JSON"), reply.error
    letter = await cairn.dlq.claim(CMD_START, payload)
    assert letter.payload == "x" * EXCERPT
    assert await cairn.dead_letters() == before + 1
    cairn.assert_alive()


async def test_a_payload_over_the_limit_is_refused_before_it_reaches_the_coordinator(
    cairn: Cairn,
) -> None:
    """One byte more and neither the client nor the server lets it through: the coordinator's own
    size check cannot fire on a server with the default limit (see the next test for one that
    allows more)."""
    too_big = b"x" * (MAX_PAYLOAD_BYTES + 1)
    before = await cairn.dead_letters()
    for subject in (CMD_START, CMD_CANCEL):
        with pytest.raises(MaxPayloadError):
            await cairn.client.nc.request(subject, too_big, timeout=2)
    with pytest.raises(MaxPayloadError):
        await cairn.js.publish(result_subject("planner", uuid.uuid4()), too_big)

    # Not only the client's check: a raw connection that skips it is refused by the server.
    url = urlparse(cairn.settings.nats_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        assert (await reader.readline()).startswith(b"INFO ")
        writer.write(
            b'CONNECT {"verbose":false}\r\nPUB %s %d\r\n' % (CMD_START.encode(), len(too_big))
        )
        await writer.drain()
        error = await asyncio.wait_for(reader.readline(), 5)
        assert error.startswith(b"-ERR 'Maximum Payload Violation'"), error
    finally:
        writer.close()
    assert await cairn.dead_letters() == before
    cairn.assert_alive()


@contextlib.contextmanager
def nats_allowing(max_payload: int, root: Path) -> Iterator[str]:
    """A nats-server whose max_payload is raised in its config file, as production servers may
    be; returns its URL."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "nats.conf"
    config.write_text(f"max_payload: {max_payload}\n")
    port, monitor = free_port(), free_port()
    args = [
        nats_server_binary(), "-c", str(config), "-a", "127.0.0.1", "-p", str(port),
        "-m", str(monitor), "-js", "-sd", str(root / "store"),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true", timeout=1
                ) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(5)


async def test_a_server_that_allows_bigger_payloads_meets_the_coordinators_limit(
    tmp_path: Path,
) -> None:
    """With max_payload raised to 2 MiB, a well-formed start command and a result of 1.5 MiB
    arrive, and the coordinator refuses them by size, not by content."""
    big_size = 3 * MAX_PAYLOAD_BYTES // 2
    with nats_allowing(2 * MAX_PAYLOAD_BYTES, tmp_path / "nats") as url:
        async with coordinator_on(url, tmp_path / "home") as big:
            assert big.client.nc.max_payload == 2 * MAX_PAYLOAD_BYTES
            command = start(input={"notes": "n" * big_size})
            reply = await big.request(CMD_START, command)
            assert reply.error == (
                f"start command of {len(command)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
            )
            letter = await big.dlq.claim(CMD_START, command)
            assert letter.reason == reply.error
            assert len(letter.payload) == EXCERPT

            run_id = uuid.uuid4()
            result = a_result(run_id, "plan", 1, output={"notes": "n" * big_size})
            subject = result_subject("planner", run_id)
            await big.js.publish(subject, result)
            letter = await big.dlq.claim(subject, result)
            assert letter.reason == (
                f"result of {len(result)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
            )
            await big.results_settled()
            assert await big.dead_letters() == 2
            assert big.events(run_id) == []
            big.assert_alive()


HUGE = b"9" * 400  # more digits than a finite float has: parses as infinity


def a_result(run_id: uuid.UUID, step: str, attempt: int, **changes: Any) -> bytes:
    now = datetime.now(UTC)
    result = TaskResult(
        task_id=f"{run_id}:{step}:{attempt}",
        run_id=run_id,
        step=step,
        attempt=attempt,
        agent_id="planner-imposter",
        output={"title": "t", "audience": "a", "questions": ["q?"]},
        started_at=now,
        finished_at=now,
    )
    return json.dumps({**json.loads(result.model_dump_json()), **changes}).encode()


async def test_bad_results_are_dead_lettered_and_acked_and_the_run_goes_on(cairn: Cairn) -> None:
    assert not any(name.startswith("agent-") for name in cairn.supervisor.processes)
    run_id = uuid.uuid4()
    reply = await cairn.client.start_run("research-report", {"topic": "glaciers"}, run_id=run_id)
    assert reply.ok, reply.error
    before = cairn.events(run_id)
    assert [e.type_name() for e in before] == ["RunStarted", "TaskDispatched"]
    plan = before[-1]
    assert isinstance(plan, TaskDispatched)
    assert plan.task_id == f"{run_id}:plan:1"

    stranger = uuid.uuid4()
    here = result_subject("planner", run_id)
    bad = [
        (here, b'{"task_id": ', "result is not valid JSON: EOF while parsing"),
        (here, b"\x00\x01garbage", "result is not valid JSON: expected value"),
        (here, b"[]", "result has the wrong shape: (root): Input should be an object"),
        (here, b'{"run_id": "%s"}' % str(run_id).encode(),
         "result has the wrong shape: task_id: Field required; step: Field required; "
         "attempt: Field required (and 3 more)"),
        (here, a_result(run_id, "plan", 1, output="a plan"),
         "result has the wrong shape: output: Input should be an object"),
        (here, a_result(run_id, "plan", 1, output={"n": float("nan")}),
         "result is not valid JSON: output.n is NaN, Infinity or out of range"),
        (here, a_result(run_id, "plan", 1).replace(b'"title": "t"', b'"title": 1e999'),
         "result is not valid JSON: output.title is NaN, Infinity or out of range"),
        (here, a_result(run_id, "plan", 1).replace(b'"title": "t"', b'"title": 9%s.0' % HUGE),
         "result is not valid JSON: output.title is NaN, Infinity or out of range"),
        (here, a_result(run_id, "plan", 1, v=2),
         "result has an unsupported protocol version v=2 (this coordinator speaks v=1)"),
        (result_subject("planner", stranger), a_result(stranger, "plan", 1),
         f"result for unknown run {stranger}"),
        (here, a_result(run_id, "plan", 1, task_id="made-up"),
         "task id made-up does not match its step and attempt"),
        (here, a_result(run_id, "polish", 1),
         f"task {run_id}:polish:1 was never dispatched in run {run_id}"),
        (here, a_result(run_id, "plan", 2),
         f"task {run_id}:plan:2 was never dispatched in run {run_id}"),
        (here, a_result(run_id, "research", 1),
         f"task {run_id}:research:1 was never dispatched in run {run_id}"),
        (here, a_result(run_id, "plan", 0),
         f"task {run_id}:plan:0 was never dispatched in run {run_id}"),
        # Numbers no model reports: refused at the door, never charged or shown.
        (here, a_result(run_id, "plan", 1, usage=[{"model": "m", "input_tokens": 10**30}]),
         "result has the wrong shape: usage.0: Value error, input_tokens is over "
         "1,000,000,000,000"),
        (here, a_result(run_id, "plan", 1).replace(
            b'"usage": []', b'"usage": [{"model": "m", "output_tokens": %s}]' % (b"7" * 4000)),
         "result has the wrong shape: usage.0: Value error, output_tokens is over "
         "1,000,000,000,000"),
        (here, a_result(run_id, "plan", 1, review="r" * 20_000),
         "result has the wrong shape: review: String should have at most 10000 characters"),
    ]  # fmt: skip
    count = await cairn.dead_letters()
    for subject, payload, _ in bad:
        await cairn.js.publish(subject, payload)
    for subject, payload, reason in bad:
        letter = await cairn.dlq.claim(subject, payload)
        assert letter.reason.startswith(reason), letter.reason
        assert letter.service == "coordinator"
    await cairn.results_settled()
    info = await cairn.js.consumer_info(RESULTS_STREAM, COORDINATOR_CONSUMER)
    assert info.num_redelivered == 0  # each was handled once, none handed back
    assert (await cairn.js.stream_info(RESULTS_STREAM)).state.messages == 0
    assert await cairn.dead_letters() == count + len(bad)
    assert cairn.events(run_id) == before
    cairn.assert_alive()

    # The run was not disturbed: real agents take it to the end.
    feed = await cairn.client.follow(run_id)
    try:
        for name in EXAMPLE_AGENTS:
            cairn.supervisor.start(f"agent-{name}", f"cairn.agents.examples.{name}")
        last = await feed.next(timeout=30)
        while last.type not in ("RunCompleted", "RunFailed", "RunCancelled"):
            last = await feed.next(timeout=30)
    finally:
        await feed.close()
    assert last.type == "RunCompleted", last
    after = cairn.events(run_id)
    assert after[: len(before)] == before
    assert [e.type_name() for e in after if e.type_name().startswith("Task")] == [
        "TaskDispatched", "TaskCompleted"
    ] * 4  # fmt: skip
    assert await cairn.dead_letters() == count + len(bad)
    cairn.assert_alive()


def huge_timeout_start(run_id: uuid.UUID) -> bytes:
    workflow = {"name": "huge", "steps": [{"name": "a", "capability": "c", "timeout_s": 1e12}]}
    return start(run_id=str(run_id), workflow=workflow)


async def test_a_command_the_coordinator_fails_on_still_gets_an_answer(cairn: Cairn) -> None:
    """A step timeout of 31,700 years passes validation, then overflows a date in the engine's
    timers: the request is answered, dead-lettered and counted all the same."""
    payload = huge_timeout_start(uuid.uuid4())
    before = await cairn.dead_letters()
    reply = await cairn.request(CMD_START, payload)
    assert not reply.ok
    assert reply.error is not None
    letter = await cairn.dlq.claim(CMD_START, payload)
    assert letter.reason == reply.error
    assert await cairn.dead_letters() == before + 1
    cairn.assert_alive()


async def test_a_step_timeout_beyond_the_calendar_is_refused_before_anything_is_stored(
    cairn: Cairn,
) -> None:
    run_id = uuid.uuid4()
    reply = await cairn.request(CMD_START, huge_timeout_start(run_id))
    assert reply.error is not None
    assert "timeout_s" in reply.error, reply.error
    assert cairn.events(run_id) == []


# -- fuzzing ----------------------------------------------------------------------------------

FUZZ = hypothesis_settings(max_examples=50, deadline=None, database=None)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
MISSING = object()


def spots(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document, and one new key in each object."""
    found = [path] if path else []
    if isinstance(value, dict):
        found.append((*path, "surprise"))
        for key, item in value.items():
            found.extend(spots(item, (*path, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(spots(item, (*path, index)))
    return found


def changed(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of a JSON document with one place replaced, added or (new is MISSING) removed."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    if rest:
        copy[head] = changed(copy[head], rest, new)
    elif new is MISSING and isinstance(copy, dict):
        copy.pop(head, None)
    elif new is MISSING:
        del copy[head]
    else:
        copy[head] = new
    return copy


def almost(valid: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A valid message with one field (at any depth) changed, added or removed."""
    return st.builds(
        lambda path, new: changed(valid, path, new),
        st.sampled_from(spots(valid)),
        json_values | st.just(MISSING),
    )


def documents(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """JSON: arbitrary values, objects with random keys, and almost valid messages."""
    return st.one_of(
        json_values, st.dictionaries(st.text(max_size=12), json_values, max_size=6), almost(valid)
    ).map(lambda doc: json.dumps(doc).encode())


FUZZ_RUN = uuid.uuid4()
VALID_COMMANDS: dict[str, dict[str, Any]] = {
    CMD_START: json.loads(
        start(
            run_id=str(FUZZ_RUN),
            input={"topic": "fuzz"},
            intent={"goal": "g", "constraints": ["c"], "success_criteria": ["s"]},
            requested_by="client:fuzz",
        )
    ),
    # For a run that does not exist: even a well-formed cancel is refused.
    CMD_CANCEL: {"v": 1, "run_id": str(NEVER_STARTED), "requested_by": "client:f", "reason": "r"},
    CMD_PING: {},
}


async def check_command(cairn: Cairn, subject: str, payload: bytes) -> None:
    """Any payload gets a reply; a refusal is dead-lettered with its reason and counted."""
    before = await cairn.dead_letters()
    msg = await cairn.client.nc.request(subject, payload, timeout=5)
    if subject == CMD_PING:
        assert json.loads(msg.data)["ok"] is True
        assert await cairn.dead_letters() == before
        return
    reply = CommandReply.model_validate_json(msg.data)
    if reply.ok:  # a change that left a valid start command (or dropped its run_id)
        assert subject == CMD_START, reply
        assert reply.run_id is not None
        assert cairn.events(reply.run_id)[0].type_name() == "RunStarted"
        assert await cairn.dead_letters() == before
        return
    assert reply.error, reply
    letter = await cairn.dlq.claim(subject, payload)
    assert letter.reason == reply.error
    assert await cairn.dead_letters() == before + 1


@pytest.mark.parametrize("subject", [CMD_START, CMD_CANCEL, CMD_PING])
@FUZZ
@given(payload=st.binary(max_size=400))
async def test_fuzz_commands_with_bytes(cairn: Cairn, subject: str, payload: bytes) -> None:
    await check_command(cairn, subject, payload)
    cairn.assert_alive()


@pytest.mark.parametrize("subject", [CMD_START, CMD_CANCEL, CMD_PING])
@FUZZ
@given(data=st.data())
async def test_fuzz_commands_with_json(cairn: Cairn, subject: str, data: st.DataObject) -> None:
    payload = data.draw(documents(VALID_COMMANDS[subject]), label="payload")
    await check_command(cairn, subject, payload)
    cairn.assert_alive()


# A result for the idle run's step that was never dispatched (attempt 2): any one change to it
# names an unknown run, an unknown step, a task id that does not match, or is malformed.
NEVER_DISPATCHED = json.loads(
    a_result(IDLE_RUN, "wait", 2, usage=[{"model": "m", "input_tokens": 1, "output_tokens": 2}])
)


@FUZZ
@given(payload=st.binary(max_size=400) | documents(NEVER_DISPATCHED))
async def test_fuzz_results(cairn: Cairn, idle_run: list[Event], payload: bytes) -> None:
    subject = result_subject("planner", uuid.uuid4())
    before = await cairn.dead_letters()
    await cairn.js.publish(subject, payload)
    letter = await cairn.dlq.claim(subject, payload)
    assert letter.reason
    await cairn.results_settled()
    assert await cairn.dead_letters() == before + 1
    assert cairn.events(IDLE_RUN) == idle_run
    cairn.assert_alive()
