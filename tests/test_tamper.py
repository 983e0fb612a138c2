"""Tampering with a store behind cairn's back, without its key: every edit, type flip,
deletion, reorder, truncation and re-chained edit is caught by `verify`, which names the run
and what is wrong; `cairn projections rebuild` refuses a log that does not verify."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from histories import many_runs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store_contract import POSTGRES, drop_schema, fresh_schema, raw_sql, require_postgres

from cairn.coordinator.history.verify import ChainReport, verify_store
from cairn.events import (
    ApprovalGranted,
    Event,
    RunCancelled,
    canonical_json,
    event_hash,
)
from cairn.events.codec import link_hash
from cairn.runtime.eventlog.checkpoints import STORE_ROW
from cairn.runtime.eventlog.store import EventStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RUNS = many_runs(3, seed=7)


@pytest.fixture(autouse=True)
def key_beside_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key as a store on its own finds it: `chain.key` beside the SQLite file."""
    monkeypatch.delenv("CAIRN_CHAIN_KEY", raising=False)


def problems(reports: list[ChainReport]) -> list[tuple[uuid.UUID, str, str]]:
    return [(r.run_id, p.kind, p.message) for r in reports for p in r.problems]


def write(path: Path, runs: list[list[Event]] = RUNS) -> None:
    store = EventStore(str(path))
    try:
        for events in runs:
            # In several commits, as a coordinator writes a run.
            for start in range(0, len(events), 4):
                store.append(events[start : start + 4])
    finally:
        store.close()


def verify(path: Path) -> list[ChainReport]:
    store = EventStore(str(path))
    try:
        return verify_store(store)
    finally:
        store.close()


