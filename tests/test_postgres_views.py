"""Views in PostgreSQL: the same rows as SQLite, a runner woken by the store's notifications,
views beside the store's own tables, clear errors, and a run through real processes with the
store and the views both in PostgreSQL. (The views' contract itself runs against both backends
in test_projections.py, test_audit.py and test_costs.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import run_to_end, wait_until
from histories import many_runs, total_cost
from test_store_contract import POSTGRES
from views_backends import backend_settings, drop_schemas, dump, fresh_schema, require_postgres

from cairn.events import Event, RunCancelled
from cairn.projections import (
    CostKey,
    ProjectionRunner,
    Views,
    ViewsMissingError,
    ViewsUnavailableError,
    projection_status,
)
from cairn.projections.projection import fold
from cairn.projections.storage import open_recorder
from cairn.runtime.eventlog.store import EventStore, store_env
from cairn.runtime.settings import Settings

pytestmark = pytest.mark.timeout(90)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    """The event store and the views in one fresh PostgreSQL schema."""
    with backend_settings("postgres", tmp_path / "home") as s:
        yield s


def interleaved(runs: list[list[Event]]) -> list[Event]:
    queues = [list(r) for r in runs]
    mixed: list[Event] = []
    while any(queues):
        for queue in queues:
            if queue:
                mixed.append(queue.pop(0))
    return mixed


def test_both_backends_hold_the_same_rows_for_a_generated_history(tmp_path: Path) -> None:
    """One log, projected into SQLite and into PostgreSQL in batches of different sizes: row for
    row the same views, and the same as the pure fold of the whole log."""
    require_postgres()
    events = interleaved(many_runs(8, seed=5, trouble=0.4))
    store_url = str(tmp_path / "events.db")
    store = EventStore(store_url)
    for start in range(0, len(events), 7):
        store.append(events[start : start + 7])
    logged = store.read_log(0, 100_000)
    store.close()
    schema = fresh_schema()
    pg = Settings(home=tmp_path, store_url=store_url, views_url=f"{POSTGRES}?schema={schema}")
    lite = dataclasses.replace(pg, views_url=str(tmp_path / "views.db"))
    try:
        for settings, batch_size in ((lite, 50), (pg, 13)):
            with ProjectionRunner(settings, batch_size=batch_size) as runner:
                assert runner.run_once() == len(events)
        assert dump(pg.views) == dump(lite.views)

        whole = fold(logged, {}, {})
        rows = dump(pg.views)
        assert [r[0] for r in rows["runs"]] == sorted(whole.runs)
        assert len(rows["steps"]) == len(whole.steps)
        assert [r[0] for r in rows["audit"]] == [a.position for a in whole.audit]
        assert [r[0] for r in rows["costs"]] == [c.position for c in whole.costs]
        with Views(pg) as views, Views(lite) as other:
            assert views.cost_total() == other.cost_total() == total_cost(events)
            keys: tuple[CostKey, ...] = ("run", "agent", "model", "tenant", "day")
            for key in keys:
                assert views.costs(by=key) == other.costs(by=key), key
            assert views.runs(limit=100) == other.runs(limit=100)
            assert views.audit(limit=None) == other.audit(limit=None)
            assert views.audit(actor="human:", types=["RunCancelled"]) == other.audit(
                actor="human:", types=["RunCancelled"]
            )
    finally:
        drop_schemas(schema)


def cancelled(run: uuid.UUID) -> list[Event]:
    return [RunCancelled(run_id=run, seq=1, at=T0, actor="test")]


async def test_the_runner_wakes_on_the_stores_notification(settings: Settings) -> None:
    """With timers far longer than the test, only a notice can make the runner read again."""
    store = EventStore(settings.store)
    runner = ProjectionRunner(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop, poll_interval=600, fallback_interval=600))
    try:
        for _ in range(3):
            [position] = store.append(cancelled(uuid.uuid4()))
            await asyncio.to_thread(runner.wait_for, position, 15)
        assert runner.notified_wakeups >= 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        runner.close()
        store.close()


async def test_notices_arrive_for_each_append(settings: Settings) -> None:
    from cairn.projections.log_notices import LogNotices

    store = EventStore(settings.store)
    notices = LogNotices(store_env(settings.store))
    stop = asyncio.Event()
    try:
        await notices.start()
        assert notices.subscribed
        notices.arm()
        assert not await notices.wait(stop, 0.01)  # nothing appended yet
        await asyncio.to_thread(store.append, cancelled(uuid.uuid4()))
        assert await notices.wait(stop, 15)
        assert notices.received == 1
    finally:
        await notices.close()
        store.close()


def listeners(channel: str) -> list[int]:
    import psycopg

    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE query = %s", (f'LISTEN "{channel}"',)
        ).fetchall()
    return [pid for (pid,) in rows]


async def test_the_runner_listens_again_after_its_connection_drops(settings: Settings) -> None:
    import psycopg

    from cairn.projections.log_notices import channel_for

    channel = channel_for(store_env(settings.store)["POSTGRES_SCHEMA"])
    store = EventStore(settings.store)
    runner = ProjectionRunner(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop, poll_interval=600, fallback_interval=600))
    try:
        await wait_until(lambda: len(listeners(channel)) == 1, 15, "the runner to listen")
        [first] = listeners(channel)
        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (first,))
        await wait_until(
            lambda: listeners(channel) not in ([], [first]), 15, "the runner to listen again"
        )
        [position] = store.append(cancelled(uuid.uuid4()))
        await asyncio.to_thread(runner.wait_for, position, 15)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        runner.close()
        store.close()


async def test_runners_starting_together_install_one_trigger(settings: Settings) -> None:
    import psycopg

    from cairn.projections.log_notices import TRIGGER, LogNotices

    EventStore(settings.store).close()  # the store's tables exist before any runner starts
    all_notices = [LogNotices(store_env(settings.store)) for _ in range(4)]
    try:
        await asyncio.gather(*(n.start() for n in all_notices))
        assert all(n.subscribed for n in all_notices)
    finally:
        for n in all_notices:
            await n.close()
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        count = conn.execute(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND t.tgname = %s",
            (store_env(settings.store)["POSTGRES_SCHEMA"], TRIGGER),
        ).fetchone()
    assert count == (1,)


def test_a_long_schema_name_gets_a_channel_postgresql_accepts() -> None:
    from cairn.projections.log_notices import channel_for

    assert channel_for("cairn") == "cairn_log_cairn"
    long = channel_for("s" * 63)
    assert len(long) <= 63
    assert long != channel_for("s" * 62 + "t")


def test_views_beside_the_store_keep_their_own_positions(settings: Settings) -> None:
    """In the store's own schema the views keep their positions apart: emptying the views
    (an older layout, a rebuild) never moves the outbox relay's position."""
    store = EventStore(settings.store)
    try:
        positions = store.append(cancelled(uuid.uuid4()))
        store.save_position("outbox", positions[-1])
        with ProjectionRunner(settings) as runner:
            runner.run_once()
            assert runner.position() == positions[-1]
        recorder = open_recorder(settings.views)
        try:
            recorder.reset()  # type: ignore[attr-defined]  # not part of the port
            assert recorder.position("cairn-views") == 0
        finally:
            recorder.close()
        assert store.position("outbox") == positions[-1]
    finally:
        store.close()


