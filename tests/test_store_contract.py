"""The event store's contract, written once and run against every backend: SQLite and
PostgreSQL (the running server named by CAIRN_TEST_POSTGRES, each test in its own schema)."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import run_to_end

from cairn.events import Event, RunCancelled, RunCompleted, RunFailed
from cairn.runtime.eventlog.store import ConcurrencyError, EventStore

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


def require_postgres() -> None:
    """Skip when the test server is unreachable; fail instead under CAIRN_REQUIRE_POSTGRES."""
    why = postgres_available()
    if why:
        if os.environ.get("CAIRN_REQUIRE_POSTGRES"):
            pytest.fail(why)
        pytest.skip(why)


def fresh_schema() -> str:
    return f"cairn_test_{uuid.uuid4().hex[:12]}"


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "events.db")
        return
    require_postgres()
    schema = fresh_schema()
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


def test_processes_opening_a_fresh_store_at_once_all_succeed(store_url: str) -> None:
    """`cairn up` opens the store from several processes at the same moment; setting up the
    schema and tables must not race (PostgreSQL's `IF NOT EXISTS` does, unguarded)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    n = 6
    barrier = ctx.Barrier(n)
    errors = ctx.Queue()
    procs = [ctx.Process(target=_open_store, args=(store_url, barrier, errors)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * n
    assert [errors.get(timeout=5) for _ in procs] == [None] * n


def _open_store(url: str, barrier: Any, errors: Any) -> None:
    barrier.wait(30)  # all set up to here: open at the same moment
    try:
        EventStore(url).close()
    except Exception as exc:  # reported to the test, which names it
        errors.put(repr(exc))
    else:
        errors.put(None)


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
    from cairn.projections import Views, wait_for_views
    from cairn.runtime.client import CairnClient
    from cairn.runtime.embedded import EmbeddedNats
    from cairn.runtime.settings import Settings
    from cairn.runtime.supervisor import Supervisor

    require_postgres()
    schema = fresh_schema()
    nats = EmbeddedNats(tmp_path / "nats").start()
    settings = Settings(
        home=tmp_path / "home", nats_url=nats.url, store_url=f"{POSTGRES}?schema={schema}"
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
        import asyncio

        await asyncio.to_thread(wait_for_views, settings.views, position, 15.0)
        with Views(settings.views) as views:
            row = views.run(str(run_id))
        assert row is not None
        assert row.status == "completed"
        store = EventStore(settings.store)
        assert [e.type_name() for e in store.load(run_id)][-1] == "RunCompleted"
        store.close()
    finally:
        sup.stop_all(timeout=5)
        nats.stop()
        drop_schema(schema)


# -- raw rows and run ids (history, export/import, verify) --------------------------------------


def started(run: uuid.UUID) -> Event:
    from cairn.events import Intent, RunStarted, StepSpec, WorkflowSpec

    workflow = WorkflowSpec(name="w", steps=[StepSpec(name="a", capability="x")])
    return RunStarted(
        run_id=run, seq=1, at=T0, actor="test", workflow=workflow, input={}, intent=Intent(goal="g")
    )


def test_rows_are_kept_as_given_and_read_back_raw(store: EventStore) -> None:
    from cairn.coordinator.history.verify import verify_store
    from cairn.events import canonical_json, encode_event
    from cairn.events.codec import link_hash
    from cairn.runtime.eventlog.store import StoredRow

    run = uuid.uuid4()
    first = started(run)
    link = link_hash("RunStarted@1", json.loads(encode_event(first)), run, 1)
    rows = [
        StoredRow(run, 1, "RunStarted@1", encode_event(first)),
        StoredRow(run, 2, "RunCancelled@1", canonical_json(
            {"at": "2026-01-01T00:00:00Z", "actor": "test", "prev_hash": link}
        )),
    ]  # fmt: skip
    positions = store.append_rows(rows)
    assert len(positions) == 2
    assert store.rows(run) == rows
    assert [e.type_name() for e in store.load(run)] == ["RunStarted", "RunCancelled"]
    assert store.has_run(run)
    assert not store.has_run(uuid.uuid4())
    [report] = verify_store(store)
    assert report.ok, report.problems
    with pytest.raises(ConcurrencyError):
        store.append_rows(rows[1:])


def test_run_ids_and_prefixes(store: EventStore) -> None:
    from cairn.runtime.eventlog.store import RunNotFoundError

    a = uuid.UUID("abcdef00-0000-4000-8000-000000000001")
    b = uuid.UUID("abcdef00-0000-4000-8000-000000000002")
    c = uuid.UUID("12345678-0000-4000-8000-000000000003")
    headless = uuid.uuid4()  # a stream without RunStarted: counted only when asked
    store.append([started(b), ev(RunCancelled, headless, 1)])
    store.append([started(a), started(c)])
    assert store.run_ids() == [b, a, c]
    assert store.run_ids(started_only=False) == [b, headless, a, c]
    assert store.resolve_run("1234") == c
    assert store.resolve_run(str(a).upper()) == a
    assert store.resolve_run("abcdef00-0000-4000-8000-000000000002") == b
    with pytest.raises(RunNotFoundError, match="matches 2 runs"):
        store.resolve_run("abcdef")
    with pytest.raises(RunNotFoundError, match="no run id starts with '99'"):
        store.resolve_run("99")
    with pytest.raises(RunNotFoundError, match="no run 00000000-"):
        store.resolve_run(str(uuid.UUID(int=5)))
    with pytest.raises(RunNotFoundError, match="not a run id"):
        store.resolve_run("xyz")


# -- large outputs kept apart, once by content hash ---------------------------------------------


@pytest.fixture
def second_url(store_url: str, tmp_path: Path) -> Iterator[str]:
    """A second, empty store on the same backend (a fresh home to import into)."""
    if not store_url.startswith("postgresql://"):
        yield str(tmp_path / "second" / "events.db")
        return
    schema = store_url.partition("?schema=")[2] + "_b"
    try:
        yield f"{POSTGRES}?schema={schema}"
    finally:
        drop_schema(schema)


def raw_sql(store_url: str, statement: str, params: tuple[object, ...] = ()) -> list[Any]:
    """One statement on the store's own database, to look at or tamper with its tables."""
    if store_url.startswith("postgresql://"):
        import psycopg

        base, _, schema = store_url.partition("?schema=")
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{schema}"')
            cur = conn.execute(statement.replace("?", "%s"), params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []
    db = sqlite3.connect(store_url)
    try:
        with db:
            return db.execute(statement, params).fetchall()
    finally:
        db.close()


def chained(events: list[Event]) -> list[Event]:
    """The events with each linked to the one before, as the coordinator writes them."""
    from cairn.events import event_hash

    linked: list[Event] = []
    for e in events:
        prev = event_hash(linked[-1]) if linked else ""
        linked.append(e.model_copy(update={"prev_hash": prev}))
    return linked


BIG = {"text": "moss grows slowly on the north side " * 600}  # about 22 KB


def big_history(run: uuid.UUID, output: dict[str, Any] = BIG) -> list[Event]:
    from cairn.events import ResultReceived

    return chained(
        [
            started(run),
            ev(ResultReceived, run, 2, task_id="t", step="a", attempt=1, agent_id="x",
               output=output, started_at=T0, finished_at=T0),
            ev(RunCompleted, run, 3, output=output),
        ]
    )  # fmt: skip


def test_a_large_output_is_stored_once_apart_and_read_back_whole(store_url: str) -> None:
    from cairn.coordinator.history.verify import verify_store
    from cairn.events import content_hash, encode_event, event_hash
    from cairn.runtime.eventlog.blobs import MARKER

    store = EventStore(store_url, blob_threshold=1024)
    try:
        run = uuid.uuid4()
        history = big_history(run)
        store.append(history)
        assert store.load(run) == history
        assert [item.event for item in store.read_log(0)] == history
        # Stored: the start as it is, the output once, referred to by its hash from both events.
        raw = store.rows(run, whole=False)
        assert raw[0].state == encode_event(history[0])
        for row in raw[1:]:
            assert row.state.startswith(MARKER)
            assert len(row.state) < 1024
            assert content_hash(BIG).encode() in row.state
        assert raw_sql(store_url, "SELECT sha256 FROM cairn_blobs") == [(content_hash(BIG),)]
        # Every reader of rows gets the event as it was decided: the chain is unchanged.
        assert [r.state for r in store.rows(run)] == [encode_event(e) for e in history]
        (report,) = verify_store(store)
        assert report.ok, report.problems
        assert report.head == event_hash(history[-1])
        # The same output in another run (another transaction) is not stored again.
        other = uuid.uuid4()
        store.append(big_history(other))
        assert store.load(other) == big_history(other)
        assert raw_sql(store_url, "SELECT count(*) FROM cairn_blobs") == [(1,)]
    finally:
        store.close()


def test_a_batch_refused_keeps_none_of_its_outputs(store_url: str) -> None:
    store = EventStore(store_url, blob_threshold=1024)
    try:
        taken = uuid.uuid4()
        store.append([started(taken)])
        with pytest.raises(ConcurrencyError):
            store.append([*big_history(uuid.uuid4()), started(taken)])
        assert raw_sql(store_url, "SELECT count(*) FROM cairn_blobs") == [(0,)]
    finally:
        store.close()


def test_histories_round_trip_whether_outputs_are_kept_apart_or_not(
    store_url: str, second_url: str, tmp_path: Path
) -> None:
    """Replay, export, import and verify see the same history with outputs kept apart as
    without: `cairn export` writes them inline, `cairn import` keeps them apart again."""
    import subprocess
    import sys

    from histories import POLICY, simulate

    from cairn.coordinator.history.portable import export_lines
    from cairn.coordinator.history.replay import check_history
    from cairn.runtime.eventlog.blobs import MARKER

    run = uuid.uuid4()
    history = simulate(run, seed=11, trouble=0.5)
    inline = EventStore(str(tmp_path / "inline.db"), blob_threshold="off")
    apart = EventStore(store_url, blob_threshold=40)  # the plan (~70 bytes) and more
    try:
        inline.append(history)
        apart.append(history)
        assert any(r.state.startswith(MARKER) for r in apart.rows(run, whole=False))
        assert not any(r.state.startswith(MARKER) for r in inline.rows(run, whole=False))
        assert apart.load(run) == history
        assert check_history(apart.load(run), POLICY).ok
        exported = b"".join(export_lines(run, apart.rows(run)))
        assert exported == b"".join(export_lines(run, inline.rows(run)))
    finally:
        inline.close()
        apart.close()

    def cli(url: str, *args: str) -> str:
        env = {**os.environ, "CAIRN_HOME": str(tmp_path / "home"), "CAIRN_STORE": url,
               "CAIRN_BLOB_THRESHOLD": "40"}  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "cairn.cli", *args],
            capture_output=True, env=env, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode()

    file = tmp_path / "run.jsonl"
    cli(store_url, "export", str(run), "--output", str(file))
    assert file.read_bytes() == exported  # self-contained: the outputs are in the file
    assert b"$blobs" not in exported
    cli(second_url, "import", str(file), "--allow-unfinished")
    assert "every chain is intact" in cli(second_url, "verify")
    imported = EventStore(second_url)
    try:
        assert imported.load(run) == history
        assert any(r.state.startswith(MARKER) for r in imported.rows(run, whole=False))
    finally:
        imported.close()


def test_a_changed_or_missing_output_breaks_the_chain(store_url: str) -> None:
    import hashlib

    from cairn.coordinator.history.verify import verify_store
    from cairn.events import canonical_json, content_hash
    from cairn.runtime.eventlog.store import BlobError

    store = EventStore(store_url, blob_threshold=1024)
    try:
        run = uuid.uuid4()
        store.append(big_history(run))
        forged = canonical_json({"text": "moss grows fast"})
        raw_sql(store_url, "UPDATE cairn_blobs SET data = ?", (forged,))
        (report,) = verify_store(store)
        first = report.problems[0]
        assert (first.seq, first.kind, first.blob) == (2, "link", "output")
        assert first.expected == content_hash(BIG)
        assert first.found == hashlib.sha256(forged).hexdigest()
        # The last event's copy shows too, though nothing links to it yet.
        assert [(p.seq, p.kind) for p in report.problems if p.blob] == [(2, "link"), (3, "link")]
        with pytest.raises(BlobError, match="was changed"):
            store.load(run)
        raw_sql(store_url, "UPDATE cairn_blobs SET data = ?", (b"\xffnot json",))
        (report,) = verify_store(store)
        assert (report.problems[0].seq, report.problems[0].blob) == (2, "output")
        assert report.problems[0].found == hashlib.sha256(b"\xffnot json").hexdigest()

        raw_sql(store_url, "DELETE FROM cairn_blobs")
        (report,) = verify_store(store)
        assert not report.ok
        assert report.problems[0].found == ""
        assert "missing" in report.problems[0].message
        with pytest.raises(BlobError, match="missing"):
            store.read_log(0)
    finally:
        store.close()


def test_the_blob_threshold_setting(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from cairn.runtime.eventlog.blobs import MARKER
    from cairn.runtime.eventlog.store import StoreUnavailableError
    from cairn.runtime.settings import DEFAULT_BLOB_THRESHOLD

    def kept_apart(store: EventStore, output: dict[str, Any]) -> bool:
        run = uuid.uuid4()
        store.append(big_history(run, output))
        assert store.load(run) == big_history(run, output)
        return store.rows(run, whole=False)[-1].state.startswith(MARKER)

    monkeypatch.delenv("CAIRN_BLOB_THRESHOLD", raising=False)
    store = EventStore(store_url)
    try:
        assert store.blob_threshold == DEFAULT_BLOB_THRESHOLD == 16384
        assert not kept_apart(store, {"text": "x" * 10_000})
        assert kept_apart(store, {"text": "x" * 20_000})
    finally:
        store.close()
    monkeypatch.setenv("CAIRN_BLOB_THRESHOLD", "off")
    store = EventStore(store_url)
    try:
        assert store.blob_threshold is None
        assert not kept_apart(store, {"text": "x" * 100_000})
    finally:
        store.close()
    monkeypatch.setenv("CAIRN_BLOB_THRESHOLD", "100")
    store = EventStore(store_url)
    try:
        assert kept_apart(store, {"text": "x" * 100})
    finally:
        store.close()
    monkeypatch.setenv("CAIRN_BLOB_THRESHOLD", "16k")
    with pytest.raises(StoreUnavailableError, match=r"CAIRN_BLOB_THRESHOLD must be a number"):
        EventStore(store_url)
