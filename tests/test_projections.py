"""Projections: folding a real event log into the views, exactly once, and reading them.

The views' contract: every test that takes `settings` runs against each backend (SQLite files,
and a PostgreSQL schema holding the store and the views; see `views_backends.py`)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from copy import deepcopy
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from views_backends import BACKENDS, backend_settings, dump, other_views, raw_sql

from cairn.events import (
    ContractViolated,
    CostCharged,
    Event,
    Intent,
    ResultIgnored,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepSpec,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    WorkflowSpec,
)
from cairn.projections import (
    PROJECTION_NAME,
    AmbiguousRunError,
    CostKey,
    ProjectionConflictError,
    ProjectionRunner,
    RunNotFoundError,
    Views,
    ViewsMissingError,
    rebuild,
    wait_for_views,
)
from cairn.projections.projection import fold
from cairn.projections.storage import open_recorder
from cairn.runtime.eventlog.store import EventStore, LoggedEvent
from cairn.runtime.settings import Settings

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
WORKFLOW = WorkflowSpec(
    name="research-report",
    version=2,
    steps=[
        StepSpec(name="plan", capability="planner"),
        StepSpec(name="research", capability="researcher"),
        StepSpec(name="write", capability="writer"),
    ],
)
RUN_COMPLETED = uuid.UUID("10000000-0000-4000-8000-000000000001")
RUN_FAILED = uuid.UUID("20000000-0000-4000-8000-000000000002")
RUN_CANCELLED = uuid.UUID("30000000-0000-4000-8000-000000000003")
RUN_RUNNING = uuid.UUID("40000000-0000-4000-8000-000000000004")


class History:
    """Hand-written events of one run, numbered and timed in order."""

    def __init__(self, run_id: uuid.UUID, offset_s: int = 0) -> None:
        self.run_id = run_id
        self.offset_s = offset_s
        self.events: list[Event] = []

    def _add(self, cls: type[Event], actor: str = "coordinator", **fields: Any) -> History:
        seq = len(self.events) + 1
        at = T0 + timedelta(seconds=self.offset_s + seq)
        self.events.append(cls(run_id=self.run_id, seq=seq, at=at, actor=actor, **fields))
        return self

    def started(self, goal: str) -> History:
        return self._add(
            RunStarted,
            actor="client:cli",
            reason="requested",
            workflow=WORKFLOW,
            input={"topic": goal},
            intent=Intent(goal=goal),
        )

    def dispatched(self, step: str, capability: str, attempt: int = 1) -> History:
        return self._add(
            TaskDispatched,
            reason="its inputs are ready" if attempt == 1 else "retry",
            task_id=f"{self.run_id}/{step}/{attempt}",
            step=step,
            attempt=attempt,
            capability=capability,
            input={},
            intent=Intent(goal="g"),
            timeout_s=60,
        )

    def completed(self, step: str, agent: str, attempt: int = 1, tokens: int = 100) -> History:
        return self._add(
            TaskCompleted,
            actor=f"agent:{agent}",
            task_id=f"{self.run_id}/{step}/{attempt}",
            step=step,
            attempt=attempt,
            agent_id=agent,
            output_hash="h",
            duration_ms=12.4,
        )

    def charged(
        self,
        step: str,
        capability: str,
        agent: str,
        model: str,
        tokens: tuple[int, int],
        amount: str,
        attempt: int = 1,
    ) -> History:
        return self._add(
            CostCharged,
            reason="usage reported",
            task_id=f"{self.run_id}/{step}/{attempt}",
            step=step,
            capability=capability,
            agent_id=agent,
            model=model,
            input_tokens=tokens[0],
            output_tokens=tokens[1],
            price_table="prices@1",
            amount_usd=Decimal(amount),
        )

    def failed(self, step: str, agent: str, attempt: int, *, retryable: bool) -> History:
        return self._add(
            TaskFailed,
            actor=f"agent:{agent}",
            task_id=f"{self.run_id}/{step}/{attempt}",
            step=step,
            attempt=attempt,
            agent_id=agent,
            error="upstream model timed out",
            retryable=retryable,
        )

    def violated(self, step: str, agent: str, attempt: int) -> History:
        return self._add(
            ContractViolated,
            reason="output does not match Research@1",
            task_id=f"{self.run_id}/{step}/{attempt}",
            step=step,
            attempt=attempt,
            agent_id=agent,
            contract="Research@1",
            errors=["findings: field required", "extra: not permitted"],
        )

    def ignored(self, step: str, agent: str, attempt: int) -> History:
        return self._add(
            ResultIgnored,
            reason="duplicate result",
            task_id=f"{self.run_id}/{step}/{attempt}",
            agent_id=agent,
        )

    def finished(self, output: Any) -> History:
        return self._add(RunCompleted, reason="all steps completed", output=output)

    def failed_run(self, step: str, error: str) -> History:
        return self._add(RunFailed, reason="no attempts left", step=step, error=error)

    def cancelled(self) -> History:
        return self._add(RunCancelled, actor="client:cli", reason="user asked to stop")


def histories() -> list[History]:
    """A completed run charged under two models, a failed one, a cancelled one, a running one."""
    done = (
        History(RUN_COMPLETED, 0)
        .started("Write about cairns")
        .dispatched("plan", "planner")
        .completed("plan", "planner-1")
        .charged("plan", "planner", "planner-1", "cairn-offline-1", (512, 128), "0.000123")
        .dispatched("research", "researcher")
        .violated("research", "researcher-1", 1)
        .charged("research", "researcher", "researcher-1", "model-a", (10, 5), "0.1")
        .dispatched("research", "researcher", attempt=2)
        .completed("research", "researcher-2", attempt=2)
        .charged("research", "researcher", "researcher-2", "model-a", (20, 6), "0.2", 2)
        .charged("research", "researcher", "researcher-2", "model-b", (7, 3), "0.0000001", 2)
        .ignored("research", "researcher-1", 1)
        .dispatched("write", "writer")
        .completed("write", "writer-1")
        .charged("write", "writer", "writer-1", "model-b", (300, 900), "0.0123456789")
        .finished({"report": {"title": "Cairns", "words": 120}})
    )
    failed = (
        History(RUN_FAILED, 100)
        .started("Summarise the minutes")
        .dispatched("plan", "planner")
        .failed("plan", "planner-1", 1, retryable=True)
        .dispatched("plan", "planner", attempt=2)
        .failed("plan", "planner-2", 2, retryable=False)
        .charged("plan", "planner", "planner-2", "model-a", (50, 0), "0.05", 2)
        .failed_run("plan", "planner kept failing")
    )
    cancelled = (
        History(RUN_CANCELLED, 200).started("Never mind").dispatched("plan", "planner").cancelled()
    )
    running = (
        History(RUN_RUNNING, 300)
        .started("Still going")
        .dispatched("plan", "planner")
        .completed("plan", "planner-1")
        .charged("plan", "planner", "planner-1", "model-a", (1000, 250), "0.3")
        .dispatched("research", "researcher")
    )
    return [done, failed, cancelled, running]


def interleaved(runs: Sequence[History]) -> list[Event]:
    """The runs' events mixed round-robin, as concurrent runs reach the log."""
    queues = [list(h.events) for h in runs]
    mixed: list[Event] = []
    while any(queues):
        for queue in queues:
            if queue:
                mixed.append(queue.pop(0))
    return mixed


def append_in_chunks(store: EventStore, events: Sequence[Event], size: int = 5) -> list[int]:
    positions: list[int] = []
    for start in range(0, len(events), size):
        positions += store.append(events[start : start + size])
    return positions


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    with backend_settings(request.param, tmp_path / "home") as s:
        yield s


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    store = EventStore(settings.store)
    yield store
    store.close()


@pytest.fixture
def events(store: EventStore) -> list[Event]:
    mixed = interleaved(histories())
    append_in_chunks(store, mixed)
    return mixed


def charges(events: Sequence[Event]) -> list[CostCharged]:
    return [e for e in events if isinstance(e, CostCharged)]


def expected_costs(events: Sequence[Event], key: str) -> dict[str, tuple[int, int, Decimal, int]]:
    totals: dict[str, tuple[int, int, Decimal, int]] = {}
    for e in charges(events):
        k = {"run": str(e.run_id), "agent": e.capability, "model": e.model}[key]
        i, o, a, n = totals.get(k, (0, 0, Decimal(0), 0))
        totals[k] = (i + e.input_tokens, o + e.output_tokens, a + e.amount_usd, n + 1)
    return totals


def test_views_follow_the_log(settings: Settings, events: list[Event]) -> None:
    with ProjectionRunner(settings, batch_size=7) as runner:
        assert runner.run_once() == len(events)
        assert runner.position() == len(events)
    with Views(settings) as views:
        runs = {r.run_id: r for r in views.runs()}
        assert {k: r.status for k, r in runs.items()} == {
            RUN_COMPLETED: "completed",
            RUN_FAILED: "failed",
            RUN_CANCELLED: "cancelled",
            RUN_RUNNING: "running",
        }
        assert [r.run_id for r in views.runs(status="running")] == [RUN_RUNNING]
        # Most recently started first.
        assert [r.run_id for r in views.runs(limit=2)] == [RUN_RUNNING, RUN_CANCELLED]

        done = runs[RUN_COMPLETED]
        assert (done.workflow, done.workflow_version, done.goal) == (
            "research-report",
            2,
            "Write about cairns",
        )
        assert (done.steps_total, done.steps_done, done.attempts) == (3, 3, 4)
        assert done.cost_usd == Decimal("0.3124687789")
        assert done.output == {"report": {"title": "Cairns", "words": 120}}
        assert done.started_at == T0 + timedelta(seconds=1)
        assert done.finished_at == done.updated_at == T0 + timedelta(seconds=16)
        assert (done.last_seq, done.error) == (16, None)

        failed = runs[RUN_FAILED]
        assert (failed.error, failed.current_step, failed.attempts) == (
            "planner kept failing",
            "plan",
            2,
        )
        assert (failed.steps_done, failed.cost_usd) == (0, Decimal("0.05"))
        assert runs[RUN_CANCELLED].finished_at is not None
        assert runs[RUN_CANCELLED].cost_usd == 0

        running = runs[RUN_RUNNING]
        assert (running.current_step, running.steps_done, running.finished_at) == (
            "research",
            1,
            None,
        )

        steps = {s.step: s for s in views.steps(RUN_COMPLETED)}
        assert list(steps) == ["plan", "research", "write"]
        research = steps["research"]
        assert (research.status, research.attempt, research.agent_id) == (
            "completed",
            2,
            "researcher-2",
        )
        # A step's cost and tokens cover all its attempts.
        assert research.cost_usd == Decimal("0.3000001")
        assert (research.input_tokens, research.output_tokens) == (37, 14)
        assert [s.status for s in views.steps(RUN_FAILED)] == ["failed"]
        [pending] = [s for s in views.steps(RUN_RUNNING) if s.step == "research"]
        assert (pending.status, pending.agent_id, pending.finished_at) == (
            "dispatched",
            None,
            None,
        )


def test_costs_are_exact_sums_of_the_charges(settings: Settings, events: list[Event]) -> None:
    with ProjectionRunner(settings, batch_size=4) as runner:
        runner.run_once()
    with Views(settings) as views:
        keys: tuple[CostKey, ...] = ("run", "agent", "model")
        for key in keys:
            rows = views.costs(by=key)
            got = {r.key: (r.input_tokens, r.output_tokens, r.amount_usd, r.charges) for r in rows}
            assert got == expected_costs(events, key), key
            assert [r.amount_usd for r in rows] == sorted(
                (r.amount_usd for r in rows), reverse=True
            )
        total = sum((e.amount_usd for e in charges(events)), Decimal(0))
        assert views.cost_total() == total == Decimal("0.6624687789")
        # 0.1 + 0.2 stays 0.3: no float anywhere between the event and the total.
        assert views.cost_total(RUN_COMPLETED) == Decimal("0.3124687789")
        model_a = {r.key: r for r in views.costs(by="model", run_id=RUN_COMPLETED)}["model-a"]
        assert model_a.amount_usd == Decimal("0.3")
        assert str(model_a.amount_usd) == "0.3"
        by_model = {r.key: r.amount_usd for r in views.costs(by="model")}
        assert by_model["model-b"] == Decimal("0.0123457789")
        [step] = [s for s in views.steps(RUN_COMPLETED) if s.step == "research"]
        assert step.model_dump(mode="json")["cost_usd"] == "0.3000001"


def test_audit_has_one_row_per_event(
    settings: Settings, store: EventStore, events: list[Event]
) -> None:
    with ProjectionRunner(settings) as runner:
        runner.run_once()
    logged = store.read_log(0, 10_000)
    with Views(settings) as views:
        audit = views.audit(limit=10_000)
        assert [(a.position, a.run_id, a.seq) for a in audit] == [
            (le.position, le.event.run_id, le.event.seq) for le in logged
        ]
        assert [(a.actor, a.action, a.reason) for a in audit] == [
            (le.event.actor, le.event.type_name(), le.event.reason) for le in logged
        ]
        assert [a.position for a in views.audit(limit=3)] == [le.position for le in logged[-3:]]

        timeline = views.timeline(RUN_COMPLETED)
        assert [a.seq for a in timeline] == list(range(1, 17))
        details = [a.detail for a in timeline]
        assert details[0] == "started research-report v2 (3 steps): Write about cairns"
        assert details[1] == "dispatched plan to planner (attempt 1)"
        assert details[2] == "planner-1 completed plan (attempt 1) in 12 ms"
        assert details[3] == "charged $0.000123 for 512+128 tokens of cairn-offline-1"
        assert details[5].startswith("output of research (attempt 1) from researcher-1 violates")
        assert details[10] == "charged $0.0000001 for 7+3 tokens of model-b"
        assert (
            details[11]
            == "ignored result of task " + f"{RUN_COMPLETED}/research/1 from researcher-1"
        )
        assert details[-1] == "run completed"
        assert [a.step for a in timeline][:2] == [None, "plan"]
        assert timeline[11].step is None  # ResultIgnored names no step
        assert timeline[0].actor == "client:cli"
        assert timeline[2].actor == "agent:planner-1"
        [failure] = [a for a in views.timeline(RUN_FAILED) if a.action == "RunFailed"]
        assert (failure.step, failure.detail) == (
            "plan",
            "run failed at plan: planner kept failing",
        )


def test_running_twice_does_not_double_count(settings: Settings, events: list[Event]) -> None:
    with ProjectionRunner(settings) as runner:
        assert runner.run_once() == len(events)
        before = dump(settings.views)
        assert runner.run_once() == 0
        assert runner.run_batch() == 0
    with ProjectionRunner(settings) as again:
        assert again.run_once() == 0
    assert dump(settings.views) == before


def test_resumes_after_a_crash_between_batches(
    settings: Settings, store: EventStore, events: list[Event]
) -> None:
    crashed = ProjectionRunner(settings, batch_size=4)
    assert crashed.run_batch() + crashed.run_batch() == 8
    crashed.close()  # the process dies here; only committed batches remain

    more = History(uuid.UUID("50000000-0000-4000-8000-000000000005"), 400).started("late")
    store.append(more.events)
    with ProjectionRunner(settings, batch_size=4) as resumed:
        assert resumed.position() == 8
        assert resumed.run_once() == len(events) + 1 - 8

    # The same log projected in one pass into a fresh file gives the same rows.
    fresh = dataclasses.replace(settings, views_url=other_views(settings, "fresh"))
    with ProjectionRunner(fresh) as one_pass:
        one_pass.run_once()
    assert dump(settings.views) == dump(fresh.views)
    with Views(settings) as views:
        assert views.cost_total() == sum((e.amount_usd for e in charges(events)), Decimal(0))
        assert len(views.audit(limit=1000)) == len(events) + 1


def test_a_crash_between_fold_and_commit_counts_nothing_twice(
    settings: Settings, events: list[Event]
) -> None:
    """The runner process dies after writing a batch's rows and position, before the commit:
    nothing of the batch stays, and the next runner projects it once."""
    with ProjectionRunner(settings, batch_size=4) as first:
        first.run_batch()
    before = dump(settings.views)
    crashed = subprocess.run(
        [sys.executable, "-m", "cairn.projections"],
        env=_module_env(settings, CAIRN_CRASH_AT="views-before-commit:1"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert dump(settings.views) == before
    with ProjectionRunner(settings) as again:
        assert again.position() == 4
        assert again.run_once() == len(events) - 4
    with Views(settings) as views:
        assert views.cost_total() == sum((e.amount_usd for e in charges(events)), Decimal(0))
        assert len(views.audit(limit=None)) == len(events)
        got = {r.key: r.charges for r in views.costs(by="run")}
        assert got == {k: n for k, (_, _, _, n) in expected_costs(events, "run").items()}


def test_a_batch_that_lost_the_race_is_rolled_back(
    settings: Settings, store: EventStore, events: list[Event]
) -> None:
    recorder = open_recorder(settings.views)
    try:
        first: list[LoggedEvent] = store.read_log(0, 10)
        recorder.project(PROJECTION_NAME, first, after=0)
        before = dump(settings.views)
        # A second runner that read from position 0 too: the same batch, or a longer one.
        # (The library's tracking row alone would accept the longer one and count 1-10 twice.)
        for batch in (first, store.read_log(0, 12)):
            with pytest.raises(ProjectionConflictError):
                recorder.project(PROJECTION_NAME, batch, after=0)
        assert dump(settings.views) == before
        assert recorder.position(PROJECTION_NAME) == 10
    finally:
        recorder.close()


def test_rebuild_gives_identical_rows(
    settings: Settings, store: EventStore, events: list[Event]
) -> None:
    extra = (
        History(uuid.UUID("60000000-0000-4000-8000-000000000006"), 500)
        .started("Redo")
        .dispatched("plan", "planner")
        .completed("plan", "planner-1")
        # The step is done again: steps_done must drop and rise back.
        .dispatched("plan", "planner", attempt=2)
        .charged("plan", "planner", "planner-1", "model-a", (1, 1), "0.00")
    )
    with ProjectionRunner(settings, batch_size=3) as runner:
        runner.run_once()
        for event in extra.events:  # live: the log grows while the runner follows it
            store.append([event])
            runner.run_batch()
        assert runner.position() == store.last_position()
    live = dump(settings.views)
    raw_sql(settings.views, "UPDATE runs SET status = 'garbage'")
    raw_sql(settings.views, "DELETE FROM audit WHERE position > 5")

    assert rebuild(settings) == len(events) + len(extra.events)
    assert dump(settings.views) == live
    with Views(settings) as views:
        redo = views.run("6")
        assert redo is not None
        assert (redo.steps_done, redo.attempts, redo.current_step) == (0, 2, "plan")
        assert redo.cost_usd == Decimal("0.00")


def test_fold_does_not_depend_on_batch_boundaries(store: EventStore, events: list[Event]) -> None:
    logged = store.read_log(0, 1000)
    whole = fold(logged, {}, {})
    for cut in range(1, len(logged)):
        first = fold(logged[:cut], {}, {})
        # The rows written by the first batch are what the second batch starts from.
        runs, steps = deepcopy(first.runs), deepcopy(first.steps)
        second = fold(logged[cut:], first.runs, first.steps)
        assert runs == first.runs
        assert steps == first.steps
        assert {**first.runs, **second.runs} == whole.runs
        assert {**first.steps, **second.steps} == whole.steps
        assert first.costs + second.costs == whole.costs
        assert first.audit + second.audit == whole.audit


def test_missing_views_say_what_to_do(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")  # PostgreSQL: test_postgres_views.py
    with pytest.raises(ViewsMissingError) as missing:
        Views(settings)
    assert str(missing.value) == (
        f"no views yet at {settings.views}: run `cairn up` or `cairn projections rebuild`"
    )
    assert not Path(settings.views).exists()  # reading never creates the file

    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(ViewsMissingError, match=r"no views yet at .*empty\.db"):
        Views(str(empty))


def test_runs_by_prefix(settings: Settings, store: EventStore) -> None:
    first = uuid.UUID("abcd1234-0000-4000-8000-000000000001")
    second = uuid.UUID("abcd5678-0000-4000-8000-000000000002")
    store.append(History(first).started("one").events + History(second, 9).started("two").events)
    with ProjectionRunner(settings) as runner:
        runner.run_once()
    with Views(settings.views) as views:
        row = views.run("abcd1")
        assert row is not None
        assert row.run_id == first
        row = views.run("  ABCD5678 ")
        assert row is not None
        assert row.run_id == second
        row = views.run(second.hex.upper())
        assert row is not None
        assert row.run_id == second
        assert views.run(uuid.uuid4()) is None
        assert views.steps(str(uuid.uuid4())) == []
        with pytest.raises(AmbiguousRunError, match="'abcd' matches several runs"):
            views.run("abcd")
        with pytest.raises(RunNotFoundError, match="no run id starts with 'ffff'"):
            views.run("ffff")
        with pytest.raises(RunNotFoundError, match="is not a run id"):
            views.timeline("abc%")
        with pytest.raises(RunNotFoundError, match="no run"):
            views.resolve(uuid.uuid4())
        assert views.resolve("abcd5") == str(second)
        assert [a.run_id for a in views.timeline("abcd5")] == [second]


async def test_run_follows_the_log_until_stopped(settings: Settings, store: EventStore) -> None:
    runner = ProjectionRunner(settings, batch_size=2)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop, poll_interval=0.01))
    try:
        [started] = store.append(History(RUN_RUNNING).started("live").events)
        assert await asyncio.to_thread(runner.wait_for, started, 10) >= started
        with Views(settings) as views:
            row = views.run(RUN_RUNNING)
            assert row is not None
            assert row.status == "running"

        h = History(RUN_CANCELLED).started("x").dispatched("plan", "planner").cancelled()
        positions = store.append(h.events)
        await asyncio.to_thread(wait_for_views, settings, positions[-1], 10)
        with Views(settings) as views:
            row = views.run(RUN_CANCELLED)
            assert row is not None
            assert row.status == "cancelled"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        runner.close()
    assert task.result() is None


def test_wait_for_times_out(settings: Settings, events: list[Event]) -> None:
    with ProjectionRunner(settings) as runner:
        runner.run_once()
        with pytest.raises(TimeoutError, match="is the projection runner running"):
            runner.wait_for(len(events) + 1, timeout=0.05)
        with pytest.raises(TimeoutError):
            wait_for_views(settings, len(events) + 1, timeout=0.05)
        assert runner.wait_for(len(events), timeout=0) == len(events)


def _module_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAIRN_", "NATS_"))}
    env["CAIRN_CHAIN_KEY"] = os.environ["CAIRN_CHAIN_KEY"]  # the tests' one key (conftest)
    return {
        **env,
        "CAIRN_HOME": str(settings.home),
        "CAIRN_STORE": settings.store,
        "CAIRN_VIEWS": settings.views,
        **extra,
    }


def test_main_projects_until_sigterm(settings: Settings, events: list[Event]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cairn.projections"],
        env=_module_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for_views(settings, len(events), timeout=30) == len(events)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    first = stderr.splitlines()[0]
    assert f"projecting {settings.store} into {settings.views} from log position 0" in first
    with Views(settings) as views:
        assert views.cost_total() == sum((e.amount_usd for e in charges(events)), Decimal(0))


def test_main_rebuild(settings: Settings, events: list[Event]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cairn.projections", "rebuild"],
        env=_module_env(settings),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"from {len(events)} events" in done.stderr
    with Views(settings) as views:
        assert views.position() == len(events)