def test_missing_views_say_what_to_do(tmp_path: Path) -> None:
    require_postgres()
    schema = fresh_schema()
    url = f"{POSTGRES}?schema={schema}"
    try:
        with pytest.raises(ViewsMissingError) as missing:
            Views(url)
        assert str(missing.value) == (
            f"no views yet at {url}: run `cairn up` or `cairn projections rebuild`"
        )
        [status] = projection_status(Settings(home=tmp_path, views_url=url))
        assert (status.built, status.position, status.location) == (False, 0, url)
        import psycopg

        with psycopg.connect(POSTGRES) as conn:  # reading never creates anything
            found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
            assert found.fetchone() is None
    finally:
        drop_schemas(schema)


def test_unreachable_views_say_what_to_do() -> None:
    url = "postgresql://cairn:s3cret@127.0.0.1:1/nowhere?schema=x"
    with pytest.raises(ViewsUnavailableError) as reading:
        Views(url)
    with pytest.raises(ViewsUnavailableError) as writing:
        open_recorder(url)
    for exc in (reading.value, writing.value):
        text = str(exc)
        assert text.startswith("cannot open the views (PostgreSQL at 127.0.0.1:1/nowhere): ")
        assert text.endswith(
            "Check the DSN in CAIRN_VIEWS and that the database server is running."
        )
        assert "s3cret" not in text
        assert "\n" not in text


