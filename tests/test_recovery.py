"""The coordinator dies with SIGKILL at the worst moments; a restarted one goes on from the log:
no task lost, none sent twice, timers rebuilt from state."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest

from cairn.coordinator.outbox import OUTBOX_POSITION
from cairn.events import TASKS_STREAM, Intent, TaskCompleted, TaskDispatched, WorkflowSpec
from cairn.runtime.client import CairnClient
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import EXAMPLE_AGENTS, Supervisor

pytestmark = pytest.mark.timeout(90)

FAST_RESULTS = {"CAIRN_RESULT_ACK_WAIT": "2"}


def start_agents(sup: Supervisor) -> None:
    for name in EXAMPLE_AGENTS:
        sup.start(f"agent-{name}", f"cairn.agents.examples.{name}")


async def wait_for_exit(sup: Supervisor, name: str, timeout: float = 30) -> int:
    proc = sup.processes[name]
    deadline = asyncio.get_running_loop().time() + timeout
    while proc.poll() is None:
        assert asyncio.get_running_loop().time() < deadline, f"{name} did not exit"
        await asyncio.sleep(0.02)
    return proc.returncode


async def wait_for_event(store: EventStore, run_id: uuid.UUID, kind: str, timeout: float = 30):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        events = store.load(run_id)
        if any(e.type_name() == kind for e in events):
            return events
        assert asyncio.get_running_loop().time() < deadline, [e.type_name() for e in events]
        await asyncio.sleep(0.05)


async def tasks_published(client: CairnClient) -> int:
    """How many task messages the tasks stream accepted (duplicates dropped by Nats-Msg-Id)."""
    info = await client.nc.jetstream().stream_info(TASKS_STREAM)
    return int(info.state.last_seq)


def one_completion_per_step(events: list) -> None:  # type: ignore[type-arg]
    counts = Counter((e.step, e.attempt) for e in events if isinstance(e, TaskCompleted))
    assert counts, "no step completed"
    assert max(counts.values()) == 1, counts


async def start_demo_run(client: CairnClient) -> uuid.UUID:
    run_id = uuid.uuid4()
    reply = await client.start_run(
        "research-report", {"topic": "crash"}, intent=Intent(goal="g"), run_id=run_id
    )
    assert reply.ok, reply.error
    return run_id


async def test_killed_between_commit_and_publish(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    # Commit 1 starts the run; commit 2 records the plan's result and dispatches research.
    supervisor.start(
        "coordinator", "cairn.coordinator", {**FAST_RESULTS, "CAIRN_CRASH_AT": "after-commit:2"}
    )
    await client.wait_ready()
    run_id = await start_demo_run(client)
    start_agents(supervisor)  # after the reply: the crash must not race the start command's
    assert await wait_for_exit(supervisor, "coordinator") == -9
    store = EventStore(settings.store)
    events = store.load(run_id)
    assert [e.step for e in events if isinstance(e, TaskDispatched)] == ["plan", "research"]
    assert await tasks_published(client) == 1  # research was committed, never published

    supervisor.start("coordinator", "cairn.coordinator", FAST_RESULTS)
    events = await wait_for_event(store, run_id, "RunCompleted")
    dispatched = [e for e in events if isinstance(e, TaskDispatched)]
    assert [d.step for d in dispatched] == ["plan", "research", "write", "review"]
    assert await tasks_published(client) == len(dispatched)  # nothing lost, nothing twice
    one_completion_per_step(events)
    store.close()


async def test_killed_after_publish_before_the_position_is_saved(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    supervisor.start(
        "coordinator",
        "cairn.coordinator",
        {**FAST_RESULTS, "CAIRN_CRASH_AT": "after-publish:2", "CAIRN_OUTBOX_SAVE_INTERVAL": "60"},
    )
    await client.wait_ready()
    run_id = await start_demo_run(client)
    start_agents(supervisor)  # after the reply: the crash must not race the start command's
    assert await wait_for_exit(supervisor, "coordinator") == -9
    store = EventStore(settings.store)
    research = next(
        i
        for i, e in enumerate(store.load(run_id))
        if isinstance(e, TaskDispatched) and e.step == "research"
    )
    # The relay had not saved its position past research's dispatch: a restart republishes it.
    assert store.position(OUTBOX_POSITION) < store.last_position()
    assert research > 0

    supervisor.start("coordinator", "cairn.coordinator", FAST_RESULTS)
    events = await wait_for_event(store, run_id, "RunCompleted")
    dispatched = [e for e in events if isinstance(e, TaskDispatched)]
    assert await tasks_published(client) == len(dispatched)  # the repeat was dropped
    one_completion_per_step(events)
    store.close()


async def test_killed_between_receiving_a_result_and_appending_it(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    env = {**FAST_RESULTS, "CAIRN_CRASH_AT": "before-commit:2"}
    supervisor.start("coordinator", "cairn.coordinator", env)
    await client.wait_ready()
    run_id = await start_demo_run(client)
    start_agents(supervisor)  # after the reply: the crash must not race the start command's
    assert await wait_for_exit(supervisor, "coordinator") == -9
    store = EventStore(settings.store)
    assert [e.type_name() for e in store.load(run_id)] == ["RunStarted", "TaskDispatched"]

    supervisor.start("coordinator", "cairn.coordinator", FAST_RESULTS)
    events = await wait_for_event(store, run_id, "RunCompleted")
    one_completion_per_step(events)
    assert [e.step for e in events if isinstance(e, TaskDispatched)] == [
        "plan",
        "research",
        "write",
        "review",
    ]
    store.close()


GHOST = WorkflowSpec.model_validate(
    {
        "name": "ghost",
        "steps": [
            {
                "name": "wait",
                "capability": "ghost",  # no agent serves it: only the timeout can end the step
                "timeout_s": 1.5,
                "retry": {"max_attempts": 2, "backoff_s": 0.2},
            }
        ],
    }
)


async def test_timeouts_fire_and_survive_a_coordinator_restart(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    supervisor.start("coordinator", "cairn.coordinator")
    await client.wait_ready()
    run_id = uuid.uuid4()
    reply = await client.start_run(GHOST, {}, run_id=run_id)
    assert reply.ok, reply.error
    store = EventStore(settings.store)
    await wait_for_event(store, run_id, "TaskDispatched")
    # Kill it while the timeout is pending; the timer lives only in memory.
    supervisor.processes["coordinator"].kill()
    await wait_for_exit(supervisor, "coordinator")
    supervisor.start("coordinator", "cairn.coordinator")
    events = await wait_for_event(store, run_id, "RunFailed")
    kinds = [e.type_name() for e in events]
    assert kinds == [
        "RunStarted",
        "TaskDispatched",
        "TaskTimedOut",
        "RetryScheduled",
        "TaskDispatched",
        "TaskTimedOut",
        "RunFailed",
    ]
    store.close()


async def test_sigterm_stops_cleanly_and_saves_the_outbox_position(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    supervisor.start("coordinator", "cairn.coordinator", {"CAIRN_OUTBOX_SAVE_INTERVAL": "60"})
    await client.wait_ready()
    run_id = await start_demo_run(client)  # no agents: the run waits at its first step
    store = EventStore(settings.store)
    assert store.position(OUTBOX_POSITION) < store.last_position()
    supervisor.processes["coordinator"].terminate()
    assert await wait_for_exit(supervisor, "coordinator") == 0
    # Everything published was recorded as published: a restart republishes nothing.
    assert store.position(OUTBOX_POSITION) == store.last_position()
    assert [e.type_name() for e in store.load(run_id)] == ["RunStarted", "TaskDispatched"]
    store.close()