def sql(path: Path, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        with db:
            return db.execute(statement, params).fetchall()
    finally:
        db.close()


def row(path: Path, run: uuid.UUID, seq: int) -> tuple[str, dict[str, object]]:
    ((topic, state),) = sql(
        path,
        "SELECT topic, state FROM stored_events WHERE originator_id=? AND originator_version=?",
        (run.hex, seq),
    )
    return str(topic), json.loads(bytes(state))  # type: ignore[arg-type]


def put(path: Path, run: uuid.UUID, seq: int, topic: str, data: dict[str, object]) -> None:
    sql(
        path,
        "UPDATE stored_events SET topic=?, state=? WHERE originator_id=? AND originator_version=?",
        (topic, canonical_json(data), run.hex, seq),
    )


def rechain(path: Path, run: uuid.UUID, after: int) -> None:
    """Recompute the links after event `after`, as anyone can without the key."""
    seqs = _seqs(path, run)
    topic, data = row(path, run, after)
    link = link_hash(topic, data, run, after)
    for seq in [s for s in seqs if s > after]:
        topic, data = row(path, run, seq)
        data["prev_hash"] = link
        put(path, run, seq, topic, data)
        link = link_hash(topic, data, run, seq)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "events.db"
    write(path)
    assert all(r.ok for r in verify(path))
    return path


def test_an_untouched_store_verifies(store_path: Path) -> None:
    reports = verify(store_path)
    assert len(reports) == len(RUNS)
    assert all(r.ok for r in reports), problems(reports)


def test_an_edit_recomputed_along_the_chain_is_caught_by_the_signed_head(store_path: Path) -> None:
    run = RUNS[0][0].run_id
    topic, data = row(store_path, run, 3)
    data["reason"] = "nothing to see here"
    put(store_path, run, 3, topic, data)
    rechain(store_path, run, 3)
    found = problems(verify(store_path))
    assert [(r, k) for r, k, _ in found] == [(run, "checkpoint")], found
    assert "is not the one that was signed" in found[0][2]


def test_a_cut_tail_is_caught(store_path: Path) -> None:
    run = RUNS[1][0].run_id
    last = len(RUNS[1])
    sql(store_path, "DELETE FROM stored_events WHERE originator_id=? AND originator_version=?",
        (run.hex, last))  # fmt: skip
    found = problems(verify(store_path))
    assert [(r, k) for r, k, _ in found] == [(run, "checkpoint")], found
    assert f"event {last} is signed but missing" in found[0][2]
    sql(store_path, "DELETE FROM stored_events WHERE originator_id=? AND originator_version>?",
        (run.hex, last - 6))  # fmt: skip
    found = problems(verify(store_path))
    assert f"events {last - 5} to {last} are signed but missing" in found[0][2]


def test_a_run_deleted_whole_is_caught_with_or_without_its_checkpoint(store_path: Path) -> None:
    run = RUNS[2][0].run_id
    sql(store_path, "DELETE FROM stored_events WHERE originator_id=?", (run.hex,))
    found = problems(verify(store_path))
    assert [(r, k) for r, k, _ in found] == [(run, "checkpoint")], found
    assert "it was deleted" in found[0][2]
    sql(store_path, "DELETE FROM cairn_checkpoints WHERE run_id=?", (str(run),))
    found = problems(verify(store_path))
    assert [(r, k) for r, k, _ in found] == [(STORE_ROW, "store")], found
    assert f"counts {len(RUNS)} run(s), the store holds {len(RUNS) - 1}" in found[0][2]


def test_a_forged_checkpoint_is_caught(store_path: Path) -> None:
    run = RUNS[0][0].run_id
    sql(store_path, "UPDATE cairn_checkpoints SET last_seq = last_seq - 1 WHERE run_id=?",
        (str(run),))  # fmt: skip
    found = problems(verify(store_path))
    assert (run, "checkpoint", "the run's checkpoint is not signed with this store's key") in found


def test_a_flipped_event_type_breaks_the_chain(tmp_path: Path) -> None:
    """ApprovalGranted and ApprovalDenied have the same fields: only the topic tells them
    apart, and the link covers it."""
    run = uuid.uuid4()
    events: list[Event] = [RUNS[0][0].model_copy(update={"run_id": run})]
    for seq, cls, fields in (
        (2, ApprovalGranted, {"request_id": "r", "step": "plan", "by": "ann"}),
        (3, RunCancelled, {}),
    ):
        link = event_hash(events[-1])
        events.append(
            cls(
                run_id=run, seq=seq, at=T0, actor="human:ann", reason="ok", prev_hash=link, **fields
            )
        )
    path = tmp_path / "events.db"
    write(path, [events])
    topic, data = row(path, run, 2)
    assert topic == "ApprovalGranted@1"
    put(path, run, 2, "ApprovalDenied@1", data)
    found = problems(verify(path))
    assert [(k, "event 2 or event 3 was changed" in m) for _, k, m in found] == [("link", True)]
    # The last event flipped: nothing links to it, its signed head does.
    put(path, run, 2, "ApprovalGranted@1", data)
    topic, data = row(path, run, 3)
    put(path, run, 3, "RunCompleted@1", {**data, "output": None})
    assert [k for _, k, _ in problems(verify(path))] == ["checkpoint"]


def test_verify_names_the_run_and_exits_non_zero(store_path: Path) -> None:
    run = RUNS[1][0].run_id
    sql(store_path, "DELETE FROM stored_events WHERE originator_id=? AND originator_version=?",
        (run.hex, len(RUNS[1])))  # fmt: skip
    env = {**os.environ, "CAIRN_HOME": str(store_path.parent), "CAIRN_STORE": str(store_path),
           "COLUMNS": "200"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "cairn.cli", "verify"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert str(run) in proc.stdout
    assert "cut short" in proc.stdout
    # A rebuild of the views refuses the log, and says how to go on anyway.
    rebuild = [sys.executable, "-m", "cairn.cli", "projections", "rebuild"]
    proc = subprocess.run(rebuild, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "does not verify" in proc.stderr
    assert "--no-verify" in proc.stderr
    assert not (store_path.parent / "views.db").exists()
    proc = subprocess.run([*rebuild, "--no-verify"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "not verified" in proc.stdout


def test_without_the_key_the_signatures_cannot_be_checked(store_path: Path) -> None:
    (store_path.parent / "chain.key").unlink()
    found = problems(verify(store_path))
    assert [(r, k) for r, k, _ in found] == [(STORE_ROW, "store")], found
    assert "no chain key" in found[0][2]


# -- any tampering, without the key -----------------------------------------------------------

Tamper = Callable[[Path, st.DataObject], None]


def _edit(path: Path, data: st.DataObject) -> None:
    run = data.draw(st.sampled_from(RUNS))[0].run_id
    seq = data.draw(st.integers(1, len(_seqs(path, run))))
    topic, state = row(path, run, seq)
    field = data.draw(st.sampled_from(sorted(k for k in state if k != "prev_hash")))
    state[field] = data.draw(st.sampled_from([None, 0, 1, "x", [], {}, True]).filter(
        lambda v: v != state[field]))  # fmt: skip
    put(path, run, seq, topic, state)
    if data.draw(st.booleans()):
        rechain(path, run, seq)


def _retype(path: Path, data: st.DataObject) -> None:
    run = data.draw(st.sampled_from(RUNS))[0].run_id
    seq = data.draw(st.integers(1, len(_seqs(path, run))))
    topic, state = row(path, run, seq)
    name, _, version = topic.partition("@")
    other = data.draw(st.sampled_from([f"{name}@{int(version) + 1}", "RunCancelled@1",
                                       "ApprovalDenied@1", "TaskFailed@1"]).filter(
        lambda t: t != topic))  # fmt: skip
    put(path, run, seq, other, state)
    if data.draw(st.booleans()):
        rechain(path, run, seq)


def _delete(path: Path, data: st.DataObject) -> None:
    run = data.draw(st.sampled_from(RUNS))[0].run_id
    seqs = _seqs(path, run)
    gone = data.draw(st.lists(st.sampled_from(seqs), min_size=1, max_size=len(seqs), unique=True))
    for seq in gone:
        sql(path, "DELETE FROM stored_events WHERE originator_id=? AND originator_version=?",
            (run.hex, seq))  # fmt: skip
    if len(gone) < len(seqs) and data.draw(st.booleans()):
        rechain(path, run, min(set(seqs) - set(gone)))
    if len(gone) == len(seqs) and data.draw(st.booleans()):
        sql(path, "DELETE FROM cairn_checkpoints WHERE run_id=?", (str(run),))


def _reorder(path: Path, data: st.DataObject) -> None:
    run = data.draw(st.sampled_from(RUNS))[0].run_id
    seqs = _seqs(path, run)
    a, b = data.draw(st.lists(st.sampled_from(seqs), min_size=2, max_size=2, unique=True))
    for old, new in ((a, -1), (b, a), (-1, b)):
        sql(path, "UPDATE stored_events SET originator_version=? "
            "WHERE originator_id=? AND originator_version=?", (new, run.hex, old))  # fmt: skip
    if data.draw(st.booleans()):
        rechain(path, run, 1)


def _truncate(path: Path, data: st.DataObject) -> None:
    """The log's last events, across runs, gone."""
    (count,) = sql(path, "SELECT COUNT(*) FROM stored_events")[0]
    keep = data.draw(st.integers(0, int(count) - 1))  # type: ignore[call-overload]
    rows = sql(path, "SELECT originator_id, originator_version FROM stored_events "
               "ORDER BY rowid")  # fmt: skip
    for originator, seq in rows[keep:]:
        sql(path, "DELETE FROM stored_events WHERE originator_id=? AND originator_version=?",
            (originator, seq))  # fmt: skip


def _seqs(path: Path, run: uuid.UUID) -> list[int]:
    return [int(s) for (s,) in sql(  # type: ignore[call-overload]
        path, "SELECT originator_version FROM stored_events WHERE originator_id=? "
        "ORDER BY originator_version", (run.hex,))]  # fmt: skip


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pristine")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("CAIRN_CHAIN_KEY", raising=False)
        write(folder / "events.db")
    return folder


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), tamper=st.sampled_from([_edit, _retype, _delete, _reorder, _truncate]))
def test_every_tampering_without_the_key_is_caught(
    pristine: Path, tmp_path: Path, data: st.DataObject, tamper: Tamper
) -> None:
    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    for name in ("events.db", "chain.key"):
        (folder / name).write_bytes((pristine / name).read_bytes())
    path = folder / "events.db"
    tamper(path, data)
    reports = verify(path)
    assert not all(r.ok for r in reports), f"{tamper.__name__} went unnoticed"


# -- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture
def postgres_store() -> Iterator[str]:
    require_postgres()
    schema = fresh_schema()
    try:
        yield f"{POSTGRES}?schema={schema}"
    finally:
        drop_schema(schema)


def test_postgres_checkpoints_catch_a_cut_tail_and_a_deleted_run(postgres_store: str) -> None:
    store = EventStore(postgres_store)
    try:
        for events in RUNS:
            store.append(events[:3])
            store.append(events[3:])
        assert all(r.ok for r in verify_store(store))
        first, second = RUNS[0][0].run_id, RUNS[1][0].run_id
        raw_sql(postgres_store, "DELETE FROM stored_events WHERE originator_id=? "
                "AND originator_version=?", (first, len(RUNS[0])))  # fmt: skip
        raw_sql(postgres_store, "DELETE FROM stored_events WHERE originator_id=?", (second,))
        raw_sql(postgres_store, "DELETE FROM cairn_checkpoints WHERE run_id=?", (str(second),))
        found = problems(verify_store(store))
        assert (first, "checkpoint") in [(r, k) for r, k, _ in found]
        assert (STORE_ROW, "store") in [(r, k) for r, k, _ in found]
    finally:
        store.close()
