"""The whole data path with real processes: nats-server, coordinator, projections and four agents
each in its own OS process, the example workflow, the event log and the three views."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from chaos import table_rows
from conftest import run_to_end

from cairn.coordinator.pricing import load_price_table
from cairn.events import (
    CostCharged,
    Intent,
    ResultReceived,
    TaskCompleted,
    TaskDispatched,
)
from cairn.projections import Views, rebuild, wait_for_views
from cairn.runtime.client import CairnClient
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

pytestmark = pytest.mark.timeout(120)


def cli(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.env(), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


async def test_example_workflow_through_agent_processes(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    supervisor.start_all()
    await client.wait_ready(timeout=30)
    pids = {name: proc.pid for name, proc in supervisor.processes.items()}
    assert len(set(pids.values())) == 6
    assert os.getpid() not in pids.values()

    intent = Intent(goal="a report on volcanoes", success_criteria=["accurate"])
    run_id, notices = await run_to_end(
        client, "research-report", {"topic": "volcanoes"}, intent=intent
    )
    assert notices[-1].type == "RunCompleted", notices[-1]

    # The log is the truth: the full sequence of decisions, in order.
    store = EventStore(settings.store)
    events = store.load(run_id)
    assert [e.event_id for e in events] == [n.event_id for n in notices]
    compact = " ".join(e.type_name() for e in events)
    step = r"TaskDispatched ResultReceived( CostCharged)+ TaskCompleted"
    assert re.fullmatch(rf"RunStarted( {step}){{4}} RunCompleted", compact), compact
    dispatched = [e for e in events if isinstance(e, TaskDispatched)]
    assert [d.capability for d in dispatched] == ["planner", "researcher", "writer", "reviewer"]
    completed = [e for e in events if isinstance(e, TaskCompleted)]
    for d, c in zip(dispatched, completed, strict=True):
        assert c.agent_id.startswith(d.capability), c.agent_id
    # Every task carried the run's intent and the lineage of what it was built from.
    assert all(d.intent.goal == "a report on volcanoes" for d in dispatched)
    assert [entry.step for entry in dispatched[-1].lineage] == ["plan", "research", "write"]

    # Cost totals equal the usage in the events, priced by the table the charges name.
    prices = load_price_table()
    received = [e for e in events if isinstance(e, ResultReceived)]
    charges = [e for e in events if isinstance(e, CostCharged)]
    usage_priced = sum(
        (prices.charge(u) or Decimal(0) for r in received for u in r.usage), Decimal(0)
    )
    assert usage_priced > 0
    assert sum((c.amount_usd for c in charges), Decimal(0)) == usage_priced

    # The views answer state, cost and audit questions from the log alone.
    await asyncio.to_thread(wait_for_views, settings.views, notices[-1].position, 15.0)
    with Views(settings.views) as views:
        run = views.run(str(run_id))
        by_model = views.costs(by="model", run_id=str(run_id))
        by_agent = {r.key: r for r in views.costs(by="agent", run_id=str(run_id))}
        audit = views.audit(run_id=str(run_id), limit=1000)
    assert run.status == "completed"
    assert run.steps_done == run.steps_total == 4
    assert run.cost_usd == usage_priced
    assert sum((r.amount_usd for r in by_model), Decimal(0)) == usage_priced
    assert set(by_agent) == {"planner", "researcher", "writer", "reviewer"}
    assert len(audit) == len(events)
    actors = {row.actor for row in audit}
    assert "coordinator" in actors
    assert any(a.startswith("agent:researcher") for a in actors)
    assert any(a.startswith("client:") for a in actors)

    # The CLI reads the same views.
    shown = json.loads(cli(settings, "show", str(run_id)[:8], "--json").stdout)
    assert shown["run"]["status"] == "completed"
    assert [s["step"] for s in shown["steps"]] == ["plan", "research", "write", "review"]
    listed = json.loads(cli(settings, "runs", "--json").stdout)
    assert [r["run_id"] for r in listed] == [str(run_id)]
    cost_json = json.loads(cli(settings, "costs", "--by", "agent", "--json").stdout)
    assert Decimal(cost_json["total"]) == usage_priced
    audit_json = json.loads(cli(settings, "audit", "--run", str(run_id), "--json").stdout)
    assert len(audit_json) == len(events)
    assert "volcanoes" in cli(settings, "show", str(run_id)).stdout

    # A second run from the CLI with --wait.
    out = json.loads(
        cli(settings, "run", "research-report", "--input", '{"topic": "glaciers"}',
            "--wait", "--json").stdout
    )  # fmt: skip
    assert out["status"] == "completed"
    assert out["output"]["review"]["approved"] in (True, False)

    # Views rebuilt from the log come out identical to the live ones.
    await asyncio.to_thread(wait_for_views, settings.views, store.last_position(), 15.0)
    supervisor.processes["projections"].terminate()
    supervisor.processes["projections"].wait(10)
    live = table_rows(settings.views)
    rebuilt_settings = Settings(
        home=settings.home, nats_url=settings.nats_url, views_url=str(Path(settings.home) / "v2.db")
    )
    count = rebuild(rebuilt_settings)
    assert count == store.last_position()
    assert table_rows(rebuilt_settings.views) == live
    store.close()


async def test_cancel_and_unknown_workflow_get_clear_replies(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    supervisor.start("coordinator", "cairn.coordinator")  # no agents: runs wait at step one
    await client.wait_ready(timeout=30)
    reply = await client.start_run("no-such-workflow", {})
    assert not reply.ok
    assert reply.error is not None
    assert "unknown workflow 'no-such-workflow'" in reply.error

    run_id = uuid.uuid4()
    reply = await client.start_run("research-report", {"topic": "x"}, run_id=run_id)
    assert reply.ok
    assert reply.status == "running"
    again = await client.start_run("research-report", {"topic": "x"}, run_id=run_id)
    assert again.ok
    assert again.run_id == run_id
    cancelled = await client.cancel_run(run_id, reason="changed my mind")
    assert cancelled.ok
    assert cancelled.status == "cancelled"
    twice = await client.cancel_run(run_id)
    assert not twice.ok
    assert twice.error is not None
    assert "already cancelled" in twice.error
    store = EventStore(settings.store)
    assert [e.type_name() for e in store.load(run_id)] == [
        "RunStarted",
        "TaskDispatched",
        "RunCancelled",
    ]
    store.close()


def test_cli_names_the_unreachable_nats_server(tmp_path: Path) -> None:
    from cairn.runtime.embedded import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    # The coordinator waits for NATS first (tests/test_waiting.py): a short limit here.
    settings = Settings(home=tmp_path, nats_url=url, start_timeout=0.5)
    proc = cli(settings, "run", "research-report", "--input", "{}", check=False)
    assert proc.returncode == 2
    assert f"cannot reach NATS at {url}" in proc.stderr
    env = {**os.environ, **settings.env()}
    coordinator = subprocess.run(
        [sys.executable, "-m", "cairn.coordinator"], capture_output=True, text=True, env=env,
        timeout=30,
    )  # fmt: skip
    assert coordinator.returncode == 2
    assert f"cannot reach NATS at {url}" in coordinator.stderr


def test_cli_rejects_bad_input_json(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, nats_url="nats://127.0.0.1:1")
    proc = cli(settings, "run", "research-report", "--input", "{nope", check=False)
    assert proc.returncode == 2
    assert "--input is not valid JSON" in proc.stderr


def test_views_missing_is_a_clear_error(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "empty")
    proc = cli(settings, "runs", check=False)
    assert proc.returncode == 2
    assert "cairn projections rebuild" in proc.stderr or "cairn up" in proc.stderr
