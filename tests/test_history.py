"""`cairn history`, `state --at`, `export`/`import`, `replay --check` and `verify` against a
real SQLite event store; tampering is done with sqlite3 on the store's own table."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from histories import doubled_prices, many_runs, simulate

from cairn.cli.history import jsonable
from cairn.coordinator.domain.state import fold
from cairn.coordinator.history.portable import (
    PortableError,
    export_lines,
    import_history,
    read_history,
)
from cairn.coordinator.history.verify import check_chain, verify_store
from cairn.events import (
    CostCharged,
    Event,
    RunStarted,
    TaskFailed,
    UnknownEventError,
    canonical_json,
    event_hash,
)
from cairn.events import base as events_base
from cairn.events.codec import link_hash, was_upcast
from cairn.runtime.client import TERMINAL_TYPES, CairnClient
from cairn.runtime.eventlog.store import EventStore, StoredRow
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

RUN = uuid.UUID("00000000-0000-4000-8000-0000000c0ffe")
SEED = 11  # a run with retries and charges


def cli(home: Path, *args: str, code: int = 0, stdin: bytes | None = None) -> str:
    env = {
        **os.environ,
        "CAIRN_HOME": str(home),
        "CAIRN_STORE": str(home / "events.db"),
        "COLUMNS": "200",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", *args],
        capture_output=True,
        env=env,
        input=stdin,
        timeout=60,
    )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == code, f"exit {proc.returncode}\n{out}\n{err}"
    return out if code == 0 else out + err


@pytest.fixture
def history() -> list[Event]:
    events = simulate(RUN, seed=SEED, trouble=0.5)
    assert len(events) > 20
    assert any(isinstance(e, CostCharged) for e in events)
    return events


@pytest.fixture
def home(tmp_path: Path, history: list[Event]) -> Path:
    home = tmp_path / "home"
    store = EventStore(str(home / "events.db"))
    for events in many_runs(3, seed=5, trouble=0.5):
        store.append(events)
    store.append(history)
    store.close()
    return home


def load(home: Path, run_id: uuid.UUID = RUN) -> list[Event]:
    return EventStore(str(home / "events.db")).load(run_id)


# -- history, state ---------------------------------------------------------------------------


# What an agent may write into the record: terminal codes (clear the screen, colour, carriage
# return), rich markup and a right-to-left override.
HOSTILE = "\x1b[2J\x1b[31m[red]boom[/] \rover\u202egnp.exe"
HOSTILE_SHOWN = "\\x1b[2J\\x1b[31m[red]boom[/] over\\u202egnp.exe"  # one line: CR is a space


def test_an_agents_words_reach_the_terminal_as_text(tmp_path: Path) -> None:
    events = simulate(RUN, seed=0, trouble=0.8)  # a run with a failed attempt
    at = next(i for i, e in enumerate(events) if isinstance(e, TaskFailed))
    events[at] = events[at].model_copy(update={"error": HOSTILE, "reason": HOSTILE})
    home = tmp_path / "hostile"
    store = EventStore(str(home / "events.db"))
    store.append(events)
    store.close()
    shown = cli(home, "history", str(RUN)) + cli(home, "state", str(RUN), "--at", str(at + 1))
    assert HOSTILE_SHOWN in shown
    assert not {"\x1b", "\r", "\u202e"} & set(shown)


def test_history_prints_one_line_per_event(home: Path, history: list[Event]) -> None:
    lines = cli(home, "history", "00000000-0000-4000-8000-0000000c").splitlines()
    assert lines[0].startswith(f"run {RUN} · pipeline v1 · {len(history)} events")
    assert lines[1].split() == ["seq", "time", "type", "step", "actor", "reason"]
    rows = lines[2:]
    assert len(rows) == len(history)
    for row, event in zip(rows, history, strict=True):
        fields = row.split()
        assert fields[0] == str(event.seq)
        assert fields[2] == event.type_name()
        assert event.actor in row

    data = json.loads(cli(home, "history", str(RUN), "--json"))
    assert [e["seq"] for e in data["events"]] == [e.seq for e in history]
    assert data["events"][0]["event"] == history[0].model_dump(mode="json")

    assert "matches 4 runs" in cli(home, "history", "0000", code=2)
    assert "no run id starts with 'ffff'" in cli(home, "history", "ffff", code=2)


def test_state_at_seq_is_the_fold_of_the_first_seq_events(home: Path, history: list[Event]) -> None:
    seq = next(e.seq for e in history if e.type_name() == "TaskCompleted") + 1
    data = json.loads(cli(home, "state", str(RUN), "--at", str(seq), "--json"))
    expected = fold(history[:seq])
    assert expected is not None
    assert data["at_seq"] == seq
    assert data["events"] == len(history)
    assert data["state"] == json.loads(json.dumps(jsonable(expected)))
    assert data["state"]["version"] == seq
    assert data["state"]["steps"]["plan"]["status"] == "completed"
    assert data["state"]["cost_usd"] == str(expected.cost_usd)

    text = cli(home, "state", str(RUN)[:34], "--at", str(seq))
    assert f"after event {seq} of {len(history)}" in text
    assert "running" in text
    assert expected.steps["plan"].output_hash[:12] in text  # type: ignore[index]

    assert "--at must be 1 to" in cli(home, "state", str(RUN), "--at", "999", code=2)


# -- export / import --------------------------------------------------------------------------


def test_export_import_round_trip(home: Path, tmp_path: Path, history: list[Event]) -> None:
    exported = cli(home, "export", str(RUN)).encode()
    lines = exported.splitlines()
    header = json.loads(lines[0])
    assert header == {
        "format": "cairn-run-history",
        "version": 1,
        "run_id": str(RUN),
        "events": len(history),
        "last_hash": event_hash(history[-1]),
    }
    first = json.loads(lines[1])
    assert first["type"] == f"RunStarted@{RunStarted.version}"
    assert first["seq"] == 1
    assert canonical_json(first["event"]) == EventStore(str(home / "events.db")).rows(RUN)[0].state
    file = tmp_path / "run.jsonl"
    file.write_bytes(exported)

    other = tmp_path / "other"
    result = json.loads(cli(other, "import", str(file), "--json"))
    assert result["run_id"] == str(RUN)
    assert result["events"] == len(history)
    assert result["status"] == "completed"
    source, copy = EventStore(str(home / "events.db")), EventStore(str(other / "events.db"))
    assert copy.rows(RUN) == source.rows(RUN)
    assert copy.load(RUN) == history
    assert [e.prev_hash for e in copy.load(RUN)] == [e.prev_hash for e in history]
    assert cli(other, "export", str(RUN)).encode() == exported
    assert "every chain is intact" in cli(other, "verify")

    assert "already in the event store" in cli(other, "import", str(file), code=2)
    assert copy.rows(RUN) == source.rows(RUN)


Tamper = Callable[[list[bytes]], list[bytes]]


def _edit_event(index: int, **changes: Any) -> Tamper:
    def tamper(lines: list[bytes]) -> list[bytes]:
        at = index % len(lines)
        line = json.loads(lines[at])
        line["event"].update(changes)
        return [*lines[:at], canonical_json(line), *lines[at + 1 :]]

    return tamper


def _delete_and_renumber(seq: int) -> Tamper:
    """Drop an event and make the file look whole again (seqs, count): only the chain shows."""

    def tamper(lines: list[bytes]) -> list[bytes]:
        header = json.loads(lines[0])
        header["events"] -= 1
        kept = [json.loads(x) for x in lines[1:] if json.loads(x)["seq"] != seq]
        return [canonical_json(header)] + [
            canonical_json({**line, "seq": n}) for n, line in enumerate(kept, start=1)
        ]

    return tamper


TAMPERS: dict[str, tuple[Tamper, str]] = {
    "edited": (_edit_event(3, reason="nothing to see"), "hash chain is broken at event 4"),
    "edited last": (_edit_event(-1, reason="nothing"), "the header says"),
    "dropped": (lambda ls: [*ls[:3], *ls[4:]], "holds event 4, expected 3"),
    "swapped": (lambda ls: [ls[0], ls[1], ls[3], ls[2], *ls[4:]], "holds event 3, expected 2"),
    "deleted and renumbered": (_delete_and_renumber(3), "hash chain is broken at event 3"),
    "truncated": (lambda ls: ls[:-2], "the header says"),
    "not json": (lambda ls: [*ls[:2], b"{nope", *ls[3:]], "line 3 is not JSON"),
    "nested past reading": (
        lambda ls: [*ls[:2], b'{"a":' + b"[" * 100_000, *ls[3:]],
        "line 3 nests deeper than JSON read here",
    ),
    "unknown type": (
        lambda ls: (
            [*ls[:2], re.sub(rb'"type":"TaskDispatched@\d+"', b'"type":"Nope@1"', ls[2]), *ls[3:]]
        ),
        "unknown event type 'Nope'",
    ),
    "newer version": (
        lambda ls: [
            *ls[:2],
            re.sub(rb'"TaskDispatched@\d+"', b'"TaskDispatched@9"', ls[2]),
            *ls[3:],
        ],
        "upgrade cairn",
    ),
    "newer format": (
        lambda ls: [ls[0].replace(b'"version":1', b'"version":7'), *ls[1:]],
        "upgrade cairn to import it",
    ),
    "bad field": (_edit_event(2, attempt="first"), "does not decode"),
}


@pytest.mark.parametrize("kind", list(TAMPERS))
def test_import_refuses_a_tampered_file_and_writes_nothing(
    kind: str, tmp_path: Path, history: list[Event]
) -> None:
    source = EventStore(str(tmp_path / "source.db"))
    source.append(history)
    lines = b"".join(export_lines(RUN, source.rows(RUN))).splitlines()
    tamper, message = TAMPERS[kind]
    target = EventStore(str(tmp_path / "target.db"))
    with pytest.raises(PortableError, match=message) as info:
        import_history(target, read_history(tamper(lines), "run.jsonl"))
    assert "run.jsonl" in str(info.value)
    assert not target.has_run(RUN)
    assert target.last_position() == 0


def test_import_cli_refuses_tampered_and_unfinished(tmp_path: Path, history: list[Event]) -> None:
    source = EventStore(str(tmp_path / "source.db"))
    source.append(history)
    lines = b"".join(export_lines(RUN, source.rows(RUN))).splitlines()
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(b"\n".join(_edit_event(5, actor="human:eve")(lines)) + b"\n")
    home = tmp_path / "home"
    out = cli(home, "import", str(tampered), code=2)
    assert "hash chain is broken at event 6" in out
    assert not EventStore(str(home / "events.db")).has_run(RUN)

    # A run that had not ended: a restarted coordinator would take it over.
    unfinished = tmp_path / "unfinished.jsonl"
    unfinished.write_bytes(b"".join(export_lines(RUN, source.rows(RUN)[:5])))
    assert "--allow-unfinished" in cli(home, "import", "-", code=2, stdin=unfinished.read_bytes())
    assert not EventStore(str(home / "events.db")).has_run(RUN)
    assert "running, 5 events" in cli(home, "import", str(unfinished), "--allow-unfinished")


# -- verify -----------------------------------------------------------------------------------


def tamper_store(path: Path, run_id: uuid.UUID, kind: str) -> None:
    """Change the store the way someone with write access to the file could."""
    rid = run_id.hex
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        if kind == "edit":
            (state,) = db.execute(
                "SELECT state FROM stored_events WHERE originator_id=? AND originator_version=3",
                (rid,),
            ).fetchone()
            data = json.loads(state)
            data["reason"] = "edited afterwards"
            db.execute(
                "UPDATE stored_events SET state=? WHERE originator_id=? AND originator_version=3",
                (canonical_json(data), rid),
            )
        elif kind == "delete":
            db.execute(
                "DELETE FROM stored_events WHERE originator_id=? AND originator_version=3", (rid,)
            )
        elif kind == "reorder":
            for old, new in ((3, -1), (4, 3), (-1, 4)):
                db.execute(
                    "UPDATE stored_events SET originator_version=? "
                    "WHERE originator_id=? AND originator_version=?",
                    (new, rid, old),
                )
        elif kind == "first":
            db.execute(
                "DELETE FROM stored_events WHERE originator_id=? AND originator_version=1", (rid,)
            )


def test_an_untampered_store_verifies_clean(home: Path) -> None:
    assert "verified 4 run(s)" in cli(home, "verify")
    data = json.loads(cli(home, "verify", str(RUN)[:32], "--json"))
    assert data["ok"] is True
    assert data["runs"] == 1
    assert data["chains"][0]["head"] == event_hash(load(home)[-1])


@pytest.mark.parametrize(
    ("kind", "seq", "problem", "words"),
    [
        ("edit", 4, "link", "event 3 or event 4 was changed"),
        ("delete", 4, "gap", "event 3 is missing before event 4"),
        ("reorder", 3, "link", "event 2 or event 3 was changed"),
        ("first", 2, "start", "event 1 is missing"),
    ],
)
def test_verify_names_the_first_broken_link(
    home: Path, history: list[Event], kind: str, seq: int, problem: str, words: str
) -> None:
    tamper_store(home / "events.db", RUN, kind)
    data = json.loads(cli(home, "verify", "--json", code=1))
    assert (data["ok"], data["runs"], data["broken"]) == (False, 4, 1)
    chain = next(c for c in data["chains"] if c["run_id"] == str(RUN))
    first = chain["problems"][0]
    assert (first["seq"], first["kind"]) == (seq, problem), first
    assert words in first["message"]
    if problem == "link":
        # found: the link recorded by the event now at `seq` (for a reorder, the one moved
        # there: it was event 4); expected: the hash of the event now before it
        assert first["found"] == history[3].prev_hash
        assert first["expected"] != first["found"]
    assert all(c["ok"] for c in data["chains"] if c["run_id"] != str(RUN))

    text = cli(home, "verify", code=1)
    assert f"run {RUN}: broken at event {seq}" in text
    assert "1 of 4 run(s) have a broken chain" in text


def test_a_run_whose_first_event_is_not_run_started(tmp_path: Path, history: list[Event]) -> None:
    store = EventStore(str(tmp_path / "events.db"))
    first = history[1].model_copy(update={"seq": 1, "prev_hash": ""})
    store.append([first])
    (report,) = verify_store(store)
    assert [(p.seq, p.kind) for p in report.problems] == [(1, "start")]
    assert "the run's first event is TaskDispatched, not RunStarted" in report.problems[0].message


# -- replay --check ---------------------------------------------------------------------------


def test_replay_check_cli(home: Path, tmp_path: Path, history: list[Event]) -> None:
    data = json.loads(cli(home, "replay", "--check", "--json"))
    assert (data["histories"], data["identical"], data["diverged"]) == (4, 4, 0)
    assert data["events"] == sum(len(r) for r in many_runs(3, seed=5, trouble=0.5)) + len(history)
    assert data["events_per_s"] > 0

    file = tmp_path / "run.jsonl"
    file.write_text(cli(home, "export", str(RUN)))
    assert "identical" in cli(home, "replay", "--check", str(file), str(RUN)[:33])

    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump(doubled_prices().model_dump(mode="json")))
    data = json.loads(cli(home, "replay", "--check", str(file), "--prices", str(prices),
                          "--json", code=1))  # fmt: skip
    (result,) = data["results"]
    d = result["divergence"]
    first_charge = next(e for e in history if isinstance(e, CostCharged) and e.amount_usd > 0)
    assert (d["kind"], d["position"], d["seq"]) == ("differs", first_charge.seq, first_charge.seq)
    assert d["recorded"] == {"type": "CostCharged", **first_charge.model_dump(mode="json")}
    assert d["today"]["type"] == "CostCharged"
    assert d["today"]["prev_hash"] == first_charge.prev_hash
    assert float(d["today"]["amount_usd"]) == 2 * float(first_charge.amount_usd)

    text = cli(home, "replay", "--check", str(RUN), "--prices", str(prices), code=1)
    assert f"diverges at event {first_charge.seq} of {len(history)} (CostCharged)" in text
    assert "CostCharged differs in amount_usd" in text
    assert "replay checks histories: pass --check" in cli(home, "replay", str(RUN), code=2)


# -- versions ---------------------------------------------------------------------------------


class HistoryTestNoteV2(Event):
    """A test-only event type: version 2 renamed v1's `note` to `text`. Registered only for
    the test that uses it (a unique name, removed again afterwards)."""

    version: ClassVar[int] = 2
    upcasters: ClassVar[dict[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {
        1: lambda data: {**{k: v for k, v in data.items() if k != "note"}, "text": data["note"]}
    }
    text: str

    @classmethod
    def type_name(cls) -> str:
        return "HistoryTestNote"


@pytest.fixture
def note_type(monkeypatch: pytest.MonkeyPatch) -> type[Event]:
    monkeypatch.setitem(events_base._REGISTRY, "HistoryTestNote", HistoryTestNoteV2)
    return HistoryTestNoteV2


def insert_raw(path: Path, run_id: uuid.UUID, seq: int, topic: str, data: dict[str, Any]) -> None:
    """An event as another version of cairn wrote it: bytes and topic as given, signed."""
    store = EventStore(str(path))
    try:
        store.append_rows([StoredRow(run_id, seq, topic, canonical_json(data))])
    finally:
        store.close()


def test_an_old_version_is_upcast_on_read_and_keeps_its_chain(
    tmp_path: Path, history: list[Event], note_type: type[Event]
) -> None:
    path = tmp_path / "events.db"
    store = EventStore(str(path))
    store.append(history[:1])
    started = history[0]
    assert isinstance(started, RunStarted)
    # Written by the code of version 1, when the field was still called `note`.
    v1 = {"at": "2026-01-01T00:00:05Z", "actor": "human:ann", "reason": "", "note": "hello"}
    v1_hash = link_hash("HistoryTestNote@1", {**v1, "prev_hash": event_hash(started)}, RUN, 2)
    store.append_rows([
        StoredRow(RUN, 2, "HistoryTestNote@1",
                  canonical_json({**v1, "prev_hash": event_hash(started)})),
        StoredRow(RUN, 3, "HistoryTestNote@1",
                  canonical_json({**v1, "note": "again", "prev_hash": v1_hash})),
    ])  # fmt: skip

    events = store.load(RUN)
    note = events[1]
    assert isinstance(note, note_type)
    assert note.text == "hello"  # type: ignore[attr-defined]
    assert "note" not in note.model_dump()
    assert was_upcast(note)
    # The chain links to the bytes as written, not to the upcast form.
    assert event_hash(note) == v1_hash == events[2].prev_hash
    assert event_hash(note.model_copy()) != v1_hash
    (report,) = verify_store(store)
    assert report.ok, report.problems
    assert check_chain(RUN, store.rows(RUN)).head == event_hash(events[2])


def _without_models(value: Any) -> Any:
    """A JSON value as version 1 wrote it: no `model: null` of a step or task, no fork `models`."""
    if isinstance(value, dict):
        return {
            k: _without_models(v)
            for k, v in value.items()
            if not (k == "model" and v is None) and not (k == "models" and v == {})
        }
    if isinstance(value, list):
        return [_without_models(v) for v in value]
    return value


def test_events_written_before_steps_could_name_a_model_read_link_and_replay(
    tmp_path: Path, history: list[Event]
) -> None:
    from histories import POLICY

    from cairn.coordinator.history.replay import check_history
    from cairn.events import encode_event, topic_of

    older = {"RunStarted", "TaskDispatched", "ResultReceived", "StepAdmitted"}
    rows: list[StoredRow] = []
    link = ""
    for e in history:
        data = json.loads(encode_event(e))
        topic = topic_of(e)
        if e.type_name() in older:
            data, topic = _without_models(data), f"{e.type_name()}@1"
        data["prev_hash"] = link
        rows.append(StoredRow(RUN, e.seq, topic, canonical_json(data)))
        link = link_hash(topic, data, RUN, e.seq)
    assert any(r.topic == "TaskDispatched@1" for r in rows)
    store = EventStore(str(tmp_path / "events.db"))
    store.append_rows(rows)
    events = store.load(RUN)
    relinked = [
        e.model_copy(update={"prev_hash": h.prev_hash})
        for e, h in zip(events, history, strict=True)
    ]
    assert relinked == history
    assert all(was_upcast(e) for e in events if e.type_name() in older)
    # Each event links to the bytes as written, so a coordinator goes on from the same chain.
    assert [event_hash(e) for e in events[:-1]] == [e.prev_hash for e in events[1:]]
    (report,) = verify_store(store)
    assert report.ok, report.problems
    assert check_history(events, POLICY).ok


def test_a_newer_version_than_the_code_knows_names_the_upgrade(
    home: Path, history: list[Event]
) -> None:
    insert_raw(
        home / "events.db",
        RUN,
        len(history) + 1,
        "RunCompleted@7",
        {
            "at": "2026-01-01T00:01:00Z",
            "actor": "coordinator",
            "output": None,
            "prev_hash": event_hash(history[-1]),
        },
    )
    with pytest.raises(UnknownEventError, match="RunCompleted version 7, newer than this code's"):
        load(home)
    out = cli(home, "history", str(RUN), code=2)
    assert f"event {len(history) + 1} of run {RUN} is RunCompleted version 7" in out
    assert "upgrade cairn to read it" in out
    data = json.loads(cli(home, "verify", str(RUN), "--json", code=1))
    (problem,) = data["chains"][0]["problems"]
    assert problem["kind"] == "unreadable"
    assert "upgrade cairn" in problem["message"]
    # replay goes on with the histories it can read
    out = cli(home, "replay", "--check", code=2)
    assert f"run {RUN}: not checked: event {len(history) + 1}" in out
    assert "3 identical, 0 diverged, 1 not checked" in out


# -- a real run -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_run_through_agent_processes_replays_and_verifies(
    settings: Settings, supervisor: Supervisor, client: CairnClient, tmp_path: Path
) -> None:
    """The recorded history of real processes (clock times, agents' usage and outputs)
    re-decides identically, verifies, and survives export and import."""
    supervisor.start_all()
    await client.wait_ready(timeout=30)
    run_id = uuid.uuid4()
    feed = await client.follow(run_id)
    try:
        reply = await client.start_run("research-report", {"topic": "tides"}, run_id=run_id)
        assert reply.ok, reply.error
        while (await feed.next(timeout=60)).type not in TERMINAL_TYPES:
            pass
    finally:
        await feed.close()
    home = settings.home
    events = load(home, run_id)
    assert events[-1].type_name() == "RunCompleted"

    replayed = json.loads(cli(home, "replay", "--check", "--json"))
    assert (replayed["histories"], replayed["identical"]) == (1, 1)
    assert replayed["events"] == len(events)
    assert json.loads(cli(home, "verify", "--json"))["ok"] is True
    lines = cli(home, "history", str(run_id)[:8]).splitlines()
    assert len(lines) == 2 + len(events)

    file = tmp_path / "run.jsonl"
    file.write_text(cli(home, "export", str(run_id)[:8]))
    other = tmp_path / "other"
    cli(other, "import", str(file))
    assert load(other, run_id) == events
    assert "2 identical, 0 diverged" in cli(other, "replay", "--check", str(file), str(run_id))
