"""The audit trail and provenance: filtered audit queries, `cairn why`, projection status.

Hand-written histories are appended to a real event store and projected by the real runner;
the CLI runs as a subprocess against the same store and views. The tests marked `on_both` run
against SQLite and PostgreSQL (`views_backends.py`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from views_backends import BACKENDS, backend_settings

from cairn.events import (
    CostCharged,
    Event,
    Intent,
    Lineage,
    ReportedError,
    ResultIgnored,
    ResultReceived,
    RetryScheduled,
    RunCancelled,
    RunCompleted,
    RunStarted,
    StepSpec,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskTimedOut,
    Usage,
    WorkflowSpec,
    content_hash,
    event_hash,
)
from cairn.projections import (
    ProjectionRunner,
    StepNotFoundError,
    Views,
    projection_status,
    rebuild,
    step_provenance,
)
from cairn.runtime.eventlog.store import EventStore, LoggedEvent
from cairn.runtime.settings import Settings

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
WORKFLOW = WorkflowSpec(
    name="research-report",
    version=1,
    steps=[
        StepSpec(name="plan", capability="planner"),
        StepSpec(name="research", capability="researcher", contract="Research@1"),
        StepSpec(name="write", capability="writer"),
    ],
)
RUN_DONE = uuid.UUID("a1000000-0000-4000-8000-000000000001")
RUN_STOPPED = uuid.UUID("b2000000-0000-4000-8000-000000000002")
INTENT = Intent(
    goal="A short report on cairns",
    constraints=["no more than 500 words"],
    success_criteria=["cites two sources"],
)
PLAN_OUTPUT = {"questions": ["what is a cairn?", "who builds them?"]}
RESEARCH_OUTPUT = {"findings": ["piles of stones", "hikers and shepherds"], "sources": 2}


class History:
    """Hand-written events of one run, numbered and timed in order (one second apart)."""

    def __init__(self, run_id: uuid.UUID, start: datetime) -> None:
        self.run_id = run_id
        self.start = start
        self.events: list[Event] = []

    def add(self, cls: type[Event], actor: str = "coordinator", **fields: Any) -> History:
        seq = len(self.events) + 1
        at = self.start + timedelta(seconds=seq)
        link = event_hash(self.events[-1]) if self.events else ""  # chained, as cairn writes
        self.events.append(
            cls(run_id=self.run_id, seq=seq, at=at, actor=actor, prev_hash=link, **fields)
        )
        return self

    def task(self, step: str, attempt: int) -> str:
        return f"{self.run_id}:{step}:{attempt}"

    def started(self) -> History:
        return self.add(
            RunStarted,
            actor="client:cli",
            reason="requested",
            workflow=WORKFLOW,
            input={"topic": "cairns"},
            intent=INTENT,
        )

    def dispatched(
        self, step: str, capability: str, attempt: int = 1, lineage: list[Lineage] | None = None
    ) -> History:
        return self.add(
            TaskDispatched,
            reason="its inputs are ready" if attempt == 1 else "retry",
            task_id=self.task(step, attempt),
            step=step,
            attempt=attempt,
            capability=capability,
            input={"topic": "cairns", "step": step},
            intent=INTENT,
            lineage=lineage or [],
            timeout_s=60,
        )

    def received(
        self,
        step: str,
        agent: str,
        attempt: int,
        output: dict[str, Any] | None,
        usage: list[tuple[str, int, int]],
        error: str | None = None,
    ) -> History:
        at = self.start + timedelta(seconds=len(self.events))
        return self.add(
            ResultReceived,
            actor=f"agent:{agent}",
            reason="error reported" if error else "output reported",
            task_id=self.task(step, attempt),
            step=step,
            attempt=attempt,
            agent_id=agent,
            output=output,
            error=ReportedError(message=error) if error else None,
            usage=[Usage(model=m, input_tokens=i, output_tokens=o) for m, i, o in usage],
            started_at=at,
            finished_at=at,
        )

    def charged(
        self, step: str, capability: str, agent: str, attempt: int, model: str, amount: str
    ) -> History:
        return self.add(
            CostCharged,
            reason="priced with table prices@1",
            task_id=self.task(step, attempt),
            step=step,
            capability=capability,
            agent_id=agent,
            model=model,
            input_tokens=100,
            output_tokens=10,
            price_table="prices@1",
            amount_usd=Decimal(amount),
        )

    def completed(self, step: str, agent: str, attempt: int, output_hash: str) -> History:
        return self.add(
            TaskCompleted,
            actor=f"agent:{agent}",
            reason="output received",
            task_id=self.task(step, attempt),
            step=step,
            attempt=attempt,
            agent_id=agent,
            output_hash=output_hash,
        )


def done_run(research_hash: str = content_hash(RESEARCH_OUTPUT)) -> History:
    """plan, then research failing once and completing on its retry; a late duplicate of the
    failed attempt's result is ignored."""
    plan_hash = content_hash(PLAN_OUTPUT)
    lineage = [Lineage(step="plan", attempt=1, agent_id="planner-1", output_hash=plan_hash)]
    h = History(RUN_DONE, T0)
    h.started().dispatched("plan", "planner")
    h.received("plan", "planner-1", 1, PLAN_OUTPUT, [("model-a", 100, 10)])
    h.charged("plan", "planner", "planner-1", 1, "model-a", "0.001")
    h.completed("plan", "planner-1", 1, plan_hash)
    h.dispatched("research", "researcher", 1, lineage)
    h.received("research", "researcher-1", 1, None, [("model-a", 100, 10)], "model overloaded")
    h.charged("research", "researcher", "researcher-1", 1, "model-a", "0.1")
    h.add(
        TaskFailed,
        actor="agent:researcher-1",
        reason="model overloaded",
        task_id=h.task("research", 1),
        step="research",
        attempt=1,
        agent_id="researcher-1",
        error="model overloaded",
        retryable=True,
    )
    h.add(
        RetryScheduled,
        reason="attempt 1 failed: model overloaded",
        step="research",
        attempt=2,
        due_at=T0 + timedelta(seconds=11),
        delay_s=0.5,
    )
    h.dispatched("research", "researcher", 2, lineage)
    h.received(
        "research", "researcher-2", 2, RESEARCH_OUTPUT, [("model-a", 100, 10), ("model-b", 100, 10)]
    )
    h.charged("research", "researcher", "researcher-2", 2, "model-a", "0.2")
    h.charged("research", "researcher", "researcher-2", 2, "model-b", "0.0000001")
    h.completed("research", "researcher-2", 2, research_hash)
    # The failed attempt's result again (a redelivery): recorded, ignored, not charged.
    h.received("research", "researcher-1", 1, None, [("model-a", 100, 10)], "model overloaded")
    h.add(
        ResultIgnored,
        reason="result for attempt 1, but the current attempt is 2",
        task_id=h.task("research", 1),
        agent_id="researcher-1",
    )
    return h.add(RunCompleted, reason="all steps completed", output=RESEARCH_OUTPUT)


