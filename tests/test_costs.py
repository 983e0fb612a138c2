"""Cost views per tenant and per day, recomputation under another price table as a query, and
views files of an older layout rebuilt on open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from views_backends import BACKENDS, backend_settings, raw_sql

from cairn.coordinator.domain.decide import decide
from cairn.coordinator.domain.facts import Policy, ResultFact, StartRunFact, task_id
from cairn.coordinator.domain.pricing import PriceTable
from cairn.coordinator.domain.state import fold
from cairn.coordinator.pricing import load_price_table
from cairn.coordinator.workflow import parse_workflow
from cairn.events import Event, Intent, TaskResult, Usage
from cairn.events.contracts import resolve_contract
from cairn.projections import ProjectionRunner, Views
from cairn.projections.storage import open_recorder
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings

POLICY = Policy(load_price_table(), resolve_contract)
WORKFLOW = parse_workflow({"name": "w", "steps": [{"name": "a", "capability": "writer"}]})
DAY1 = datetime(2026, 3, 1, 23, 0, tzinfo=UTC)
DAY2 = DAY1 + timedelta(hours=2)  # the next day (UTC)


def run(tenant: str, at: datetime, tokens: int, model: str = "cairn-offline-1") -> list[Event]:
    run_id = uuid.uuid4()
    start = StartRunFact(
        run_id=run_id, workflow=WORKFLOW, input={}, intent=Intent(goal="g"),
        requested_by="client:t", at=at, tenant=tenant,
    )  # fmt: skip
    events = decide(None, start, POLICY)
    result = TaskResult(
        task_id=task_id(run_id, "a", 1), run_id=run_id, step="a", attempt=1, agent_id="w-1",
        output={"ok": 1}, usage=[Usage(model=model, input_tokens=tokens, output_tokens=tokens)],
        started_at=at, finished_at=at,
    )  # fmt: skip
    state = fold(events)
    assert state is not None
    return events + decide(state, ResultFact(result=result, at=at), POLICY)


def project(settings: Settings, *histories: list[Event]) -> Views:
    store = EventStore(settings.store)
    for history in histories:
        store.append(history)
    store.close()
    with ProjectionRunner(settings) as runner:
        runner.run_once()
    return Views(settings.views)


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    with backend_settings(request.param, tmp_path) as s:
        yield s


def test_costs_per_tenant_and_per_day_are_exact(settings: Settings) -> None:
    with project(
        settings,
        run("acme", DAY1, 1_000_000),  # $0.50 + $1.50
        run("acme", DAY2, 1_000),  # $0.002
        run("globex", DAY2, 3),  # $0.000006
    ) as views:
        by_tenant = {r.key: r.amount_usd for r in views.costs(by="tenant")}
        assert by_tenant == {"acme": Decimal("2.002"), "globex": Decimal("0.000006")}
        by_day = {r.key: r.amount_usd for r in views.costs(by="day")}
        assert by_day == {"2026-03-01": Decimal("2"), "2026-03-02": Decimal("0.002006")}
        assert sum(by_day.values()) == sum(by_tenant.values()) == views.cost_total()


def test_recomputing_under_another_price_table_is_a_query(
    settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    views = project(settings, run("acme", DAY1, 1_000_000), run("acme", DAY1, 10, "mystery"))
    request.addfinalizer(views.close)
    recorded = views.cost_total()
    cheaper = PriceTable.model_validate(
        {"version": "2027-01", "models": {"cairn-offline-1": {"input_per_mtok": "0.10",
                                                              "output_per_mtok": "0.20"}}}
    )  # fmt: skip

    def reprice(model: str, i: int, o: int) -> Decimal | None:
        return cheaper.charge(Usage(model=model, input_tokens=i, output_tokens=o))

    rows = views.costs(by="model", reprice=reprice)
    amounts = {r.key: (r.amount_usd, r.unpriced) for r in rows}
    assert amounts == {"cairn-offline-1": (Decimal("0.3"), 0), "mystery": (Decimal(0), 1)}
    assert views.cost_total() == recorded  # the record itself is unchanged

    table = tmp_path / "prices.yaml"
    table.write_text(
        'version: "2027-01"\nmodels:\n  cairn-offline-1: {input_per_mtok: "0.10", '
        'output_per_mtok: "0.20"}\n'
    )
    env = {**os.environ, **settings.env()}
    proc = subprocess.run(
        [sys.executable, "-m", "cairn.cli", "costs", "--by", "model",
         "--prices", str(table), "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["price_table"] == "2027-01"
    assert Decimal(out["total"]) == Decimal("0.3")
    assert out["unpriced"] == 1


def test_views_of_an_older_layout_are_rebuilt_from_the_log(settings: Settings) -> None:
    with project(settings, run("acme", DAY1, 1000)) as views:
        assert views.cost_total() == Decimal("0.002")
    # What an older cairn left: no tenant column.
    raw_sql(settings.views, "ALTER TABLE costs DROP COLUMN tenant")
    recorder = open_recorder(settings.views)  # notices, empties, forgets the position
    recorder.close()
    with ProjectionRunner(settings) as runner:
        assert runner.position() == 0
        runner.run_once()
    with Views(settings.views) as views:
        assert views.costs(by="tenant")[0].key == "acme"
