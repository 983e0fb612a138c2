"""People and budgets in the loop, with real processes: a gate approved through the CLI, a
budget raised by an approver, a run that fails closed, and an approval that escalates and
expires on the coordinator's timers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from decimal import Decimal
from typing import Any

import pytest

from cairn.events import Budget, EventNotice, Intent, WorkflowSpec
from cairn.projections import Views, wait_for_views
from cairn.runtime.client import TERMINAL_TYPES, CairnClient
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

pytestmark = pytest.mark.timeout(90)


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.env(), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "cairn.cli", *args],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


async def start_all(supervisor: Supervisor, client: CairnClient) -> None:
    supervisor.start_all()
    await client.wait_ready()


async def next_of(feed: Any, kinds: set[str], timeout: float = 30) -> EventNotice:
    while True:
        notice: EventNotice = await feed.next(timeout=timeout)
        if notice.type in kinds or notice.type in TERMINAL_TYPES:
            return notice


async def test_gate_is_approved_through_the_cli_and_the_audit_says_who(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    await start_all(supervisor, client)
    run_id = uuid.uuid4()
    feed = await client.follow(run_id)
    reply = await client.start_run(
        "reviewed-report", {"topic": "bees"}, intent=Intent(goal="bees"), run_id=run_id
    )
    assert reply.ok, reply.error
    gate = await next_of(feed, {"ApprovalRequested"})
    assert gate.type == "ApprovalRequested"
    assert gate.event["step"] == "write"
    assert gate.event["group"] == "editors"

    listed = json.loads(cli(settings, "approvals", "--json").stdout)
    assert [(a["run_id"], a["step"]) for a in listed] == [(str(run_id), "write")]

    done = cli(settings, "approve", str(run_id), "write", "--as", "maria", "--reason", "facts ok")
    assert done.returncode == 0, done.stderr
    assert "approved write" in done.stdout
    again = cli(settings, "approve", str(run_id), "write", "--as", "tom")
    assert again.returncode == 1
    assert "already granted by maria" in again.stderr

    end = await next_of(feed, set())
    await feed.close()
    assert end.type == "RunCompleted"
    await asyncio.to_thread(wait_for_views, settings.views, end.position, 15.0)
    with Views(settings.views) as views:
        audit = views.audit(run_id=str(run_id), limit=500)
    granted = [row for row in audit if row.action == "ApprovalGranted"]
    assert [(g.actor, g.reason) for g in granted] == [("human:maria", "facts ok")]


async def test_budget_pause_raise_and_complete_then_another_fails_closed(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    await start_all(supervisor, client)
    # Each step is reserved at the default estimate of $0.01 and costs well under that; a budget
    # of $0.0105 covers the first steps, then what they spent leaves too little for the next.
    run_id = uuid.uuid4()
    feed = await client.follow(run_id)
    reply = await client.start_run(
        "research-report", {"topic": "owls"}, run_id=run_id, budget=Budget(usd=Decimal("0.0105"))
    )
    assert reply.ok, reply.error
    blocked = await next_of(feed, {"BudgetExhausted"})
    assert blocked.type == "BudgetExhausted"
    raised = cli(settings, "budget", "raise", str(run_id), "--usd", "1", "--as", "lee")
    assert raised.returncode == 0, raised.stderr
    end = await next_of(feed, set())
    await feed.close()
    assert end.type == "RunCompleted"
    store = EventStore(settings.store)
    events = store.load(run_id)
    assert any(e.type_name() == "BudgetRaised" and e.actor == "human:lee" for e in events)

    closed = uuid.uuid4()
    feed = await client.follow(closed)
    budget = Budget(usd=Decimal("0.0101"), on_exhausted="fail")
    reply = await client.start_run("research-report", {"topic": "owls"}, run_id=closed,
                                   budget=budget)  # fmt: skip
    assert reply.ok
    end = await next_of(feed, set())
    await feed.close()
    assert end.type == "RunFailed"
    assert "fails closed" in end.event["reason"]
    spent = sum(
        (Decimal(str(e.amount_usd)) for e in store.load(closed) if e.type_name() == "CostCharged"),
        Decimal(0),
    )
    assert spent > 0  # it got some way before the budget stopped it
    assert spent <= Decimal("0.0101")  # estimates cover the actual spend of these agents
    store.close()


EXPIRING = WorkflowSpec.model_validate(
    {
        "name": "expiring",
        "steps": [
            {
                "name": "gate",
                "capability": "planner",
                "input": {"goal": "$intent.goal", "topic": "$input.topic"},
                "approval": {
                    "before": True, "approvers": "team", "timeout_s": 0.5,
                    "escalate_to": ["leads"], "on_expiry": "escalate",
                },
            }
        ],
    }
)  # fmt: skip


async def test_approval_escalates_then_expires_on_the_coordinators_timers(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    supervisor.start("coordinator", "cairn.coordinator")
    await client.wait_ready()
    run_id = uuid.uuid4()
    feed = await client.follow(run_id)
    reply = await client.start_run(EXPIRING, {"topic": "x"}, run_id=run_id)
    assert reply.ok, reply.error
    kinds = []
    while not kinds or kinds[-1] not in TERMINAL_TYPES:
        kinds.append((await feed.next(timeout=20)).type)
    await feed.close()
    assert kinds == [
        "RunStarted",
        "ApprovalRequested",
        "ApprovalEscalated",
        "ApprovalExpired",
        "RunFailed",
    ]


SCOUTING = WorkflowSpec.model_validate(
    {
        "name": "scouting",
        "steps": [
            {"name": "survey", "capability": "scout", "input": {"area": "$input.area"},
             "may_propose": True},
            {"name": "check", "capability": "scout",
             "input": {"area": "$input.area", "unsure": True}, "needs": ["survey"]},
        ],
    }
)  # fmt: skip


async def test_agent_proposals_and_review_flags_through_the_sdk(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    from pathlib import Path

    tests_dir = str(Path(__file__).parent)
    supervisor.start("coordinator", "cairn.coordinator")
    supervisor.start("agent-scout", "scout_agent", {"PYTHONPATH": tests_dir})
    await client.wait_ready()
    run_id = uuid.uuid4()
    feed = await client.follow(run_id)
    reply = await client.start_run(SCOUTING, {"area": "hill"}, run_id=run_id)
    assert reply.ok, reply.error
    request = await next_of(feed, {"ApprovalRequested"})
    assert request.type == "ApprovalRequested"
    assert request.event["kind"] == "output"
    assert request.event["context"]["note"] == "the count looks too high"
    decided = await client.approve(run_id, request.event["step"], "ines", "count is right")
    assert decided.ok, decided.error
    end = await next_of(feed, set())
    await feed.close()
    assert end.type == "RunCompleted"
    store = EventStore(settings.store)
    kinds = [e.type_name() for e in store.load(run_id)]
    assert kinds.count("StepAdmitted") == 1
    completed = [e.step for e in store.load(run_id) if e.type_name() == "TaskCompleted"]
    assert sorted(completed) == ["check", "dig", "survey"]
    store.close()