def stopped_run() -> History:
    """The next day: plan times out, and a person cancels the run."""
    h = History(RUN_STOPPED, T0 + timedelta(days=1))
    h.started().dispatched("plan", "planner")
    h.add(
        TaskTimedOut,
        reason="no result in time",
        task_id=h.task("plan", 1),
        step="plan",
        attempt=1,
        timeout_s=60,
    )
    return h.add(RunCancelled, actor="human:alice", reason="taking too long")


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    with backend_settings(getattr(request, "param", "sqlite"), tmp_path / "home") as s:
        yield s


on_both = pytest.mark.parametrize("settings", BACKENDS, indirect=True)


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    store = EventStore(settings.store)
    yield store
    store.close()


@pytest.fixture
def logged(store: EventStore, settings: Settings) -> list[LoggedEvent]:
    """Both runs in the store, interleaved a little, and projected into the views."""
    done, stopped = done_run().events, stopped_run().events
    store.append(done[:6])
    store.append(stopped[:2])
    store.append(done[6:])
    store.append(stopped[2:])
    with ProjectionRunner(settings, batch_size=5) as runner:
        runner.run_once()
    return store.read_log(0, 1000)


def expect(logged: list[LoggedEvent], keep: Any) -> list[tuple[int, str]]:
    return [(le.position, le.event.type_name()) for le in logged if keep(le.event)]


