"""Two coordinators on one PostgreSQL store and one NATS: runs spread over both, one is
SIGKILLed midway, and every run still completes with no decision taken twice."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos import COORDINATOR_ENV, TERMINAL, check_log, slow_agent_env
from nats.aio.msg import Msg
from test_store_contract import POSTGRES, drop_schema, fresh_schema, require_postgres

from cairn.coordinator.history.verify import check_chain
from cairn.events import RunCompleted, TaskDispatched
from cairn.runtime.client import CairnClient
from cairn.runtime.embedded import EmbeddedNats
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import EXAMPLE_AGENTS, Supervisor

RUNS = 50


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    require_postgres()
    schema = fresh_schema()
    yield schema
    drop_schema(schema)


@pytest.mark.timeout(180)
async def test_two_coordinators_one_killed_every_run_completes_once(
    tmp_path: Path, postgres_schema: str
) -> None:
    nats = EmbeddedNats(tmp_path / "nats").start()
    settings = Settings(
        home=tmp_path / "home",
        nats_url=nats.url,
        store_url=f"{POSTGRES}?schema={postgres_schema}",
    )
    sup = Supervisor(settings)
    env = {**COORDINATOR_ENV, "CAIRN_FOLLOW_INTERVAL": "0.1"}
    try:
        async with await CairnClient.connect(nats.url, "cairn-test") as client:
            sup.start("coordinator", "cairn.coordinator", env)
            await client.wait_ready(timeout=30)
            sup.start("coordinator-2", "cairn.coordinator", env)
            await wait_for_log(sup, "coordinator-2", "coordinator ready:")
            (tmp_path / "m").mkdir()
            for name in EXAMPLE_AGENTS:  # slowed a little, so runs are in flight at the kill
                sup.start(f"agent-{name}", "slow_agent", slow_agent_env(name, 0.2, tmp_path / "m"))

            ends: dict[str, str] = {}
            done = asyncio.Event()

            async def on_end(msg: Msg) -> None:
                _, _, run, kind = msg.subject.split(".", 3)
                ends[run] = kind
                if len(ends) >= RUNS:
                    done.set()

            for kind in ("RunCompleted", "RunFailed", "RunCancelled"):
                await client.nc.subscribe(f"cairn.event.*.{kind}", cb=on_end)
            run_ids = [uuid.uuid4() for _ in range(RUNS)]
            replies = await asyncio.gather(
                *(client.start_run("research-report", {"topic": f"t{i}"}, run_id=run_id)
                  for i, run_id in enumerate(run_ids))
            )  # fmt: skip
            assert all(r.ok for r in replies), [r.error for r in replies if not r.ok]

            store = EventStore(settings.store)
            try:
                # Both coordinators took a share of the work before one dies.
                await until_both_decided(client)
                sup.processes["coordinator-2"].send_signal(signal.SIGKILL)
                sup.processes["coordinator-2"].wait(10)
                assert len(ends) < RUNS, "every run ended before the kill: nothing was tested"
                await asyncio.wait_for(done.wait(), 120)
                ended = {
                    run_id: next(e for e in store.load(run_id) if isinstance(e, TERMINAL))
                    for run_id in run_ids
                }
                failed = [(e.reason, getattr(e, "error", "")) for e in ended.values()
                          if not isinstance(e, RunCompleted)]  # fmt: skip
                assert not failed, failed[:3]

                histories = {run_id: store.load(run_id) for run_id in run_ids}
                summary = check_log(histories)
                assert summary.completed == RUNS
                for run_id, events in histories.items():
                    tasks = [e.task_id for e in events if isinstance(e, TaskDispatched)]
                    assert len(tasks) == len(set(tasks)), f"run {run_id} dispatched twice: {tasks}"
                    ends_seen = [e for e in events if isinstance(e, TERMINAL)]
                    assert len(ends_seen) == 1
                    assert check_chain(run_id, store.rows(run_id)).ok
            finally:
                store.close()
    finally:
        sup.stop_all(timeout=5)
        nats.stop()


async def wait_for_log(sup: Supervisor, name: str, line: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while line not in sup.log_tail(name, 200):
        if loop.time() > deadline or name in sup.exited():
            pytest.fail(f"{name} did not get ready: {sup.log_tail(name, 20)}")
        await asyncio.sleep(0.05)


async def until_both_decided(client: CairnClient, timeout: float = 60) -> dict[str, int]:
    """Ask until both coordinators have answered a ping having decided result batches; their
    batch counts by process."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen: dict[str, int] = {}
    while loop.time() < deadline:
        pong = await client.ping()
        seen[pong["coordinator"]] = pong["batches"]
        if len(seen) >= 2 and all(n > 0 for n in seen.values()):
            return seen
        await asyncio.sleep(0.02)
    pytest.fail(f"the work did not spread over both coordinators: {seen}")


@pytest.mark.timeout(120)
async def test_a_task_committed_by_a_coordinator_that_died_is_sent_by_the_other(
    tmp_path: Path, postgres_schema: str
) -> None:
    """The second coordinator dies right after committing a run's first task, before sending
    it: nobody restarts it. The first coordinator, following the log, sends the task after a
    grace period (the stream would drop it had it been sent), and the run completes."""
    nats = EmbeddedNats(tmp_path / "nats").start()
    settings = Settings(
        home=tmp_path / "home",
        nats_url=nats.url,
        store_url=f"{POSTGRES}?schema={postgres_schema}",
    )
    sup = Supervisor(settings)
    env = {"CAIRN_FOLLOW_INTERVAL": "0.1", "CAIRN_TASK_RESEND_AFTER": "1"}
    try:
        async with await CairnClient.connect(nats.url, "cairn-test") as client:
            sup.start("coordinator", "cairn.coordinator", env)
            await client.wait_ready(timeout=30)
            sup.start(
                "coordinator-2", "cairn.coordinator", {**env, "CAIRN_CRASH_AT": "after-commit"}
            )
            await wait_for_log(sup, "coordinator-2", "coordinator ready:")
            for name in EXAMPLE_AGENTS:
                sup.start(f"agent-{name}", f"cairn.agents.examples.{name}")
            orphan = None
            for i in range(40):  # starts go to either; the first one coordinator-2 takes kills it
                run_id = uuid.uuid4()
                try:
                    await client.start_run("research-report", {"topic": f"t{i}"}, run_id=run_id,
                                           timeout=3)  # fmt: skip
                except Exception:  # no answer: coordinator-2 died after committing it
                    orphan = run_id
                    break
            assert orphan is not None, "coordinator-2 never took a start"
            assert sup.processes["coordinator-2"].wait(10) == -signal.SIGKILL
            store = EventStore(settings.store)
            try:
                first = store.load(orphan)
                assert [e.type_name() for e in first[:2]] == ["RunStarted", "TaskDispatched"]
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while not isinstance(store.load(orphan)[-1], TERMINAL):
                    assert loop.time() < deadline, [e.type_name() for e in store.load(orphan)]
                    await asyncio.sleep(0.1)
                events = store.load(orphan)
                assert isinstance(events[-1], RunCompleted)
                check_log({orphan: events})
            finally:
                store.close()
    finally:
        sup.stop_all(timeout=5)
        nats.stop()
