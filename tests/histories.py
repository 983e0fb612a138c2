"""Recorded histories built the way the coordinator builds them: facts decided by `decide`,
folded by `evolve`. A seeded driver plays the agents and the clock (results, errors, broken
contracts, timeouts, retries), so every history is reproducible."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from cairn.coordinator.domain.decide import decide
from cairn.coordinator.domain.facts import (
    CancelFact,
    Fact,
    Policy,
    ResultFact,
    StartRunFact,
    TimerFact,
    task_id,
)
from cairn.coordinator.domain.pricing import PriceTable
from cairn.coordinator.domain.state import RunState, evolve
from cairn.coordinator.pricing import load_price_table
from cairn.coordinator.workflow import load_contract_modules, parse_workflow
from cairn.events import Event, Intent, TaskError, TaskResult, Usage, WorkflowSpec
from cairn.events.contracts import resolve_contract

load_contract_modules()
T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = Policy(load_price_table(), resolve_contract)

PIPELINE = parse_workflow(
    {
        "name": "pipeline",
        "steps": [
            {"name": "plan", "capability": "planner", "input": {"topic": "$input.topic"},
             "contract": "Plan@1", "retry": {"max_attempts": 3}},
            {"name": "research", "capability": "researcher",
             "input": {"questions": "$steps.plan.output.questions"},
             "retry": {"max_attempts": 3, "backoff_s": 0}},
            {"name": "write", "capability": "writer",
             "input": {"plan": "$steps.plan.output", "facts": "$steps.research.output"},
             "on_failure": "skip", "timeout_s": 30},
            {"name": "review", "capability": "reviewer",
             "input": {"draft": "$steps.write.output ?? none"}, "needs": ["write"]},
        ],
        "output": {"plan": "$steps.plan.output", "review": "$steps.review.output"},
    }
)  # fmt: skip

PLAN = {"title": "Tides", "audience": "all", "questions": ["why?", "when?"]}


def output_for(step: str, attempt: int) -> dict[str, Any]:
    if step == "plan":
        return PLAN
    return {"step": step, "attempt": attempt, "text": f"{step} output"}


def simulate(
    run_id: uuid.UUID,
    *,
    seed: int = 0,
    workflow: WorkflowSpec = PIPELINE,
    policy: Policy = POLICY,
    t0: datetime = T0,
    trouble: float = 0.3,
    cancel_after: int | None = None,
) -> list[Event]:
    """One run from start to end. `trouble` is the chance that an attempt goes wrong (an
    error, an output that breaks its contract, a timeout, a duplicate result)."""
    rng = random.Random(seed)
    now = t0
    events: list[Event] = []
    state: RunState | None = None

    def apply(fact: Fact) -> None:
        nonlocal state
        for event in decide(state, fact, policy):
            state = evolve(state, event)
            events.append(event)

    apply(
        StartRunFact(
            run_id=run_id,
            workflow=workflow,
            input={"topic": "tides"},
            intent=Intent(goal="explain tides", success_criteria=["clear"]),
            requested_by="client:test",
            at=now,
        )
    )
    facts = 0
    while state is not None and not state.terminal:
        facts += 1
        if cancel_after is not None and facts > cancel_after:
            apply(CancelFact(run_id=run_id, requested_by="human:ann", reason="enough", at=now))
            break
        dispatched = [s for s in state.steps.values() if s.status == "dispatched"]
        waiting = [s for s in state.steps.values() if s.status == "retry_wait"]
        if dispatched:
            step = rng.choice(dispatched)
            now += timedelta(milliseconds=rng.randint(5, 900), microseconds=rng.randint(0, 999))
            roll = rng.random()
            if roll < trouble / 4:
                due = step.timeout_due_at
                assert due is not None
                now = max(now, due)
                apply(TimerFact(run_id=run_id, step=step.name, attempt=step.attempt,
                                kind="timeout", at=now))  # fmt: skip
                continue
            error = output = None
            if roll < trouble / 2:
                error = TaskError(message="upstream flaked", retryable=rng.random() < 0.8)
            elif roll < trouble * 3 / 4 and step.name == "plan":
                output = {"title": "", "questions": []}  # breaks Plan@1
            else:
                output = output_for(step.name, step.attempt)
            started = now - timedelta(milliseconds=rng.randint(1, 500))
            result = TaskResult(
                task_id=task_id(run_id, step.name, step.attempt),
                run_id=run_id,
                step=step.name,
                attempt=step.attempt,
                agent_id=f"{step.name}-{rng.randint(1, 3)}",
                output=output,
                error=error,
                usage=[
                    Usage(
                        model=rng.choice(["cairn-offline-1", "gpt-4o-mini", "local-model"]),
                        input_tokens=rng.randint(0, 5000),
                        output_tokens=rng.randint(0, 3000),
                    )
                    for _ in range(rng.randint(0, 2))
                ],
                started_at=started,
                finished_at=now,
            )
            apply(ResultFact(result=result, at=now))
            if trouble and rng.random() < trouble / 4:  # the same result delivered again
                now += timedelta(milliseconds=3)
                apply(ResultFact(result=result, at=now))
        elif waiting:
            step = waiting[0]
            assert step.retry_due_at is not None
            now = max(now, step.retry_due_at)
            apply(TimerFact(run_id=run_id, step=step.name, attempt=step.attempt + 1,
                            kind="retry", at=now))  # fmt: skip
        else:
            break  # waiting for a person: the history ends here
    return events


def doubled_prices() -> PriceTable:
    """The shipped table's version with every price doubled: a changed policy."""
    shipped = load_price_table()
    models = {
        name: price.model_copy(
            update={
                "input_per_mtok": price.input_per_mtok * 2,
                "output_per_mtok": price.output_per_mtok * 2,
            }
        )
        for name, price in shipped.models.items()
    }
    return shipped.model_copy(update={"models": models})


def many_runs(count: int, seed: int = 0, **kwargs: Any) -> list[list[Event]]:
    return [
        simulate(uuid.UUID(int=seed * 1_000_000 + i + 1, version=4), seed=seed + i, **kwargs)
        for i in range(count)
    ]


def total_cost(events: list[Event]) -> Decimal:
    from cairn.events import CostCharged

    return sum((e.amount_usd for e in events if isinstance(e, CostCharged)), Decimal(0))