def got(rows: list[Any]) -> list[tuple[int, str]]:
    return [(r.position, r.action) for r in rows]


@on_both
def test_audit_filters(settings: Settings, logged: list[LoggedEvent]) -> None:
    with Views(settings) as views:
        every = views.audit(limit=None)
        assert got(every) == expect(logged, lambda e: True)
        assert got(views.audit(RUN_STOPPED, limit=None)) == expect(
            logged, lambda e: e.run_id == RUN_STOPPED
        )
        # Exact actor, and prefixes ending in ":" or "*".
        assert got(views.audit(actor="agent:researcher-1", limit=None)) == expect(
            logged, lambda e: e.actor == "agent:researcher-1"
        )
        agents = expect(logged, lambda e: e.actor.startswith("agent:"))
        assert len(agents) == 7
        assert got(views.audit(actor="agent:", limit=None)) == agents
        assert got(views.audit(actor="agent:researcher*", limit=None)) == expect(
            logged, lambda e: e.actor.startswith("agent:researcher")
        )
        [human] = views.audit(actor="human:", limit=None)
        assert (human.actor, human.action, human.reason) == (
            "human:alice",
            "RunCancelled",
            "taking too long",
        )
        assert views.audit(actor="agent", limit=None) == []  # exact: no actor is just "agent"
        # Types, one or several.
        assert got(views.audit(types=["TaskFailed", "TaskTimedOut"], limit=None)) == expect(
            logged, lambda e: isinstance(e, TaskFailed | TaskTimedOut)
        )
        # Times, both bounds inclusive, and filters combined.
        since, until = T0 + timedelta(seconds=5), T0 + timedelta(seconds=9)
        assert got(views.audit(RUN_DONE, since=since, until=until, limit=None)) == expect(
            logged, lambda e: e.run_id == RUN_DONE and since <= e.at <= until
        )
        next_day = T0 + timedelta(days=1)
        assert got(views.audit(since=next_day, limit=None)) == expect(
            logged, lambda e: e.at >= next_day
        )
        naive = datetime(2026, 11, 26, 0, 0)  # taken as UTC
        assert got(views.audit(since=naive, limit=None)) == got(views.audit(since=next_day))
        assert got(
            views.audit(actor="coordinator", types=["CostCharged"], run_id="a1", limit=None)
        ) == expect(logged, lambda e: e.run_id == RUN_DONE and isinstance(e, CostCharged))
        # The latest `limit`, oldest first.
        assert got(views.audit(actor="agent:", limit=3)) == agents[-3:]


def test_audit_indexes(settings: Settings, logged: list[LoggedEvent]) -> None:
    with contextlib.closing(sqlite3.connect(settings.views)) as conn, conn:
        query = "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name='audit'"
        indexes = dict(conn.execute(query).fetchall())
    conn.close()
    assert set(indexes) == {
        "audit_by_run_seq",
        "audit_by_actor",
        "audit_by_action",
        "audit_by_time",
    }
    assert "(run_id, seq)" in indexes["audit_by_run_seq"]
    # A rebuild loads the tables first and creates the same indexes at the end.
    rebuild(settings)
    with contextlib.closing(sqlite3.connect(settings.views)) as conn, conn:
        assert dict(conn.execute(query).fetchall()) == indexes
    conn.close()


