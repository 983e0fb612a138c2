"""Per-tenant daily limits: decided against what the tenant has left (recorded for replay), the
ledger behind it, the limits file, and the whole path through real processes, with a SIGKILLed
coordinator that must still know what the tenant spent today."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import run_to_end
from test_governance import POLICY, RUN, T0, approve, result, state_of, types, wf
from test_oversight import cli, next_of

from cairn.coordinator.domain.decide import decide
from cairn.coordinator.domain.facts import StartRunFact, TenantAllowance
from cairn.coordinator.history.replay import check_history
from cairn.coordinator.tenants import (
    TenantLedger,
    TenantLimit,
    TenantLimits,
    TenantLimitsError,
    load_tenant_limits,
)
from cairn.events import (
    Budget,
    BudgetExhausted,
    BudgetReserved,
    BudgetSettled,
    CostCharged,
    Event,
    Intent,
    RunCompleted,
    WorkflowSpec,
)
from cairn.projections import wait_for_views
from cairn.runtime.client import CairnClient
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

TWO = wf({"name": "a", "capability": "x"}, {"name": "b", "capability": "y", "needs": ["a"]})
PARALLEL = wf({"name": "a", "capability": "x"}, {"name": "b", "capability": "y", "needs": []})


def allowing(usd: str | None, tokens: int | None = None) -> Any:
    return replace(
        POLICY, tenant=TenantAllowance(usd=None if usd is None else Decimal(usd), tokens=tokens)
    )


def start_for(
    workflow: WorkflowSpec, policy: Any, budget: Budget | None = None, tenant: str = "acme"
) -> list[Event]:
    fact = StartRunFact(
        run_id=RUN, workflow=workflow, input={}, intent=Intent(goal="g"),
        requested_by="client:test", at=T0, budget=budget, tenant=tenant,
    )  # fmt: skip
    return decide(None, fact, policy)


# -- decisions ---------------------------------------------------------------------------------


def test_a_dispatch_reserves_against_the_tenant_and_records_what_it_had_left() -> None:
    history = start_for(TWO, allowing("1.00"))
    assert types(history) == ["RunStarted", "BudgetReserved", "TaskDispatched"]
    reserved = history[1]
    assert isinstance(reserved, BudgetReserved)
    assert reserved.amount_usd == Decimal("0.01")
    assert reserved.tenant_available_usd == Decimal("1.00")
    # Without a tenant limit (and without a run budget) nothing is reserved, as before.
    assert types(start_for(TWO, POLICY)) == ["RunStarted", "TaskDispatched"]


def test_steps_dispatched_together_each_take_from_the_tenant() -> None:
    history = start_for(PARALLEL, allowing("0.015"))
    assert types(history) == [
        "RunStarted", "BudgetReserved", "TaskDispatched", "BudgetExhausted", "ApprovalRequested",
    ]  # fmt: skip
    exhausted = history[3]
    assert isinstance(exhausted, BudgetExhausted)
    assert exhausted.scope == "tenant"
    assert exhausted.tenant_available_usd == Decimal("0.005")  # 0.015 less a's 0.01
    assert "tenant acme has $0.005 left today" in exhausted.reason


def test_a_spent_tenant_asks_a_person_who_may_let_the_step_run_over() -> None:
    history = start_for(TWO, allowing("0.001"))
    assert types(history)[-2:] == ["BudgetExhausted", "ApprovalRequested"]
    request = history[-1]
    assert request.kind == "tenant"  # type: ignore[attr-defined]
    events = decide(state_of(history), approve("a", by="ann"), allowing("0.001"))
    assert types(events) == ["ApprovalGranted", "BudgetReserved", "TaskDispatched"]
    assert events[0].actor == "human:ann"
    history.extend(events)
    # The grant was for that attempt: the next step is held again while the tenant is spent.
    later = decide(state_of(history), result("a"), allowing("0.001"))
    assert "BudgetExhausted" in types(later)


def test_a_spent_tenant_fails_a_run_that_fails_closed() -> None:
    history = start_for(TWO, allowing("0"), budget=Budget(usd=Decimal(5), on_exhausted="fail"))
    assert types(history) == ["RunStarted", "BudgetExhausted", "RunFailed"]
    assert "tenant acme's daily limit is reached" in history[-1].reason
    # Used-up daily tokens stop the run the same way.
    tokens = start_for(TWO, allowing(None, tokens=0), budget=Budget(on_exhausted="fail"))
    assert types(tokens) == ["RunStarted", "BudgetExhausted", "RunFailed"]


def test_denying_a_tenant_request_fails_the_run() -> None:
    history = start_for(TWO, allowing("0"))
    events = decide(state_of(history), approve("a", by="ann", yes=False), POLICY)
    assert types(events) == ["ApprovalDenied", "RunFailed"]


def test_replay_decides_with_the_recorded_allowance() -> None:
    history = start_for(TWO, allowing("0.015"))
    history += decide(state_of(history), result("a", tokens=10), allowing("0.0051"))
    history += decide(state_of(history), approve("b"), POLICY)
    history += decide(state_of(history), result("b"), POLICY)
    assert types(history)[-1] == "RunCompleted"
    # The replaying policy knows nothing of tenants: the record tells it.
    report = check_history(history, POLICY)
    assert report.divergence is None, report.divergence
    # A record whose allowance was edited decides differently.
    edited = [
        e.model_copy(update={"tenant_available_usd": Decimal("1")})
        if isinstance(e, BudgetExhausted)
        else e
        for e in history
    ]
    divergence = check_history(edited, POLICY).divergence
    assert divergence is not None
    assert divergence.expected is not None
    assert divergence.expected.type_name() == "BudgetReserved"
    assert divergence.recorded.type_name() == "BudgetExhausted"


def test_an_old_budget_event_is_read_as_a_run_scoped_one() -> None:
    from cairn.events.codec import decode_event

    stored = (
        b'{"actor":"coordinator","at":"2026-01-01T00:00:00Z","needed_usd":"0.01","prev_hash":"",'
        b'"reason":"r","remaining_tokens":null,"remaining_usd":"0","step":"a"}'
    )
    event = decode_event("BudgetExhausted@1", stored, RUN, 2)
    assert isinstance(event, BudgetExhausted)
    assert event.scope == "run"
    assert event.tenant_available_usd is None


# -- the ledger --------------------------------------------------------------------------------

DAY = T0.date()


def charge(run: uuid.UUID, usd: str, at: datetime = T0, tokens: int = 5) -> CostCharged:
    return CostCharged(
        run_id=run, seq=9, at=at, actor="coordinator", reason="r", task_id="t", step="a",
        capability="x", agent_id="x-1", model="m", input_tokens=tokens, output_tokens=0,
        price_table="v", amount_usd=Decimal(usd),
    )  # fmt: skip


def reserve(run: uuid.UUID, usd: str, step: str = "a", at: datetime = T0) -> BudgetReserved:
    return BudgetReserved(
        run_id=run, seq=3, at=at, actor="coordinator", reason="r", step=step, attempt=1,
        amount_usd=Decimal(usd),
    )  # fmt: skip


def settle(run: uuid.UUID, step: str = "a") -> BudgetSettled:
    return BudgetSettled(
        run_id=run, seq=4, at=T0, actor="coordinator", reason="r", step=step, attempt=1,
        reserved_usd=Decimal("0.5"), actual_usd=Decimal("0.2"), actual_tokens=5,
    )  # fmt: skip


def test_ledger_counts_charges_and_open_reservations_per_tenant_and_day() -> None:
    ledger = TenantLedger()
    r1, r2 = uuid.uuid4(), uuid.uuid4()
    limit = TenantLimit(daily_usd=Decimal(2), daily_tokens=100)
    ledger.stage([reserve(r1, "0.5"), charge(r1, "0.2")], "acme")
    ledger.stage([reserve(r2, "0.3")], "other")
    ledger.commit()
    assert ledger.allowance("acme", DAY, limit) == TenantAllowance(Decimal("1.3"), 95)
    ledger.stage([settle(r1)], "acme")
    ledger.commit()
    assert ledger.allowance("acme", DAY, limit) == TenantAllowance(Decimal("1.8"), 95)
    # Another day starts from the limit; a finished run's reservations are released.
    assert ledger.allowance("acme", DAY + timedelta(days=1), limit) == TenantAllowance(
        Decimal(2), 100
    )
    ledger.stage([RunCompleted(run_id=r2, seq=5, at=T0, actor="c", reason="r", output={})], "x")
    ledger.commit()
    assert ledger.spent("other", DAY) == (Decimal(0), Decimal(0), 0)


def test_ledger_rolls_back_what_a_failed_commit_staged() -> None:
    ledger = TenantLedger()
    run = uuid.uuid4()
    ledger.stage([reserve(run, "0.5")], "acme")
    ledger.commit()
    ledger.stage([settle(run), charge(run, "0.4"), reserve(run, "0.7", step="b")], "acme")
    ledger.rollback()
    assert ledger.spent("acme", DAY) == (Decimal(0), Decimal("0.5"), 0)
    assert set(ledger.open) == {(run, "a", 1)}


def test_ledger_forgets_days_before_yesterday() -> None:
    ledger = TenantLedger()
    run = uuid.uuid4()
    ledger.stage([charge(run, "1", at=T0 - timedelta(days=3))], "acme")
    ledger.stage([charge(run, "1", at=T0)], "acme")
    ledger.commit()
    assert {day for _, day in ledger.days} == {DAY}


def test_limits_file_is_read_again_when_changed(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    limits = TenantLimits(path, check_every_s=0)
    assert limits.get("acme") is None  # no file: nobody is limited
    path.write_text('tenants:\n  acme: {daily_usd: "2.50"}\n  "*": {daily_tokens: 10}\n')
    assert limits.get("acme") == TenantLimit(daily_usd=Decimal("2.50"))
    assert limits.get("zeta") == TenantLimit(daily_tokens=10)
    path.write_text("tenants: {acme: {daily_usd: -1}}\n")  # broken by an edit
    assert limits.get("acme") == TenantLimit(daily_usd=Decimal("2.50"))
    assert limits.problem is not None
    assert "invalid" in limits.problem


def test_a_malformed_limits_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants: [acme]\n")
    with pytest.raises(TenantLimitsError, match=r"tenant limits .* are invalid"):
        load_tenant_limits(path)


# -- through real processes --------------------------------------------------------------------

ONE_STEP = WorkflowSpec.model_validate(
    {"name": "one-step", "steps": [{"name": "plan", "capability": "planner",
                                    "input": {"goal": "$intent.goal", "topic": "$input.topic"}}]}
)  # fmt: skip


def charges(store: EventStore, run: uuid.UUID) -> Decimal:
    return sum((e.amount_usd for e in store.load(run) if isinstance(e, CostCharged)), Decimal(0))


@pytest.mark.timeout(120)
async def test_a_tenant_limit_holds_across_runs_and_a_coordinator_kill(
    settings: Settings, supervisor: Supervisor, client: CairnClient
) -> None:
    supervisor.start_all()
    await client.wait_ready()
    first, notices = await run_to_end(client, "research-report", {"topic": "t"}, tenant="acme")
    end = notices[-1]
    assert end.type == "RunCompleted"
    store = EventStore(settings.store)
    try:
        spent = charges(store, first)
    finally:
        store.close()
    assert spent > 0
    # From now on acme may spend what it spent plus half a default estimate ($0.01) a day.
    (settings.home / "tenants.yaml").write_text(
        f'tenants:\n  acme: {{daily_usd: "{spent + Decimal("0.005")}"}}\n'
    )
    # The coordinator dies; the next one must learn what acme spent today from the log.
    supervisor.processes["coordinator"].send_signal(signal.SIGKILL)
    supervisor.processes["coordinator"].wait(10)
    supervisor.start("coordinator", "cairn.coordinator")
    await client.wait_ready()

    _, notices = await run_to_end(client, ONE_STEP, {"topic": "t"}, tenant="zeta")  # not acme's
    end = notices[-1]
    assert end.type == "RunCompleted"

    held = uuid.uuid4()
    feed = await client.follow(held)
    reply = await client.start_run(ONE_STEP, {"topic": "t"}, run_id=held, tenant="acme")
    assert reply.ok, reply.error
    exhausted = await next_of(feed, {"BudgetExhausted"})
    assert exhausted.type == "BudgetExhausted"
    assert exhausted.event["scope"] == "tenant"
    assert Decimal(exhausted.event["tenant_available_usd"]) == Decimal("0.005")
    request = await next_of(feed, {"ApprovalRequested"})
    assert request.event["kind"] == "tenant"
    listed = json.loads(cli(settings, "approvals", "--json").stdout)
    assert [(a["run_id"], a["kind"]) for a in listed] == [(str(held), "tenant")]
    done = cli(settings, "approve", str(held), "plan", "--as", "olga", "--reason", "urgent")
    assert done.returncode == 0, done.stderr
    end = await next_of(feed, set())
    await feed.close()
    assert end.type == "RunCompleted"

    # A run that fails closed is stopped by the spent tenant without asking anyone.
    budget = Budget(usd=Decimal(1), on_exhausted="fail")
    closed, notices = await run_to_end(
        client, ONE_STEP, {"topic": "t"}, tenant="acme", budget=budget
    )
    end = notices[-1]
    assert end.type == "RunFailed"
    assert "tenant acme's daily limit is reached" in end.event["reason"]

    store = EventStore(settings.store)
    try:
        assert charges(store, closed) == 0
        events = store.load(held)
        granted = [e for e in events if e.type_name() == "ApprovalGranted"]
        assert [(e.actor, e.reason) for e in granted] == [("human:olga", "urgent")]
        assert check_history(events, POLICY).divergence is None
    finally:
        store.close()

    await asyncio.to_thread(wait_for_views, settings.views, end.position, 15.0)
    shown = cli(settings, "tenants", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {row["tenant"]: row for row in json.loads(shown.stdout)["tenants"]}
    assert Decimal(rows["acme"]["daily_usd"]) == spent + Decimal("0.005")
    assert Decimal(rows["acme"]["charged_usd"]) > spent  # the approved step ran too
    assert rows["zeta"]["daily_usd"] is None