def test_passwords_stay_out_of_what_is_shown() -> None:
    from cairn.projections.storage import redacted

    assert redacted("postgresql://cairn:s3cret@db:5432/cairn?schema=v") == (
        "postgresql://cairn@db:5432/cairn?schema=v"
    )
    assert redacted("postgresql://cairn@db/cairn") == "postgresql://cairn@db/cairn"
    assert redacted("/data/views.db") == "/data/views.db"


def cli(settings: Settings, *args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAIRN_", "NATS_"))}
    env["CAIRN_CHAIN_KEY"] = os.environ["CAIRN_CHAIN_KEY"]  # the tests' one key (conftest)
    env.update(settings.env())
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", *args, "--json"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout)


async def test_a_run_through_processes_with_store_and_views_in_postgresql(
    tmp_path: Path,
) -> None:
    """The coordinator, the projection runner and agents as processes; the store in one
    schema, the views in another; the CLI answers from the PostgreSQL views."""
    from cairn.projections import wait_for_views
    from cairn.runtime.client import CairnClient
    from cairn.runtime.embedded import EmbeddedNats
    from cairn.runtime.supervisor import Supervisor

    require_postgres()
    schema = fresh_schema()
    nats = EmbeddedNats(tmp_path / "nats").start()
    settings = Settings(
        home=tmp_path / "home",
        nats_url=nats.url,
        store_url=f"{POSTGRES}?schema={schema}",
        views_url=f"{POSTGRES}?schema={schema}_views",
    )
    sup = Supervisor(settings)
    try:
        sup.start_all()
        async with await CairnClient.connect(nats.url) as client:
            try:
                await client.wait_ready(timeout=30)
            except Exception:
                pytest.fail(f"no coordinator; its log ends:\n{sup.log_tail('coordinator', 30)}")
            run_id, notices = await run_to_end(
                client, "research-report", {"topic": "pg"}, timeout=30
            )
        assert notices[-1].type == "RunCompleted"
        position = notices[-1].position
        await asyncio.to_thread(wait_for_views, settings.views, position, 15.0)
        store = EventStore(settings.store)
        history = store.load(run_id)
        store.close()

        [run] = [r for r in cli(settings, "runs") if r["run_id"] == str(run_id)]
        assert run["status"] == "completed"
        costs = cli(settings, "costs", "--by", "agent")
        assert Decimal(costs["total"]) == total_cost(history)
        assert Decimal(run["cost_usd"]) == total_cost(history)
        audit = cli(settings, "audit", "--run", str(run_id)[:8], "--limit", "0")
        assert [(a["seq"], a["action"]) for a in audit] == [(e.seq, e.type_name()) for e in history]
        [status] = cli(settings, "projections", "status")
        assert status["built"]
        assert status["position"] >= position
    finally:
        sup.stop_all(timeout=5)
        nats.stop()
        drop_schemas(schema)