@on_both
def test_audit_cli_csv_equals_json(settings: Settings, logged: list[LoggedEvent]) -> None:
    filters = ["--run", "a1", "--actor", "agent:", "--since", "2026-11-25", "--limit", "0"]
    as_json = json.loads(cli(settings, "audit", *filters, "--format", "json").stdout)
    assert as_json == json.loads(cli(settings, "audit", *filters, "--json").stdout)
    assert [r["position"] for r in as_json] == [
        le.position
        for le in logged
        if le.event.run_id == RUN_DONE and le.event.actor.startswith("agent:")
    ]
    text = cli(settings, "audit", *filters, "--format", "csv").stdout
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == list(as_json[0])
    parsed = [
        {
            **row,
            "position": int(row["position"]),
            "seq": int(row["seq"]),
            "step": row["step"] or None,
            "trace_id": row["trace_id"] or None,
        }
        for row in reader
    ]
    assert parsed == as_json
    # A date as --until covers the whole day; --type is repeatable and forgives case.
    day = json.loads(
        cli(
            settings, "audit", "--until", "2026-11-25", "--type", "taskfailed",
            "--type", "TaskTimedOut", "--json",
        ).stdout
    )  # fmt: skip
    assert [(r["run_id"], r["action"]) for r in day] == [(str(RUN_DONE), "TaskFailed")]
    table = cli(settings, "audit", "--actor", "human:").stdout
    assert "human:alice" in table
    assert "taking too long" in table


def test_audit_cli_errors_say_what_to_do(settings: Settings, logged: list[LoggedEvent]) -> None:
    bad_type = cli(settings, "audit", "--type", "TaskExploded", check=False)
    assert bad_type.returncode == 2
    assert "'TaskExploded' is not an event type" in bad_type.stderr
    assert "TaskCompleted" in bad_type.stderr
    bad_time = cli(settings, "audit", "--since", "yesterday", check=False)
    assert bad_time.returncode == 2
    assert "is not an ISO date or time" in bad_time.stderr
    both = cli(settings, "audit", "--json", "--format", "csv", check=False)
    assert both.returncode == 2
    assert "--json and --format csv disagree" in both.stderr


def test_why_a_retried_step(store: EventStore, logged: list[LoggedEvent]) -> None:
    p = step_provenance(store.load(RUN_DONE), "research")
    assert (p.status, p.capability) == ("completed", "researcher")
    assert p.intent == INTENT
    assert p.input == {"topic": "cairns", "step": "research"}
    [lineage] = p.lineage
    assert (lineage.step, lineage.attempt, lineage.agent_id) == ("plan", 1, "planner-1")
    assert lineage.output_hash == content_hash(PLAN_OUTPUT)
    assert lineage.confirmed
    assert p.produced_by is not None
    assert (p.produced_by.agent_id, p.produced_by.attempt) == ("researcher-2", 2)
    assert p.produced_by.models == ["model-a", "model-b"]

    first, second = p.attempts
    assert (first.attempt, first.outcome, first.agent_id) == (1, "failed", "researcher-1")
    assert first.errors == ["model overloaded"]
    assert [c.amount_usd for c in first.charges] == [Decimal("0.1")]
    # The late duplicate is part of attempt 1's record, ignored and never charged.
    assert [r.ignored for r in first.results] == [
        None,
        "result for attempt 1, but the current attempt is 2",
    ]
    assert (second.attempt, second.outcome, second.agent_id) == (2, "completed", "researcher-2")
    assert second.errors == []
    assert [(c.model, c.amount_usd) for c in second.charges] == [
        ("model-a", Decimal("0.2")),
        ("model-b", Decimal("0.0000001")),
    ]
    assert second.cost_usd == Decimal("0.2000001")
    assert p.cost_usd == Decimal("0.3000001")
    assert p.approvals == []

    assert p.output == RESEARCH_OUTPUT
    assert p.output_hash == content_hash(RESEARCH_OUTPUT)
    assert p.output_verified is True
    actions = [(row.attempt, row.action) for row in p.timeline]
    assert actions[:5] == [
        (1, "TaskDispatched"),
        (1, "ResultReceived"),
        (1, "CostCharged"),
        (1, "TaskFailed"),
        (1, "RetryScheduled"),
    ]
    assert actions[-2:] == [(1, "ResultReceived"), (1, "ResultIgnored")]

    timed_out = step_provenance(store.load(RUN_STOPPED), "plan")
    assert (timed_out.status, timed_out.output, timed_out.output_verified) == (
        "timed_out",
        None,
        None,
    )
    assert timed_out.attempts[0].errors == ["no result within 60 s"]
    assert step_provenance(store.load(RUN_STOPPED), "write").status == "not dispatched"
    with pytest.raises(StepNotFoundError, match="its steps are plan, research, write"):
        step_provenance(store.load(RUN_DONE), "publish")


