"""`cairn runs`, `show`, `costs` and `tenants`: what the views (and the tenants' limits) say."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Annotated, get_args

import typer
from rich.table import Table
from rich.text import Text

from cairn.cli.app import (
    HomeOpt,
    JsonOpt,
    app,
    console,
    fail,
    open_views,
    print_json,
    resolve_run,
    settings_for,
)
from cairn.cli.plain import plain
from cairn.events import Usage

# -- reading the views ------------------------------------------------------------------------


@app.command()
def runs(
    status: Annotated[
        str | None,
        typer.Option(help="Only runs with this status: running, completed, failed or cancelled."),
    ] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List runs: status, current step, cost."""
    from cairn.projections import RunStatus

    statuses = get_args(RunStatus)
    if status is not None and status not in statuses:
        fail(f"--status {status!r} is not a run status: use one of {', '.join(statuses)}")
    rows = open_views(settings_for(home)).runs(status=status, limit=limit)
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table(title="runs")
    for col in ("run", "workflow", "status", "step", "steps", "cost (USD)", "started"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r.run_id)[:8],
            plain(r.workflow),
            r.status,
            plain(r.current_step),
            f"{r.steps_done}/{r.steps_total}",
            str(r.cost_usd),
            r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


@app.command()
def show(
    run: Annotated[str, typer.Argument(help="A run id or a unique prefix of one.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A run's state, steps and timeline."""
    views = open_views(settings_for(home))
    row = views.run(resolve_run(views, run))
    assert row is not None
    steps = views.steps(str(row.run_id))
    timeline = views.timeline(str(row.run_id))
    if as_json:
        print_json(
            {
                "run": row.model_dump(mode="json"),
                "steps": [s.model_dump(mode="json") for s in steps],
                "timeline": [t.model_dump(mode="json") for t in timeline],
            }
        )
        return
    console.print(
        Text.assemble((f"run {row.run_id}", "bold"), " · ", plain(row.workflow), " · ",
                      (row.status, "bold"))
    )  # fmt: skip
    console.print(Text.assemble("goal: ", plain(row.goal)))
    console.print(f"cost: ${row.cost_usd} · attempts: {row.attempts}")
    if row.error:
        console.print(Text.assemble(("error:", "red"), " ", plain(row.error)))
    table = Table(title="steps")
    for col in ("step", "capability", "status", "try", "agent", "tokens in/out", "cost (USD)"):
        table.add_column(col)
    for s in steps:
        table.add_row(
            plain(s.step), plain(s.capability), s.status, str(s.attempt), plain(s.agent_id),
            f"{s.input_tokens}/{s.output_tokens}", str(s.cost_usd),
        )  # fmt: skip
    console.print(table)
    table = Table(title="timeline")
    for col in ("seq", "time", "actor", "action", "detail"):
        table.add_column(col)
    for t in timeline:
        table.add_row(
            str(t.seq), t.at.strftime("%H:%M:%S.%f")[:-3], plain(t.actor), t.action, plain(t.detail)
        )
    console.print(table)


@app.command()
def costs(
    by: Annotated[str, typer.Option(help="Group by run, agent, model, tenant or day.")] = "run",
    run: Annotated[str | None, typer.Option(help="Only this run (id or prefix).")] = None,
    prices: Annotated[
        Path | None,
        typer.Option(help="Recompute the amounts from the recorded tokens with this table."),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cost totals from the recorded charges (or recomputed under another price table)."""
    if by not in ("run", "agent", "model", "tenant", "day"):
        fail("--by must be run, agent, model, tenant or day")
    reprice = None
    table_version = None
    if prices is not None:
        from cairn.coordinator.pricing import PriceTableError, load_price_table

        try:
            table = load_price_table(prices)
        except PriceTableError as exc:
            fail(str(exc))
        table_version = table.version

        def reprice(model: str, input_tokens: int, output_tokens: int) -> Decimal | None:
            usage = Usage(model=model, input_tokens=input_tokens, output_tokens=output_tokens)
            return table.charge(usage)

    views = open_views(settings_for(home))
    run_id = resolve_run(views, run) if run else None
    rows = views.costs(by=by, run_id=run_id, reprice=reprice)
    total = sum((r.amount_usd for r in rows), Decimal(0))
    unpriced = sum(r.unpriced for r in rows)
    if as_json:
        print_json(
            {
                "by": by,
                "rows": [r.model_dump(mode="json") for r in rows],
                "total": total,
                "price_table": table_version,
                "unpriced": unpriced,
            }
        )
        return
    title = f"costs by {by}" + (f" under price table {table_version}" if table_version else "")
    out = Table(title=title)
    for col in (by, "charges", "input tokens", "output tokens", "USD"):
        out.add_column(col)
    for r in rows:
        key = r.key[:8] if by == "run" else r.key
        out.add_row(
            plain(key), str(r.charges), f"{r.input_tokens:,}", f"{r.output_tokens:,}",
            str(r.amount_usd),
        )  # fmt: skip
    out.caption = f"total ${total}" + (
        f" ({unpriced} charges of models the table does not price count as $0)" if unpriced else ""
    )
    console.print(out)


@app.command()
def tenants(
    day: Annotated[
        str | None, typer.Option(help="A UTC day as YYYY-MM-DD (default: today).")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Each tenant's daily limit (tenants.yaml) and what it was charged on a day (UTC)."""
    from datetime import UTC, date, datetime

    from cairn.coordinator.tenants import (
        ANY_TENANT,
        TenantLimitsError,
        limit_for,
        load_tenant_limits,
    )

    settings = settings_for(home)
    try:
        when = date.fromisoformat(day) if day else datetime.now(UTC).date()
    except ValueError:
        fail(f"--day {day!r} is not a date: give it as YYYY-MM-DD")
    path = settings.tenants
    try:
        limits = load_tenant_limits(path)
    except TenantLimitsError as exc:
        fail(str(exc))
    charged = {r.key: r for r in open_views(settings).costs(by="tenant", day=when.isoformat())}
    rows = []
    for name in sorted((set(limits) - {ANY_TENANT}) | set(charged)):
        limit = limit_for(limits, name)
        row = charged.get(name)
        spent = row.amount_usd if row else Decimal(0)
        tokens = row.input_tokens + row.output_tokens if row else 0
        rows.append(
            {
                "tenant": name,
                "daily_usd": limit.daily_usd if limit else None,
                "daily_tokens": limit.daily_tokens if limit else None,
                "charged_usd": spent,
                "tokens": tokens,
                "left_usd": (
                    limit.daily_usd - spent if limit and limit.daily_usd is not None else None
                ),
            }
        )
    if as_json:
        print_json({"day": when.isoformat(), "limits": str(path), "tenants": rows})
        return
    out = Table(title=f"tenants on {when.isoformat()} (UTC)")
    for col in ("tenant", "daily limit", "charged", "left", "tokens", "daily tokens"):
        out.add_column(col)
    for r in rows:
        out.add_row(
            plain(r["tenant"]),
            "-" if r["daily_usd"] is None else f"${r['daily_usd']}",
            f"${r['charged_usd']}",
            "-" if r["left_usd"] is None else f"${r['left_usd']}",
            f"{r['tokens']:,}",
            "-" if r["daily_tokens"] is None else f"{r['daily_tokens']:,}",
        )
    out.caption = f"limits from {path}" + ("" if limits else " (no file: no tenant is limited)")
    console.print(out)
