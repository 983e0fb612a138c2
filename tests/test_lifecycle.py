"""The shared statuses: every fold of a run takes them from `cairn.events.lifecycle`, so the
coordinator's state, the live progress table and `cairn why` agree on each step."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from histories import PIPELINE, POLICY, T0, many_runs, simulate

from cairn.cli.progress import RunProgress
from cairn.coordinator.domain.decide import decide
from cairn.coordinator.domain.facts import (
    ApprovalFact,
    BudgetFact,
    Fact,
    ResultFact,
    StartRunFact,
    TimerFact,
    task_id,
)
from cairn.coordinator.domain.state import RunState, evolve
from cairn.coordinator.workflow import parse_workflow
from cairn.events import (
    EFFECTS,
    TERMINAL_EVENTS,
    Budget,
    CarriedOutput,
    Event,
    EventNotice,
    Intent,
    StepSpec,
    TaskError,
    TaskResult,
    effect_of,
    step_status,
)
from cairn.events.base import event_types
from cairn.projections import step_provenance

GATED = parse_workflow(
    {
        "name": "gated",
        "steps": [
            {"name": "plan", "capability": "planner", "retry": {"max_attempts": 2}},
            {"name": "write", "capability": "writer", "on_failure": "skip",
             "retry": {"max_attempts": 2, "backoff_s": 0}},
            {"name": "review", "capability": "reviewer", "approval": {"before": True}},
        ],
    }
)  # fmt: skip


PEOPLE = parse_workflow(
    {
        "name": "people",
        "steps": [
            {"name": "plan", "capability": "planner"},
            {"name": "research", "capability": "researcher", "may_propose": True,
             "cost_estimate_usd": "0.4", "approval": {"on_flag": True}},
            {"name": "write", "capability": "writer", "on_failure": "ask",
             "retry": {"max_attempts": 1}, "cost_estimate_usd": "0.4"},
            {"name": "review", "capability": "reviewer", "on_failure": "ask",
             "retry": {"max_attempts": 1}, "approval": {"before": True}},
        ],
    }
)  # fmt: skip


def with_people(seed: int) -> list[Event]:
    """A forked run with a budget that runs out, flagged outputs, a proposed step and failures
    that ask a person: a person grants or refuses each request, and raises the budget."""
    run_id = uuid.UUID(int=1000 + seed, version=4)
    events: list[Event] = []
    state: RunState | None = None
    now = T0

    def apply(fact: Fact) -> None:
        nonlocal state
        for event in decide(state, fact, POLICY):
            state = evolve(state, event)
            events.append(event)

    apply(
        StartRunFact(
            run_id=run_id, workflow=PEOPLE, input={}, intent=Intent(goal="g"),
            requested_by="client:test", at=now, budget=Budget(usd=Decimal("0.3")),
            carried={"plan": CarriedOutput(output={"ok": True}, source="an override")},
        )
    )  # fmt: skip
    for turn in range(40):
        assert state is not None
        if state.terminal:
            break
        now += timedelta(seconds=1)
        steps = state.steps.values()
        pending = state.pending_approvals()
        if pending and pending[0].kind == "budget":
            apply(BudgetFact(run_id=run_id, usd=Decimal(5), by="ann", at=now))
        elif pending:
            approve = (turn + seed) % 3 != 0
            apply(ApprovalFact(run_id=run_id, step=pending[0].step, by="ann", approve=approve,
                               at=now))  # fmt: skip
        elif dispatched := [s for s in steps if s.status == "dispatched"]:
            step = dispatched[0]
            fails = (turn + seed) % 4 == 1
            result = TaskResult(
                task_id=task_id(run_id, step.name, step.attempt), run_id=run_id,
                step=step.name, attempt=step.attempt, agent_id=f"{step.name}-1",
                output=None if fails else {"ok": True, "turn": turn},
                error=TaskError(message="flaked", retryable=False) if fails else None,
                started_at=now, finished_at=now,
                review="look" if step.name == "research" and turn % 2 else None,
                proposals=[StepSpec(name="extra", capability="writer")]
                if step.name == "research" else [],
            )  # fmt: skip
            apply(ResultFact(result=result, at=now))
        elif retrying := [s for s in steps if s.retry_due_at and s.status == "retry_wait"]:
            step = retrying[0]
            apply(TimerFact(run_id=run_id, step=step.name, attempt=step.attempt + 1,
                            kind="retry", at=now + timedelta(minutes=5)))  # fmt: skip
        else:
            break
    return events


def histories() -> list[list[Event]]:
    return [
        *many_runs(12, seed=3, trouble=0.6),
        *many_runs(12, seed=40, trouble=0.6, workflow=GATED),
        simulate(uuid.UUID(int=77, version=4), seed=77, workflow=PIPELINE, cancel_after=3),
        *(with_people(seed) for seed in range(6)),
    ]


def test_every_event_type_has_an_effect() -> None:
    assert set(EFFECTS) == set(event_types().values())
    assert {kind.type_name() for kind in TERMINAL_EVENTS} == {
        "RunCompleted",
        "RunFailed",
        "RunCancelled",
    }


@pytest.mark.parametrize("events", histories(), ids=lambda h: str(h[0].run_id)[-4:])
def test_evolve_sets_the_statuses_the_table_gives(events: list[Event]) -> None:
    state: RunState | None = None
    run_status = None
    approvals: dict[str, str] = {}
    for i, event in enumerate(events):
        state = evolve(state, event)
        effect = effect_of(event)
        run_status = effect.run or run_status
        request = getattr(event, "request_id", None)
        if effect.approval is not None and isinstance(request, str):
            approvals[request] = effect.approval
        assert state.status == run_status
        assert {r: a.status for r, a in state.approvals.items()} == approvals
        for name, step in state.steps.items():
            assert step.status == step_status(events[: i + 1], name), (event, name)


@pytest.mark.parametrize("events", histories(), ids=lambda h: str(h[0].run_id)[-4:])
def test_why_names_the_coordinators_skipped_steps(events: list[Event]) -> None:
    state: RunState | None = None
    for event in events:
        state = evolve(state, event)
    assert state is not None
    for name, step in state.steps.items():
        why = step_provenance(events, name).status
        assert (why == "skipped") == (step.status == "skipped" and step.attempt > 0)
        assert (why == "not dispatched") == (step.attempt == 0)


@pytest.mark.parametrize("events", histories(), ids=lambda h: str(h[0].run_id)[-4:])
def test_progress_shows_the_coordinators_statuses(events: list[Event]) -> None:
    progress = RunProgress(str(events[0].run_id))
    state: RunState | None = None
    for position, event in enumerate(events, start=1):
        state = evolve(state, event)
        progress.apply(
            EventNotice(
                position=position,
                event_id=event.event_id,
                type=event.type_name(),
                event=event.model_dump(mode="json"),
            )
        )
        assert {n: s.status for n, s in progress.steps.items()} == {
            n: s.status for n, s in state.steps.items()
        }
        assert progress.status == state.status
        assert progress.done == state.terminal
