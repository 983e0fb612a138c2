"""The event store's contract, written once and run against every backend: SQLite and
PostgreSQL (the running server named by CAIRN_TEST_POSTGRES, each test in its own schema)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cairn.coordinator.store import ConcurrencyError, EventStore
from cairn.events import Event, RunCancelled, RunCompleted, RunFailed

POSTGRES = os.environ.get("CAIRN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def postgres_available() -> str | None:
    """None when the server answers; otherwise why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'cairn[postgres]')"
    try:
        with psycopg.connect(POSTGRES.split("?")[0], connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL at {POSTGRES} is not reachable: {exc}".strip()


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "events.db")
        return
    why = postgres_available()
    if why:
        if os.environ.get("CAIRN_REQUIRE_POSTGRES"):
            pytest.fail(why)
        pytest.skip(why)
    schema = f"cairn_test_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{POSTGRES}?schema={schema}"
    finally:
        drop_schema(schema)


@pytest.fixture
def store(store_url: str) -> Iterator[EventStore]:
    s = EventStore(store_url)
    try:
        yield s
    finally:
        s.close()


def ev(cls: type[Event], run: uuid.UUID, seq: int, **fields: object) -> Event:
    return cls(run_id=run, seq=seq, at=T0, actor="test", **fields)


def test_append_then_load_gives_the_same_events(store: EventStore) -> None:
    run = uuid.uuid4()
    events = [ev(RunCancelled, run, 1), ev(RunFailed, run, 2, error="x", step="s")]
    positions = store.append(events)
    assert len(positions) == 2
    assert positions[0] < positions[1]
    assert store.load(run) == events
    assert store.load(run, after=1) == events[1:]
    assert store.load(uuid.uuid4()) == []


def test_the_log_holds_every_run_in_commit_order(store: EventStore) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    store.append([ev(RunCancelled, a, 1), ev(RunCancelled, b, 1)])
    store.append([ev(RunCompleted, a, 2, output={"n": 1})])
    log = store.read_log(0)
    assert [(item.event.run_id, item.event.seq) for item in log] == [(a, 1), (b, 1), (a, 2)]
    assert [item.position for item in log] == sorted(item.position for item in log)
    assert store.last_position() == log[-1].position
    assert store.read_log(log[0].position) == log[1:]
    assert store.read_log(0, limit=2) == log[:2]


def test_a_conflicting_batch_is_refused_whole(store: EventStore) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    store.append([ev(RunCancelled, a, 1)])
    with pytest.raises(ConcurrencyError):
        store.append([ev(RunCancelled, b, 1), ev(RunCancelled, a, 1)])
    assert store.load(b) == []  # the other run's event was not kept either
    assert len(store.read_log(0)) == 1


def test_named_positions_only_move_forward(store: EventStore) -> None:
    assert store.position("outbox") == 0
    store.save_position("outbox", 5)
    store.save_position("outbox", 3)
    assert store.position("outbox") == 5
    store.save_position("outbox", 9)
    assert store.position("outbox") == 9
    assert store.position("other") == 0


def test_decimal_and_nested_values_survive(store: EventStore) -> None:
    run = uuid.uuid4()
    output = {"price": "0.000125", "items": [{"a": 1}, {"b": [True, None]}], "text": "ünï"}
    store.append([ev(RunCompleted, run, 1, output=output)])
    [back] = store.load(run)
    assert isinstance(back, RunCompleted)
    assert back.output == output


@pytest.mark.timeout(90)
async def test_a_run_through_processes_on_postgresql(tmp_path: Path) -> None:
    """The coordinator, projections and agents against a PostgreSQL event store."""
    from cairn.coordinator.client import TERMINAL_TYPES, CairnClient
    from cairn.coordinator.embedded import EmbeddedNats
    from cairn.coordinator.processes import Supervisor
    from cairn.coordinator.settings import Settings
    from cairn.projections import Views, wait_for_views

    why = postgres_available()
    if why:
        if os.environ.get("CAIRN_REQUIRE_POSTGRES"):
            pytest.fail(why)
        pytest.skip(why)
    schema = f"cairn_test_{uuid.uuid4().hex[:12]}"
    nats = EmbeddedNats(tmp_path / "nats").start()
    settings = Settings(
        home=tmp_path / "home", nats_url=nats.url, store_url=f"{POSTGRES}?schema={schema}"
    )
    sup = Supervisor(settings)
    try:
        sup.start_all()
        async with await CairnClient.connect(nats.url) as client:
            await client.wait_ready(timeout=30)
            run_id = uuid.uuid4()
            feed = await client.follow(run_id)
            reply = await client.start_run("research-report", {"topic": "pg"}, run_id=run_id)
            assert reply.ok, reply.error
            kinds: list[str] = []
            position = 0
            while not kinds or kinds[-1] not in TERMINAL_TYPES:
                notice = await feed.next(timeout=30)
                kinds.append(notice.type)
                position = notice.position
            await feed.close()
        assert kinds[-1] == "RunCompleted"
        import asyncio

        await asyncio.to_thread(wait_for_views, settings.views, position, 15.0)
        row = Views(settings.views).run(str(run_id))
        assert row is not None
        assert row.status == "completed"
        store = EventStore(settings.store)
        assert [e.type_name() for e in store.load(run_id)][-1] == "RunCompleted"
        store.close()
    finally:
        sup.stop_all(timeout=5)
        nats.stop()
        drop_schema(schema)