def test_why_notices_an_output_that_does_not_match_its_hash() -> None:
    events = done_run(research_hash="0" * 64).events
    p = step_provenance(events, "research")
    assert p.output == RESEARCH_OUTPUT
    assert p.output_verified is False


def test_why_cli(settings: Settings, logged: list[LoggedEvent]) -> None:
    shown = json.loads(cli(settings, "why", str(RUN_DONE), "research", "--json").stdout)
    assert [a["outcome"] for a in shown["attempts"]] == ["failed", "completed"]
    assert shown["output_verified"] is True
    assert shown["lineage"][0]["step"] == "plan"
    assert shown["cost_usd"] == "0.3000001"
    text = cli(settings, "why", "a1", "research").stdout  # a prefix, resolved by the views
    assert "model overloaded" in text
    assert "researcher-2 (attempt 2) with model-a, model-b" in text
    assert "approvals: none" in text
    assert "matches the hash TaskCompleted recorded" in text
    # A whole run id needs no views: the event store alone answers.
    no_views = Settings(home=settings.home, views_url=str(settings.home / "none.db"))
    alone = json.loads(cli(no_views, "why", str(RUN_DONE), "plan", "--json").stdout)
    assert (alone["status"], alone["output"]) == ("completed", PLAN_OUTPUT)
    missing = cli(settings, "why", "a1", "publish", check=False)
    assert missing.returncode == 2
    assert "has no step 'publish'" in missing.stderr


@on_both
def test_projection_status_shows_the_lag(settings: Settings, store: EventStore) -> None:
    events = done_run().events + stopped_run().events
    store.append(events)
    [before] = projection_status(settings)
    assert (before.built, before.position, before.log_position, before.lag) == (
        False,
        0,
        len(events),
        len(events),
    )
    with ProjectionRunner(settings) as runner:  # creates the views, projects nothing yet
        [created] = projection_status(settings)
        assert (created.built, created.lag) == (True, len(events))
        runner.run_once()
    [after] = projection_status(settings)
    assert (after.position, after.lag) == (len(events), 0)
    assert after.last_event_at == after.log_last_event_at == events[-1].at
    assert after.views == ["runs", "steps", "costs", "audit"]

    more = History(uuid.uuid4(), T0 + timedelta(days=2)).started().events
    store.append(more)
    shown = json.loads(cli(settings, "projections", "status", "--json").stdout)
    assert [(s["name"], s["lag"], s["position"]) for s in shown] == [
        ("cairn-views", 1, len(events))
    ]
    assert "cairn-views" in cli(settings, "projections", "status").stdout
    rebuilt = json.loads(cli(settings, "projections", "rebuild", "--json").stdout)
    assert rebuilt["events"] == len(events) + 1
    assert rebuilt["seconds"] >= 0
    assert [
        s["lag"] for s in json.loads(cli(settings, "projections", "status", "--json").stdout)
    ] == [0]


def cli(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAIRN_", "NATS_"))}
    env["CAIRN_CHAIN_KEY"] = os.environ["CAIRN_CHAIN_KEY"]  # the tests' one key (conftest)
    env.update(
        CAIRN_HOME=str(settings.home),
        CAIRN_STORE=settings.store,
        CAIRN_VIEWS=settings.views,
        COLUMNS="200",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc
