"""The bench's log work, in process: a history decided the way the coordinator decides it,
appended to an event store in batches, projected into the views, and replayed."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cairn.coordinator.domain.decide import decide
from cairn.coordinator.domain.facts import ResultFact, StartRunFact
from cairn.coordinator.domain.state import RunState, evolve, fold
from cairn.coordinator.policy import decision_policy
from cairn.coordinator.workflow import parse_workflow
from cairn.events import Event, Intent, TaskResult, Usage, WorkflowSpec
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings


def echo_steps(count: int, capability: str = "echo") -> list[dict[str, Any]]:
    """`count` steps in a line, each taking the output of the one before it."""
    steps: list[dict[str, Any]] = []
    for i in range(1, count + 1):
        value = "$input.value" if i == 1 else f"$steps.s{i - 1}.output.value"
        steps.append(
            {"name": f"s{i}", "capability": capability, "input": {"value": value}, "timeout_s": 60}
        )
    return steps


def pipeline_spec(name: str = "bench-pipeline") -> WorkflowSpec:
    return parse_workflow({"name": name, "steps": echo_steps(3)}, name)


def generated_history(target_events: int, concurrent: int = 50) -> Iterator[list[Event]]:
    """Batches of events as a coordinator under load commits them: `concurrent` runs of the
    three-step pipeline at a time, each round of their results decided together. Agents
    report model usage, so each step is charged as well. Ids and times are deterministic."""
    policy = decision_policy()
    spec = pipeline_spec()
    model = next(iter(policy.prices.models))
    at = datetime(2026, 1, 1, tzinfo=UTC)
    produced = 0
    runs = 0
    while produced < target_events:
        states: dict[uuid.UUID, RunState] = {}
        batch: list[Event] = []
        for _ in range(concurrent):
            runs += 1
            fact = StartRunFact(
                run_id=uuid.UUID(int=runs),
                workflow=spec,
                input={"value": runs},
                intent=Intent(goal="bench"),
                requested_by="client:bench",
                at=at,
            )
            events = decide(None, fact, policy)
            state = fold(list(events))
            assert state is not None
            states[fact.run_id] = state
            batch += events
        while batch:
            produced += len(batch)
            yield batch
            batch = []
            at += timedelta(milliseconds=3)
            for run_id, state in list(states.items()):
                step = next(s for s in state.steps.values() if s.status == "dispatched")
                result = TaskResult(
                    task_id=step.task_id or "",
                    run_id=run_id,
                    step=step.name,
                    attempt=step.attempt,
                    agent_id="echo-0a0b0c",
                    output={"value": run_id.int},
                    usage=[Usage(model=model, input_tokens=120, output_tokens=40)],
                    started_at=at - timedelta(milliseconds=1),
                    finished_at=at,
                )
                events = decide(state, ResultFact(result=result, at=at), policy)
                for event in events:
                    state = evolve(state, event)
                batch += events
                if state.terminal:
                    del states[run_id]
                else:
                    states[run_id] = state


@dataclass
class LogFigures:
    """Rates in events per second; a rate is None when it failed (see `errors`)."""

    events: int = 0
    batches: int = 0
    decide_per_s: float | None = None
    append_per_s: float | None = None
    rebuild_per_s: float | None = None
    replay_per_s: float | None = None
    replay_note: str = ""
    errors: dict[str, str] = field(default_factory=dict)


def measure_log(settings: Settings, events: int, progress: Callable[[str], None]) -> LogFigures:
    """Decide and append a history of about `events` events into `settings.store`, rebuild
    the views at `settings.views` from it, and replay-check it."""
    figures = LogFigures()
    progress(f"log: deciding and appending a history of {events:,} events")
    try:
        figures.decide_per_s, figures.append_per_s = append_history(settings, events, figures)
    except Exception as exc:  # a failed measurement is a row that says why
        figures.errors["append"] = f"{type(exc).__name__}: {exc}"
        return figures
    progress("log: rebuilding the projections")
    try:
        figures.rebuild_per_s = rebuild_rate(settings)
    except Exception as exc:  # a failed measurement is a row that says why
        figures.errors["rebuild"] = f"{type(exc).__name__}: {exc}"
    progress("log: replay --check")
    try:
        figures.replay_per_s, figures.replay_note = replay_rate(settings)
    except Exception as exc:
        figures.errors["replay"] = f"{type(exc).__name__}: {exc}"
    return figures


def append_history(settings: Settings, events: int, figures: LogFigures) -> tuple[float, float]:
    """Events per second decided (in process) and appended (`EventStore.append`, a batch per
    round of results), counting into `figures`."""
    store = EventStore.from_settings(settings)
    try:
        appending = 0.0
        started = time.perf_counter()
        for batch in generated_history(events):
            t = time.perf_counter()
            store.append(batch)
            appending += time.perf_counter() - t
            figures.events += len(batch)
            figures.batches += 1
        deciding = time.perf_counter() - started - appending
    finally:
        store.close()
    return figures.events / deciding, figures.events / appending


def rebuild_rate(settings: Settings) -> float:
    """Events per second of `cairn projections rebuild`."""
    from cairn.projections import rebuild

    started = time.perf_counter()
    count = rebuild(settings)
    return count / (time.perf_counter() - started)


def replay_rate(settings: Settings) -> tuple[float | None, str]:
    """Events per second of `replay --check` over every run in the store, as the command
    counts them (re-deciding only); loading and setting up go in the note."""
    try:
        from cairn.coordinator.history import replay
    except ImportError:
        return None, "cairn.coordinator.history.replay is not available yet"
    store = EventStore.from_settings(settings)
    try:
        started = time.perf_counter()
        checked = 0
        deciding = 0.0
        diverged = 0
        for run_id in store.run_ids():
            events = store.load(run_id)
            report = replay.check_history(events, replay.replay_policy(events))
            checked += report.events
            deciding += report.seconds
            diverged += not report.ok
        total = time.perf_counter() - started
    finally:
        store.close()
    if diverged:
        raise RuntimeError(f"replay found {diverged} diverging histories in the bench's own log")
    note = (
        f"{checked:,} events; with loading each run and its policy: {checked / total:,.0f} events/s"
    )
    return checked / deciding, note
